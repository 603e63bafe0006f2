"""The server's modules as a developer meets them: each database behind the queue provides what the
store needs of it (``server.queue``), and the two never import each other."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import wan_i2v.server
from wan_i2v.server.postgres import AdvisoryLockLiveness, PostgresQueue
from wan_i2v.server.queue import Liveness, Queue
from wan_i2v.server.store import FileLiveness, SQLiteQueue

SERVER = Path(wan_i2v.server.__file__).parent


def members(protocol) -> tuple[dict[str, inspect.Signature], set[str]]:
    """A protocol's methods (with their signatures) and its data attributes, as its source declares them."""
    methods = {name: inspect.signature(value) for name, value in vars(protocol).items()
               if inspect.isfunction(value) and not name.startswith("_")}  # (typing's own hooks are not the protocol's)
    return methods, set(protocol.__annotations__)


@pytest.mark.parametrize("protocol,implementation", [(Queue, SQLiteQueue), (Queue, PostgresQueue),
                                                     (Liveness, FileLiveness), (Liveness, AdvisoryLockLiveness)])  # fmt: skip
def test_each_database_provides_every_member_of_the_protocol(protocol, implementation):
    methods, attributes = members(protocol)
    assert methods and attributes  # (the protocol was read)
    for name, signature in methods.items():
        assert callable(getattr(implementation, name, None)), f"{implementation.__name__} lacks {name}()"
        given = inspect.signature(getattr(implementation, name))
        assert [(p.name, p.kind) for p in given.parameters.values()] == [(p.name, p.kind) for p in signature.parameters.values()], name
    for name in attributes:  # a class attribute, or one its instances are declared to have
        assert hasattr(implementation, name) or name in inspect.get_annotations(implementation), f"{implementation.__name__} lacks {name}"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_postgres_does_not_import_the_store_that_chooses_it():
    assert "wan_i2v.server.store" not in imported_modules(SERVER / "postgres.py")
    assert {"wan_i2v.server.queue"} <= imported_modules(SERVER / "postgres.py") & imported_modules(SERVER / "store.py")

