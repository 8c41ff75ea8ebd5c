"""Small helpers shared by test files (the tests directory is on sys.path, see conftest.py)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def working_folder(path: Path):
    """Run inside ``path`` with the corpus cache under it (``MOEKIT_CACHE``); both restored afterwards."""
    old_cwd, old_cache = os.getcwd(), os.environ.get("MOEKIT_CACHE")
    os.environ["MOEKIT_CACHE"] = str(path / "cache")
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("MOEKIT_CACHE", None)
        else:
            os.environ["MOEKIT_CACHE"] = old_cache


def autograd_node_names(out) -> set[str]:
    """The names of every autograd node ``out`` depends on."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return {node.name() for node in seen}
