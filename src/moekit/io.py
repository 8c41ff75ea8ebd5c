"""Atomic file writes and safe readers shared by the trainer, traces and exports.

Every file moekit writes goes to a temporary name in the destination folder and is renamed into place
(``os.replace``), so an interruption leaves either the old file or the new one, never a torn one. Weights are
safetensors, metadata JSON: nothing a user loads is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(path: str | os.PathLike) -> Path:
    """A new empty temporary file beside ``path`` with ordinary permissions (0666 less the umask), to be
    renamed onto ``path`` once written."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


_tmp_path = temp_sibling


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
