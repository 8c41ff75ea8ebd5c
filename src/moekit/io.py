"""Atomic file writes and safe readers shared by the trainer, traces and exports.

Every file moekit writes goes to a temporary name in the destination folder and is renamed into place
(``os.replace``), so an interruption leaves either the old file or the new one, never a torn one. Weights are
safetensors, metadata JSON: nothing a user loads is ever unpickled.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary names carry the writer's process id, so that a later command can tell the leftovers of a killed
# write (their process is gone) from a write still in progress: ``.<name>.moekit-<pid>-<random>.tmp``.
_TEMP_RE = re.compile(r"^\..+\.moekit-(\d+)-[A-Za-z0-9_]+\.tmp$")


def temp_sibling(path: str | os.PathLike) -> Path:
    """A new empty temporary file beside ``path`` with ordinary permissions (0666 less the umask), to be
    renamed onto ``path`` once written."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.moekit-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


_tmp_path = temp_sibling


def temp_sibling_dir(path: str | os.PathLike) -> Path:
    """A new empty temporary folder beside ``path`` (its parent is created if missing) with ordinary permissions
    (0777 less the umask; ``mkdtemp`` alone makes it private), to be renamed onto ``path`` once filled."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.moekit-{os.getpid()}-", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or unknowable: keep its file
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes of moekit left in ``folder`` (not recursive): only names
    made by :func:`temp_sibling` whose writing process no longer exists. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False) or _process_alive(int(match.group(1))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def os_error_text(exc: OSError) -> str:
    """One line for an ``OSError``: what went wrong and the path(s) involved."""
    what = exc.strerror or exc.__class__.__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    return f"{what}: {' -> '.join(str(os.fsdecode(p)) for p in paths)}" if paths else str(exc) or what


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Parse a JSON object; ``ValueError`` with one sentence on a missing, unreadable or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return obj


def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a safetensors file; ``ValueError`` with one sentence when it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what} {path} is unreadable or truncated ({str(exc).splitlines()[0][:120]})") from None
