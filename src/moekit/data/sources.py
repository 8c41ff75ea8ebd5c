"""Where documents come from: the Python standard library (the embedded default corpus) or the user's text.

A :class:`Document` is one unit of the train/validation split: a relative ``path`` (the split key), a
``domain`` (used for per-domain evaluation) and its raw bytes.

Standard library (``stdlib_documents``), located at run time with ``sysconfig.get_paths()["stdlib"]``:

* every ``*.py`` file, walked without following links, skipping any directory named ``test``, ``tests`` or
  ``idle_test`` (so ``test/``, ``idlelib/idle_test``, ``lib2to3/tests``, ``unittest/test``, ...), ``__pycache__``,
  ``site-packages``, ``dist-packages``, hidden directories, the build-specific ``config-*`` directory and
  ``_sysconfigdata*`` modules (which differ between machines);
* domain: the top-level package for files inside a package (``email/mime/text.py`` -> ``email``), and the
  shared domain ``toplevel`` for single-file modules (``os.py``, ``json`` is a package so it is ``json``);
* ``pydoc_data/topics.py`` is not taken as code: its ``topics`` dict (read with ``ast``, never imported) gives
  one plain-text document per topic, domain ``pydoc``, path ``pydoc_data/topics.py#<topic>`` -- one document per
  topic so the documentation lands in both splits.

User text (``text_documents``): a file, or every regular file under a folder (recursively, sorted, hidden
files and folders skipped, and FIFOs, sockets and devices too); files that contain NUL bytes or are not valid UTF-8 are skipped as binary. Domain: the
top-level subfolder for files inside one, the file stem for files directly in the folder (or a single file).
"""
from __future__ import annotations

import ast
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
TOPLEVEL_DOMAIN = "toplevel"
PYDOC_DOMAIN = "pydoc"
PYDOC_TOPICS = "pydoc_data/topics.py"


@dataclass(frozen=True)
class Document:
    path: str  # relative POSIX path (the split key)
    domain: str
    data: bytes


def stdlib_dir() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_stdlib_dir(name: str) -> bool:
    return name in STDLIB_SKIP_DIRS or name.startswith(".") or name.startswith("config-")


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the standard library's code files (see the module docstring), sorted."""
    root = Path(root) if root is not None else stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not _skip_stdlib_dir(d))
        if rel_dir.parts[:1] == ("pydoc_data",):
            continue
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def stdlib_domain(rel_path: str) -> str:
    parts = rel_path.split("/")
    return parts[0] if len(parts) > 1 else TOPLEVEL_DOMAIN


def pydoc_topics(root: Path | None = None) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py`` (topic name -> text), parsed without importing it."""
    root = Path(root) if root is not None else stdlib_dir()
    path = root / PYDOC_TOPICS
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in topics.items() if isinstance(v, str) and v.strip()}
    return {}


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """The embedded corpus: standard-library code files plus the pydoc topics (see the module docstring)."""
    root = Path(root) if root is not None else stdlib_dir()
    docs = [Document(rel, stdlib_domain(rel), (root / rel).read_bytes()) for rel in stdlib_files(root)]
    docs += [Document(f"{PYDOC_TOPICS}#{name}", PYDOC_DOMAIN, text.encode("utf-8"))
             for name, text in sorted(pydoc_topics(root).items())]
    return [d for d in docs if d.data]


def is_text(data: bytes) -> bool:
    """True for UTF-8 text without NUL bytes."""
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _user_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # Regular files only: reading a FIFO, socket or device found in the folder would block or never end.
        files += [Path(dirpath) / n for n in filenames if not n.startswith(".") and os.path.isfile(Path(dirpath) / n)]
    return sorted(files)


def text_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)`` of a user ``--data`` path: a file (root = its folder) or every non-hidden file under a
    folder. Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a folder without files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
    files = _user_files(path)
    if not files:
        raise ValueError(f"data folder {str(path)!r} contains no files")
    return path, files


def text_documents(path: str | os.PathLike) -> list[Document]:
    """Documents of a user text file or folder (``--data PATH``); see the module docstring.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a folder without files or input
    without any usable (non-empty UTF-8) text.
    """
    root, files = text_files(path)
    docs, skipped = [], 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError:
            skipped += 1
            continue
        if not data or not is_text(data):
            skipped += 1
            continue
        rel = file.relative_to(root)
        domain = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        docs.append(Document(rel.as_posix(), domain or "text", data))
    if not docs:
        raise ValueError(f"data path {str(path)!r} has no usable text: {skipped} file(s) skipped as empty, "
                         "binary or not UTF-8")
    return docs
