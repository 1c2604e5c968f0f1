"""Restricted unpickling: the published feature pickles hold numpy arrays, lists, dicts, strings and numbers
only, so nothing else is ever constructed. A pickle naming any other class or function (a `__reduce__`
payload would run it) is refused with its name. `trusted_pickles()` (the CLI's --trust-pickle) opts out."""
from __future__ import annotations

import contextlib
import io
import pickle

ALLOWED = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
                                    "float", "complex", "bool", "slice", "range")
} | {
    (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),   # Python 3 writes bytes in protocol 2 via _codecs.encode
    ("__builtin__", "set"), ("__builtin__", "frozenset"),    # Python 2 names, mapped by fix_imports
}

_trusted = False


class RefusedPickle(pickle.UnpicklingError):
    pass


class _Restricted(pickle.Unpickler):
    def find_class(self, module, name):
        if _trusted or (module, name) in ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise RefusedPickle(f"{module}.{name}")


def load(f, encoding: str = "ASCII"):
    return _Restricted(f, encoding=encoding).load()


def loads(data: bytes, encoding: str = "ASCII"):
    return load(io.BytesIO(data), encoding=encoding)


def is_trusted() -> bool:
    return _trusted


@contextlib.contextmanager
def trusted_pickles(trust: bool = True):
    """Within the block, pickles (and .pt files) are loaded without restriction: for files you trust only."""
    global _trusted
    before, _trusted = _trusted, trust
    try:
        yield
    finally:
        _trusted = before
