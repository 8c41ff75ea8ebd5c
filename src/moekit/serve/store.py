"""Expert store: a model's experts on disk, one safetensors file per (layer, expert), read straight into cache
slots; the non-expert weights beside them in one safetensors file; a JSON manifest naming the model.

Layout of a store folder (``moekit offload SRC OUT`` writes it, :func:`write_store` in Python)::

    OUT/
      manifest.json            {"format": "moekit-expert-store", "version": 1, "model": {...}, "layers": [...]}
      nonexpert.safetensors    every tensor of the model that is not a routed expert's (embeddings, attention,
                               norms, routers, shared experts)
      experts/l000/e0000.safetensors   layer 0, expert 0: its tensors without the expert dimension
      ...                              (moekit / transformers names: gate_up_proj [H, D], down_proj [D, F], ...)

The manifest's ``model`` record identifies the model (``kind``: ``moekit-run`` or ``transformers``, its config,
and ``fingerprint``: a SHA-256 over the names, shapes and bytes of the router weights), so that a store is never
served under another model: :meth:`ExpertStore.check_model` names the difference. Every layer record holds the
tensor shapes and dtypes of one expert and the exact byte size of an expert file; :meth:`ExpertStore.open`
checks that every expert file exists and has that size (a missing or truncated file is one clear error before
any work), and every read checks the file's safetensors header against the layer's (a file copied from another
layer or model is refused).

Reads. The safetensors header of each layer is parsed once (the format: 8-byte little-endian header length, the
JSON header, then the tensors' bytes at ``data_offsets``); an expert is then read with one ``os.preadv`` call
straight into the cache slot's memory (no intermediate tensor, no second copy), which releases the GIL so a
background prefetch overlaps compute. :meth:`ExpertStore.read` (whole expert as new tensors, through
safetensors' memory-mapped ``safe_open``) is the reference path the tests compare against.

Warm and cold reads. After the first read of a file its pages stay in the operating system's page cache, and
later reads of the same expert are memory copies ("warm"). :meth:`ExpertStore.drop_pages` asks the kernel to
drop a file's cached pages with ``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` (clean pages are dropped at
once on Linux); ``cold=True`` in :class:`moekit.serve.cache.ExpertCache` drops every expert file before serving
and each file again right after it is read, so every miss reads the disk, as for a model larger than memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..io import read_json, temp_sibling_dir

__all__ = ["STORE_FORMAT", "STORE_VERSION", "ExpertStore", "StoreLayer", "fingerprint", "is_store", "write_store"]

STORE_FORMAT = "moekit-expert-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
NONEXPERT = "nonexpert.safetensors"

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the sorted names, shapes, dtypes and bytes of ``tensors`` (the routers of a model)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_store(path) -> bool:
    """Whether ``path`` is a folder holding a store manifest."""
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class StoreLayer:
    """One MoE layer of a store: where it lives in the model, its experts and the layout of one expert file."""

    index: int
    module: str                       # the experts module's name in the model (e.g. ``blocks.0.mlp.experts``)
    num_experts: int
    top_k: int
    tensors: dict                     # name -> {"shape": [...], "dtype": "F32"}
    file_bytes: int                   # exact size of every expert file of the layer
    expert_bytes: int                 # bytes of one expert's tensors

    def empty(self, num: int | None = None) -> dict[str, torch.Tensor]:
        """New uninitialised tensors for one expert (``num`` None) or ``num`` stacked experts."""
        lead = () if num is None else (num,)
        return {n: torch.empty(*lead, *spec["shape"], dtype=_DTYPES[spec["dtype"]]) for n, spec in self.tensors.items()}


def _header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"expert file {path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"expert file {path} is not a safetensors file")
        head = f.read(n)
    if len(head) < n:
        raise ValueError(f"expert file {path} is truncated (header)")
    try:
        return raw + head, json.loads(head)
    except json.JSONDecodeError:
        raise ValueError(f"expert file {path} is not a safetensors file (bad header)") from None


class ExpertStore:
    """A store folder opened for reading (see the module docstring). ``ValueError`` naming the problem when the
    manifest is missing or of another format, or an expert file is missing or has the wrong size."""

    def __init__(self, path, check_files: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"expert store {self.path} does not exist")
        if not (self.path / MANIFEST).is_file():
            raise ValueError(f"{self.path} is not an expert store (no {MANIFEST}; write one with moekit offload)")
        man = read_json(self.path / MANIFEST, "expert store manifest")
        if man.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.path}/{MANIFEST} is not an expert store manifest (format {man.get('format')!r})")
        if man.get("version") != STORE_VERSION:
            raise ValueError(f"expert store {self.path} has version {man.get('version')!r}; this moekit reads "
                             f"version {STORE_VERSION}")
        self.manifest = man
        self.model: dict = man.get("model", {})
        try:
            self.layers = [StoreLayer(i, r["module"], int(r["num_experts"]), int(r["top_k"]), dict(r["tensors"]),
                                      int(r["file_bytes"]), int(r["expert_bytes"]))
                           for i, r in enumerate(man["layers"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"expert store {self.path}: malformed layer record in {MANIFEST} ({exc})") from None
        self._layout: list[tuple[bytes, list[tuple[str, int, int]]] | None] = [None] * len(self.layers)
        if check_files:
            self.check_files()

    # ---------------------------------------------------------------------------------------------- checks
    def file(self, layer: int, expert: int) -> Path:
        return self.path / "experts" / f"l{layer:03d}" / f"e{expert:04d}.safetensors"

    def check_files(self) -> None:
        """Every expert file present with its layer's exact size (cheap: one ``stat`` per file)."""
        for spec in self.layers:
            for e in range(spec.num_experts):
                p = self.file(spec.index, e)
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    raise ValueError(f"expert store {self.path}: expert file of layer {spec.index} expert {e} is "
                                     f"missing ({p.relative_to(self.path)})") from None
                if size != spec.file_bytes:
                    raise ValueError(f"expert store {self.path}: expert file of layer {spec.index} expert {e} is "
                                     f"truncated or damaged ({size} bytes, expected {spec.file_bytes})")

    def check_model(self, identity: dict) -> None:
        """``ValueError`` when the store was written for another model than ``identity`` (see :func:`identity`
        in :mod:`moekit.serve.offload`): kind, config or router fingerprint differ."""
        mine = self.model
        for key in ("kind", "config", "fingerprint"):
            if key in identity and mine.get(key) != identity[key]:
                what = {"kind": "a different kind of model", "config": "a model with another configuration",
                        "fingerprint": "a model with other router weights"}[key]
                raise ValueError(f"expert store {self.path} was written by {what} than the one being served "
                                 f"({key} differs); write a store for this model with moekit offload")

    # ---------------------------------------------------------------------------------------------- reads
    def _layer_layout(self, layer: int):
        got = self._layout[layer]
        if got is None:
            spec = self.layers[layer]
            raw, head = _header(self.file(layer, 0))
            base = len(raw)
            items = []
            for name, info in head.items():
                if name == "__metadata__":
                    continue
                want = spec.tensors.get(name)
                if want is None or list(info["shape"]) != list(want["shape"]) or info["dtype"] != want["dtype"]:
                    raise ValueError(f"expert store {self.path}: layer {layer} expert 0 holds {name} "
                                     f"{info.get('dtype')} {info.get('shape')}, not what the manifest says")
                b, e = info["data_offsets"]
                items.append((name, base + b, base + e))
            if sorted(n for n, _, _ in items) != sorted(spec.tensors):
                raise ValueError(f"expert store {self.path}: layer {layer} expert 0 does not hold the tensors "
                                 f"{sorted(spec.tensors)}")
            items.sort(key=lambda t: t[1])
            got = (raw, items, head)
            self._layout[layer] = got
        return got

    def read_into(self, layer: int, expert: int, dest: dict[str, torch.Tensor], drop: bool = False) -> int:
        """Read expert ``expert`` of layer ``layer`` into the contiguous CPU tensors ``dest`` (one per tensor name,
        the expert's shape and dtype) with one ``preadv``; returns the bytes read. ``drop``: afterwards drop the
        file's pages from the page cache (cold reads)."""
        spec = self.layers[layer]
        raw, items, head = self._layer_layout(layer)
        header = bytearray(len(raw))
        bufs: list = [header]
        pos = len(raw)
        for name, b, e in items:
            if b > pos:
                bufs.append(bytearray(b - pos))
            t = dest[name]
            if not t.is_contiguous() or t.numel() * t.element_size() != e - b:
                raise ValueError(f"read_into: destination {name} has the wrong size or is not contiguous")
            bufs.append(t.view(-1).view(torch.uint8).numpy())
            pos = e
        path = self.file(layer, expert)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ValueError(f"expert store {self.path}: expert file of layer {layer} expert {expert} is missing "
                             f"({path.relative_to(self.path)})") from None
        try:
            n = os.preadv(fd, bufs, 0)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if n != pos or n != spec.file_bytes:
            raise ValueError(f"expert store {self.path}: expert file of layer {layer} expert {expert} is truncated "
                             f"({n} bytes read, expected {spec.file_bytes})")
        if bytes(header) != raw and not _same_header(bytes(header), head):
            raise ValueError(f"expert store {self.path}: expert file of layer {layer} expert {expert} does not "
                             f"belong to this layer (its safetensors header differs)")
        return n

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The expert's tensors as new tensors, through safetensors' memory-mapped ``safe_open`` (reference)."""
        from safetensors import safe_open

        with safe_open(str(self.file(layer, expert)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def drop_pages(self, layers: Iterable[int] | None = None) -> None:
        """Drop the page-cache pages of every expert file (of ``layers``): the next reads go to the disk."""
        for l in (range(len(self.layers)) if layers is None else layers):
            for e in range(self.layers[l].num_experts):
                fd = os.open(self.file(l, e), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def nonexpert_tensors(self) -> dict[str, torch.Tensor]:
        """The non-expert weights (loaded into memory)."""
        from ..io import load_safetensors

        return load_safetensors(self.path / NONEXPERT, "non-expert weights of the store")

    @property
    def expert_bytes_total(self) -> int:
        return sum(s.expert_bytes * s.num_experts for s in self.layers)

    def __repr__(self) -> str:
        return (f"ExpertStore({str(self.path)!r}, {len(self.layers)} layers, "
                f"{self.expert_bytes_total / 2**20:.1f} MiB of experts)")


def _same_header(raw: bytes, head: dict) -> bool:
    """Whether a file's header bytes describe the same tensors and metadata as ``head`` (safetensors writes the
    metadata keys in no fixed order, so equal headers need not be equal bytes)."""
    try:
        return json.loads(raw[8:]) == head
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


_SAFE_DTYPE = {v: k for k, v in _DTYPES.items()}


def write_store(out, nonexpert: dict[str, torch.Tensor], layers: list[dict], model: dict,
                progress: Callable[[int], None] | None = None) -> Path:
    """Write a store folder at ``out`` (must not exist; written to a temporary sibling, then renamed).

    ``layers``: one dict per MoE layer in execution order with ``module`` (name), ``top_k`` and ``experts``: a
    mapping tensor name -> stacked tensor ``[E, ...]`` (one slice per expert). ``model``: the identity record.
    ``progress(n)`` is called after each expert file."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder for the expert store")
    if not out.parent.is_dir():
        raise ValueError(f"the folder {out.parent} does not exist")
    tmp = temp_sibling_dir(out)
    try:
        records = []
        for l, layer in enumerate(layers):
            stacked = layer["experts"]
            E = {int(t.shape[0]) for t in stacked.values()}
            if len(E) != 1:
                raise ValueError(f"layer {l}: expert tensors disagree on the number of experts")
            E = E.pop()
            folder = tmp / "experts" / f"l{l:03d}"
            folder.mkdir(parents=True)
            meta = {"format": STORE_FORMAT, "layer": str(l)}
            for e in range(E):
                save_file({k: v[e].detach().contiguous() for k, v in stacked.items()},
                          str(folder / f"e{e:04d}.safetensors"), metadata=meta)
                if progress is not None:
                    progress(1)
            tensors = {k: {"shape": list(v.shape[1:]), "dtype": _SAFE_DTYPE[v.dtype]} for k, v in stacked.items()}
            records.append({"module": layer["module"], "num_experts": E, "top_k": int(layer["top_k"]),
                            "tensors": tensors, "file_bytes": (folder / "e0000.safetensors").stat().st_size,
                            "expert_bytes": sum(v[0].numel() * v.element_size() for v in stacked.values())})
        save_file({k: v.detach().contiguous() for k, v in nonexpert.items()}, str(tmp / NONEXPERT),
                  metadata={"format": STORE_FORMAT})
        man = {"format": STORE_FORMAT, "version": STORE_VERSION, "model": model, "layers": records}
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
