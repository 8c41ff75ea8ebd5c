"""Routers by name: ``moekit.routing.get(name)`` returns a Router class.

Every router is constructed as ``cls(dim=..., num_experts=..., top_k=..., **options)`` and called on
``x_TD`` (plus an optional :class:`RoutingContext`), returning a :class:`Routing`.
"""
from __future__ import annotations

from ..registry import Registry
from .base import MomentumState, Router, Routing, RoutingContext

_ROUTERS = Registry("router", Router)


def register(name: str):
    """Class decorator: make a Router available as ``moekit.routing.get(name)``."""
    return _ROUTERS.register(name)


def names() -> list[str]:
    """The registered router names, sorted."""
    return _ROUTERS.names()


def get(name: str) -> type[Router]:
    """The Router class registered as ``name``; ``ValueError`` naming the allowed values otherwise."""
    return _ROUTERS.get(name)


def _import_router_modules() -> None:
    """Import every module of this package so that each registers its routers (one file per family)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_router_modules()

from .offsets import load_logit_offsets, logit_offsets, save_logit_offsets  # noqa: E402

__all__ = ["MomentumState", "Router", "Routing", "RoutingContext", "get", "names", "register", "logit_offsets",
           "save_logit_offsets", "load_logit_offsets"]
