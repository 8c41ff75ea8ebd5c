"""Plugins: Python files that register custom routers (or ``compare`` methods) for the ``moekit`` command.

A plugin is an ordinary Python file, for example ``my_router.py``::

    import moekit
    from moekit.routing import register
    from moekit.routing.topk import TopKRouter

    @register("my_router")
    class MyRouter(TopKRouter):
        ...

    moekit.compare.register_method("my-method", router="my_router", aux_loss=None)

Name it with ``--plugin my_router.py`` (repeatable, accepted by every subcommand) or list it in the environment
variable ``MOEKIT_PLUGINS`` (paths separated by ``os.pathsep``, ``:`` on Linux and macOS). The files are loaded
with :mod:`importlib` from their paths before the command line is validated, so ``--router my_router`` and
``moekit train --help`` know the new names. ``moekit train`` records the absolute paths of the plugins it
loaded in the run's ``config.json`` (key ``plugins``); ``eval``, ``generate``, ``trace``, ``report``,
``export`` and ``train --resume`` of that run load them again by themselves, and stop with a one-line error
when a recorded file no longer exists.

Loading a plugin *executes* the Python file you named, with your permissions, exactly like ``python FILE``:
name only files you trust. Nothing is ever unpickled. Each file is executed at most once per process (keyed
by its resolved path), so naming it twice, or both on the command line and in a run's ``config.json``, is
harmless.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ENV_VAR = "MOEKIT_PLUGINS"

_LOADED: dict[str, ModuleType] = {}  # resolved path -> module


def _resolve(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    try:
        p = p.resolve()
    except OSError:
        p = p.absolute()
    if not p.is_file():
        raise ValueError(f"{what} {path} does not exist" if not p.exists() else f"{what} {path} is not a file")
    return p


def load_plugin(path: str | os.PathLike, what: str = "plugin") -> ModuleType:
    """Execute the Python file ``path`` as a module (once per process) and return it.

    ``ValueError`` in one line when the file is missing or raises while it runs (its exception's type and
    message are named; run ``python FILE`` to see the whole traceback).
    """
    p = _resolve(path, what)
    key = str(p)
    if key in _LOADED:
        return _LOADED[key]
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    name = f"moekit_plugin_{''.join(c if c.isalnum() else '_' for c in p.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ValueError(f"{what} {path} cannot be loaded as a Python module (name it *.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error of the user's file becomes one line
        sys.modules.pop(name, None)
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{what} {path} failed while loading: {type(exc).__name__}"
                         + (f": {text}" if text else "")) from None
    _LOADED[key] = module
    return module


def env_plugins() -> list[str]:
    """The paths listed in ``$MOEKIT_PLUGINS`` (``os.pathsep``-separated; empty entries skipped)."""
    return [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]


def load_plugins(paths, what: str = "plugin") -> list[str]:
    """Load every file of ``paths`` in order; returns their resolved absolute paths without duplicates."""
    out: list[str] = []
    for path in paths:
        load_plugin(path, what)
        key = str(_resolve(path, what))
        if key not in out:
            out.append(key)
    return out


def plugins_from_argv(argv) -> list[str]:
    """The values of ``--plugin FILE`` / ``--plugin=FILE`` in ``argv`` (what the parser will accept later)."""
    found, argv = [], list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            break
        if a == "--plugin":
            if i + 1 < len(argv):
                found.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--plugin="):
            found.append(a.split("=", 1)[1])
        i += 1
    return found


def load_command_plugins(argv) -> list[str]:
    """Load ``$MOEKIT_PLUGINS`` then the ``--plugin`` files of ``argv``; their resolved paths, in that order,
    each once."""
    out = load_plugins(env_plugins(), f"{ENV_VAR} plugin")
    return out + [p for p in load_plugins(plugins_from_argv(argv), "--plugin") if p not in out]


def load_run_plugins(run_config: dict, run_dir=None) -> list[str]:
    """Load the plugin files a run's ``config.json`` records (key ``plugins``); ``ValueError`` in one line when
    one is missing."""
    recorded = run_config.get("plugins") or []
    if not isinstance(recorded, list) or not all(isinstance(p, str) for p in recorded):
        raise ValueError(f"{run_dir or 'run'}/config.json: 'plugins' must be a list of file paths")
    for path in recorded:
        if not Path(path).is_file():
            raise ValueError(f"{run_dir or 'the run'} was trained with plugin {path}, which no longer exists; "
                             "restore the file or edit 'plugins' in its config.json")
        load_plugin(path, "plugin")
    return list(recorded)


def loaded() -> list[str]:
    """Resolved paths of every plugin file loaded in this process, in load order."""
    return list(_LOADED)
