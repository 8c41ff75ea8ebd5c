"""Lazy registration of ``experts_implementation="moekit"`` with transformers, installed by ``import moekit``.

Importing ``transformers.integrations.moe`` (where transformers keeps its experts implementations) takes about
two seconds on a CPU machine, so ``import moekit`` does not do it. Instead, when transformers has already
imported that module, moekit registers at once; otherwise a finder on ``sys.meta_path`` waits for transformers
to import it (which every MoE model class does) and registers right after. Either way
``from_pretrained(..., experts_implementation="moekit")`` works after a plain ``import moekit``; ``import
moekit.hf`` registers eagerly as before.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

TARGET = "transformers.integrations.moe"


def _register() -> None:
    try:
        from .hf.experts import register

        register()
    except Exception as exc:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"moekit could not register experts_implementation='moekit' with transformers ({exc}); "
                      "import moekit.hf to see the error", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then registers moekit; every other attribute is the real loader's."""

    def __init__(self, real):
        self._real = real

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._real.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' experts module is loaded, else once it is (idempotent)."""
    if TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
