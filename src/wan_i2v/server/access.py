"""Who may reach the server: the client a token names (``--token``, or one token per client from
``--tokens FILE``), the ``Host`` a request names (DNS rebinding) and the ``Origin`` or ``Referer`` of a
request that changes something (cross-site requests)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from wan_i2v.errors import WanError, counted

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKENS_FORMAT = "one client a line: NAME TOKEN, or NAME TOKEN admin; lines starting with # are comments"


@dataclass(frozen=True)
class Client:
    """Who sent a request. ``name`` is stored with the jobs it submits; an ``admin`` sees every job."""

    name: str | None  # None: the one client of a server with a single token or none
    admin: bool

    @property
    def sees(self) -> str | None:
        """Whose jobs this client may list, read and delete: its own name's, or (None) every job."""
        return None if self.admin else self.name


ANYONE = Client(None, admin=True)  # a server with one token (or none) has one client, to whom every job belongs


class Tokens:
    """The tokens a server accepts, each naming its client."""

    def __init__(self, clients: dict[str, Client]):
        self._clients = clients

    @classmethod
    def single(cls, token: str) -> "Tokens":
        return cls({token: ANYONE})

    def client(self, given: str) -> Client | None:
        """The client whose token was given, or None. Every token is compared, each in constant time,
        so that the time taken tells nothing about which one came near."""
        found = None
        for token, client in self._clients.items():
            if secrets.compare_digest(given.encode(), token.encode()):
                found = client
        return found


def read_tokens(path: str | Path) -> Tokens:
    """``--tokens FILE``: one client a line, ``NAME TOKEN`` or ``NAME TOKEN admin``. A malformed line
    is refused by its number (never by its text: it holds a token)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # (a byte-order mark, as Windows editors write, is not part of the first name)
    except (OSError, UnicodeDecodeError) as exc:
        raise WanError(f"cannot read --tokens {path}: {getattr(exc, 'strerror', None) or exc}", f"give a readable text file, {TOKENS_FORMAT}") from None
    clients: dict[str, Client] = {}
    name_lines: dict[str, int] = {}
    token_lines: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) not in (2, 3):
            problem = f"{counted(len(words), 'word')} where NAME TOKEN or NAME TOKEN admin was expected"
        elif words[2:] not in ([], ["admin"]):
            problem = "the only word allowed after the token is admin"
        elif not CLIENT_NAME.fullmatch(words[0]):
            problem = "the name must be 1 to 64 letters, digits or . _ @ - (starting with a letter or digit)"
        elif words[0] in name_lines:
            problem = f"the name {words[0]} is on line {name_lines[words[0]]} already"
        elif words[1] in token_lines:
            problem = f"the token is on line {token_lines[words[1]]} already (each client needs its own)"
        else:
            name_lines[words[0]], token_lines[words[1]] = number, number
            clients[words[1]] = Client(words[0], admin=len(words) == 3)
            continue
        raise WanError(f"--tokens {path} line {number}: {problem}", TOKENS_FORMAT)
    if not clients:
        raise WanError(f"--tokens {path} names no client", TOKENS_FORMAT)
    _warn_if_others_read(Path(path))
    return Tokens(clients)


def _warn_if_others_read(path: Path) -> None:
    """As ssh says of a private key: a tokens file that other users may read gives away every client's token."""
    mode = path.stat().st_mode
    if os.name == "posix" and mode & 0o077:
        warnings.warn(f"--tokens {path} can be read by other users of this machine (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")


def server_tokens(token: str | None, tokens_file: str | None) -> Tokens | None:
    """The tokens a server accepts: ``--tokens FILE``'s clients, or the one ``token`` (None: no token
    is asked for). The two do not combine: a single token would be a client without a name."""
    if tokens_file is None:
        return None if token is None else Tokens.single(token)
    if token is not None:
        raise WanError("--tokens does not combine with --token, --token-file or WAN_I2V_TOKEN",
                       "give each client its own line in the --tokens file (an admin line sees every job)")  # fmt: skip
    return read_tokens(tokens_file)


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
