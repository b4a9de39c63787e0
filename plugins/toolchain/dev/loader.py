"""The `dev` source loader for Python handlers (world `dev-loader`,
wit/dev.wit): built once by scripts/build-lang-plugins.sh, then each saved
app.py (and the modules beside it) is imported here at load instead of
rebuilding the whole CPython image around it. Importing the text the build
would snapshot gives the same handler; only where it starts differs."""

import importlib
import importlib.abc
import importlib.util
import sys
import traceback

# componentize-py keeps only the modules imported while it builds, so the
# standard library a handler may import is imported here; a handler that
# imports another module waits for its componentize build instead (`dev`
# logs the ModuleNotFoundError).
import base64  # noqa: F401
import binascii  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import enum  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import hmac  # noqa: F401
import html  # noqa: F401
import itertools  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import operator  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import string  # noqa: F401
import struct  # noqa: F401
import textwrap  # noqa: F401
import time  # noqa: F401
import typing  # noqa: F401
import unicodedata  # noqa: F401
import urllib.parse  # noqa: F401
import uuid  # noqa: F401
import zlib  # noqa: F401

import wit_world
from componentize_py_types import Err
from wit_world.imports import dev_source
from wit_world.imports import host, types  # noqa: F401  (for the handler)


class Sources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the handler's modules from the texts `dev` handed over."""

    def __init__(self, files):
        self.modules = {}
        for path, text in files:
            if not path.endswith(".py"):
                continue
            name = path[: -len(".py")].replace("/", ".")
            package = name == "__init__" or name.endswith(".__init__")
            if package:
                name = name[: -len(".__init__")] if name != "__init__" else ""
            if name:
                self.modules[name] = (path, text, package)

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        file, _text, package = self.modules[name]
        return importlib.util.spec_from_loader(name, self, origin=file, is_package=package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        file, text, _package = self.modules[module.__name__]
        module.__file__ = file
        exec(compile(text, file, "exec"), module.__dict__)


handler = None


class WitWorld(wit_world.WitWorld):
    def load(self):
        global handler
        sources = Sources(dev_source.files())
        if "app" not in sources.modules:
            raise Err("no app.py among the sources")
        for name in sources.modules:
            sys.modules.pop(name, None)
        sys.meta_path.insert(0, sources)
        try:
            world = importlib.import_module("app").WitWorld
            # The handler implements the `plugin` world; `load` is ours.
            world.__abstractmethods__ = frozenset(world.__abstractmethods__ - {"load"})
            handler = world()
        except Exception as err:
            # The cause first: the log line shows its start.
            raise Err(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    def handle(self, event):
        if handler is None:
            raise RuntimeError("the dev loader's handle ran before load")
        return handler.handle(event)
