"""Safetensors storage and atomic writes: the one writer of folders and files for the whole project.

* :func:`atomic_dir` -- build a folder under a temporary name beside its destination, rename it into
  place when complete (checkpoints, exports, converted assets); nothing half-written is ever visible.
* :func:`save_file_atomic` -- one safetensors file, written under a temporary name then renamed
  (the calibration resume store).
* :func:`write_safetensors` / :func:`weight_files` / :class:`TensorReader` -- a model's tensors as one
  ``model.safetensors`` or index + shards, and reading them back (safetensors only: no pickle).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import RcsrError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"


def natural_key(name: str):
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _normalize_permissions(root: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files): give the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out_dir``; on success move it to ``out_dir`` atomically.

    An existing ``out_dir`` is an error unless ``overwrite``; then it is replaced in one rename."""
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RcsrError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _normalize_permissions(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise RcsrError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` under a temporary name in the same folder, then renamed to ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """``2000000``, ``"2GB"`` (10**9), ``"500MiB"`` (2**20) -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise RcsrError(f"max_shard_size {size!r} is not a size (e.g. 2GB, 500MB, 1GiB or a byte count)")
        n = int(float(m.group(1)) * (_SIZE_UNITS[m.group(2).lower()] if m.group(2) else 1))
    if n <= 0:
        raise RcsrError(f"max_shard_size {size!r} must be positive")
    return n


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    names = sorted(tensors, key=natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        t = tensors[n]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        files = [SAFE_WEIGHTS_NAME]
    else:
        total = len(shards)
        files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    weight_map = {}
    total_size = 0
    for fname, shard in zip(files, shards):
        part = {}
        for n in shard:
            t = tensors[n].detach().to("cpu").contiguous()
            part[n] = t
            total_size += t.numel() * t.element_size()
            weight_map[n] = fname
        save_file(part, str(folder / fname), metadata=meta)
        del part
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        with open(folder / SAFE_INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return files


def weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a checkpoint folder (single file or index + shards)."""
    index = ckpt_dir / SAFE_INDEX_NAME
    single = ckpt_dir / SAFE_WEIGHTS_NAME
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RcsrError(f"{index}: not a valid safetensors index ({e})") from e
        for fname in sorted(set(wm.values())):
            if not (ckpt_dir / fname).is_file():
                raise RcsrError(f"{index}: lists {fname}, which does not exist")
        listed: dict[str, Path] = {}
        for fname in sorted(set(wm.values())):
            for name in file_keys(ckpt_dir / fname):
                if name in listed:
                    raise RcsrError(f"{name}: stored twice ({listed[name].name} and {fname})")
                listed[name] = ckpt_dir / fname
        for name, fname in wm.items():
            if listed.get(name) != ckpt_dir / fname:
                raise RcsrError(f"{index}: {name} is mapped to {fname} but is not stored there")
        return listed
    if single.is_file():
        return {name: single for name in file_keys(single)}
    raise RcsrError(f"{ckpt_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} (only safetensors checkpoints are read)")


def file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise RcsrError(f"{path}: cannot read safetensors file ({e})") from e


class TensorReader:
    """Reads named tensors from the files of a checkpoint, keeping each file open once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        h = self._open.get(path)
        if h is None:
            h = self._open[path] = safe_open(str(path), framework="pt")
        return h.get_tensor(name)
