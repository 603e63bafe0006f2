"""Who may reach the server through a browser: the ``Host`` a request names (DNS rebinding) and the
``Origin`` or ``Referer`` of a request that changes something (cross-site requests)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def _host_name(netloc: str) -> str | None:
    """The host of ``name``, ``name:port`` or ``[v6]:port``, lower-cased; None when unreadable."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostCheck:
    """A rebinding attack reaches the server under the attacker's own name, so a ``Host`` that is an
    IP address, ``localhost`` or a name given in ``allowed`` passes, and any other name is refused
    (``*`` in ``allowed`` lets every name through, for a proxy that checks names itself)."""

    def __init__(self, allowed: list[str] | tuple[str, ...] = ()):
        self.allowed = {name.strip().lower() for name in allowed if name.strip()} | {"localhost"}

    def refusal(self, host_header: str | None) -> str | None:
        """Why a request with this ``Host`` is refused, or None."""
        name = _host_name(host_header or "")
        if not name:
            return "the request has no readable Host header"
        if "*" in self.allowed or _is_address(name) or name in self.allowed:
            return None
        return f"Host {name} is not a name of this server; its operator may allow it with --allowed-hosts {name}"


def cross_site_refusal(method: str, headers, has_bearer_token: bool) -> str | None:
    """Why a state-changing request sent by another site's page is refused, or None. A browser names
    the page in ``Origin`` (or ``Referer``); a request with an Authorization header was not forged by
    a page (a browser sends that header across sites only after a CORS preflight, which this server
    never allows), and its token is checked next. The page's cookie, by contrast, a forged request carries."""
    if method not in STATE_CHANGING or has_bearer_token:
        return None
    source = headers.get("origin") or headers.get("referer")
    if not source:
        return None  # not sent by a browser (curl, scripts)
    try:
        source_netloc = urlsplit(source).netloc.lower()
    except ValueError:
        source_netloc = ""
    if source_netloc and source_netloc == (headers.get("host") or "").lower():
        return None
    # ("null" is a sandboxed page's or a local file's Origin: foreign too)
    return (f"a request from another site ({source_netloc or source[:100]}) may not change jobs; "
            "use this server's page, or send Authorization: Bearer TOKEN")  # fmt: skip
