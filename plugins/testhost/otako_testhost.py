"""A scripted host for unit-testing a Python handler with plain CPython,
without a gateway or a component build.

Importing this module generates the world's bindings with componentize-py
(installed by scripts/build-plugins.sh) into a temporary folder, puts them
on `sys.path` and points `wit_world.imports.host`'s functions at the
`TestHost` the test installs:

    from otako_testhost import TestHost, load_app, rows
    from wit_world.imports import types

    app = load_app(__file__)  # the app.py next to this test
    with TestHost().on_query(lambda sql, params: rows(["name"], ["alice"])) as host:
        app.WitWorld().handle(types.Event(name="EVENT_X", id="1", data="{}"))
    host.queries, host.logs

Values are the bindings' own (`types.Value_Integer(3)`, ...); a failed host
call raises `componentize_py_types.Err` with the error variant.
"""

import atexit
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_PLUGINS = Path(__file__).resolve().parents[1]
_COMPONENTIZE_PY = _PLUGINS / ".toolchain" / "py" / "bin" / "componentize-py"


def _generate_bindings():
    if not _COMPONENTIZE_PY.exists():
        raise RuntimeError(f"{_COMPONENTIZE_PY} is missing: run scripts/build-plugins.sh first")
    out = Path(tempfile.mkdtemp(prefix="otako-testhost-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    subprocess.run(
        [str(_COMPONENTIZE_PY), "--wit-path", str(_PLUGINS.parent / "wit"), "--world", "plugin", "bindings", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


sys.path.insert(0, str(_generate_bindings()))
# Handlers load from their source folders: no bytecode caches there.
sys.dont_write_bytecode = True

from wit_world.imports import host, types  # noqa: E402

_current = None


def _installed(call):
    if _current is None:
        raise RuntimeError(f"`{call}` called with no TestHost installed: use `with TestHost()...:`")
    return _current


class TestHost:
    """The host of one test: script it, then use it as a context manager
    (`with TestHost().config("k", "v") as host:`); one at a time."""

    __test__ = False  # not a test case, whatever the runner

    def __init__(self):
        self._on_query = None
        self._config = {}
        self._online = set()
        self.queries = []  # (sql, params) per query, in order
        self.logs = []  # (level, message) per line, in order

    def on_query(self, answer):
        """Answers every `query` with `answer(sql, params)`: rows (see `rows`),
        or raise `Err(types.DbError_...)` as the host does. Without it, a
        query fails the test."""
        self._on_query = answer
        return self

    def config(self, key, value):
        """Sets `key` in the route's `[routes.config]`; unset keys read as None."""
        self._config[key] = str(value)
        return self

    def online(self, user_ids):
        """Marks these user ids as online."""
        self._online.update(str(i) for i in user_ids)
        return self

    def __enter__(self):
        global _current
        if _current is not None:
            raise RuntimeError("a TestHost is already installed; leave its `with` first")
        _current = self
        return self

    def __exit__(self, *exc):
        global _current
        _current = None
        return False


def _query(sql, params):
    test_host = _installed("query")
    test_host.queries.append((sql, list(params)))
    if test_host._on_query is None:
        raise AssertionError(f"the handler ran a query but the TestHost has no on_query: {sql}")
    return test_host._on_query(sql, params)


def _online(user_ids):
    test_host = _installed("online")
    return [i for i in user_ids if i in test_host._online]


def _config(key):
    return _installed("config")._config.get(key)


def _log(level, message):
    _installed("log").logs.append((level, message))


host.query, host.online, host.config, host.log = _query, _online, _config, _log


def value(v):
    """A `types.Value` from a plain Python value: None, int, float, str, bytes."""
    if v is None:
        return types.Value_Null()
    if isinstance(v, bool):
        raise TypeError("no WIT value for a bool")
    if isinstance(v, int):
        return types.Value_Integer(v)
    if isinstance(v, float):
        return types.Value_Real(v)
    if isinstance(v, str):
        return types.Value_Text(v)
    if isinstance(v, bytes):
        return types.Value_Blob(v)
    return v  # already a types.Value_*


def rows(columns, *values):
    """A query result: `rows(["id", "name"], [1, "alice"], [2, "bob"])`."""
    return types.Rows(columns=list(columns), rows=[[value(v) for v in row] for row in values])


def load_app(test_file, name="app"):
    """Imports `<name>.py` from the folder of `test_file` (pass `__file__`),
    as a module of its own so handlers with the same file name don't clash."""
    path = Path(test_file).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
