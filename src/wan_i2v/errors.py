"""User-facing errors: one line that says what is wrong and what to do."""

import signal
import threading
from contextlib import contextmanager
from contextvars import ContextVar


class WanError(Exception):
    """An error the CLI prints as one line (exit code 2) instead of a traceback.

    ``hint`` says what the user can do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# The exit codes of a process stopped by Ctrl-C (SIGINT) and by SIGTERM, as a shell reports a process those signals end.
INTERRUPTED, TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pod or a service stopping), raised where the process is: it stops as after Ctrl-C."""


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread, so that the run stops as after
    Ctrl-C: its state saved, the resume hint printed, its lock and temporaries removed (Python's
    default ends the process on the spot and leaves them). Once: the stop itself is not interrupted."""

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    if threading.current_thread() is threading.main_thread():  # (elsewhere the signal is not Python's to handle)
        signal.signal(signal.SIGTERM, terminate)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's and others' run over several), else its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, known by its name (so that callers need not import torch)."""
    return type(exc).__name__ == "OutOfMemoryError"


# Who reads the errors: the command line (`wan-i2v ...`, set by cli.main) or Python code and HTTP
# clients, who both name options by their keywords (the default).
_COMMAND_LINE: ContextVar[bool] = ContextVar("wan_i2v_command_line", default=False)
_NO_VALUE = object()


def command_line() -> bool:
    """The errors raised now are read on the command line."""
    return _COMMAND_LINE.get()


def option(name: str, value: object = _NO_VALUE) -> str:
    """Option ``name`` (its keyword, e.g. ``frame_num``) as the reader of the error spells it:
    ``--frame-num 6`` on the command line, ``frame_num=6`` in Python."""
    if command_line():
        return f"--{name.replace('_', '-')}" + ("" if value is _NO_VALUE else f" {value}")
    return name + ("" if value is _NO_VALUE else f"={value!r}")


@contextmanager
def _spelled_for(command_line: bool):
    token = _COMMAND_LINE.set(command_line)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_the_command_line():
    """Errors raised inside spell options as command-line flags."""
    return _spelled_for(True)


def by_keyword():
    """Errors raised inside spell options by their keywords (``frame_num``) even within the command
    line's spelling: `wan-i2v serve` runs inside it, and its HTTP clients send fields, not flags."""
    return _spelled_for(False)


def counted(count: int, noun: str) -> str:
    """``1 job``, ``2 jobs``: a count with its noun in the right number (nouns that take an s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
