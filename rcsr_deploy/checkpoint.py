"""Quantized checkpoints (format_version 1, see docs/FORMAT.md): write, validate, read, dequantize.

A checkpoint is a normal Hugging Face model folder.  For every quantized ``nn.Linear`` ``<m>`` its
``<m>.weight`` is replaced by ``<m>.qweight`` (int32, packed codes), ``<m>.scales`` (float16),
``<m>.zeros`` (uint8, asymmetric only) and ``<m>.group_index`` (int32, dynamic act-order only);
``config.json`` carries a ``quantization_config`` with ``quant_method: "rcsr"``.

Public API:

* :class:`QuantizedTensor` -- one quantized linear in memory (unpacked codes + grid).
* :func:`save_quantized` -- write a whole model atomically.
* :func:`validate_quant_config` / :func:`read_quant_config` -- the ``quantization_config`` checks.
* :func:`load_quantized_tensors` -- read and validate every quantized linear (safetensors only).
* :func:`load_fake_quant_model` -- HF model whose quantized weights are the dequantized fp32 values.
* :func:`export_dequantized` -- a plain HF checkpoint of those dequantized weights.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import RcsrError
from .grid import QuantSpec, dequantize as grid_dequantize
from .packing import pack_codes, unpack_codes

QUANT_METHOD = "rcsr"
FORMAT_VERSION = 2  # what the writer uses when a vocabulary table is quantized (section 9 of docs/FORMAT.md)
READ_VERSIONS = (1, 2)  # 1: decoder linears only; 2: adds quantized vocabulary tables (lm_head / tied embedding)
PACKING = "int32-lsb-bitstream"
SCALE_DTYPE = "float16"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
ACT_ORDERS = ("none", "static", "dynamic")
#: tensor-name suffixes that replace ``<m>.weight`` of a quantized module
QUANT_SUFFIXES = ("qweight", "scales", "zeros", "group_index")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def _shape(t: torch.Tensor | tuple | list) -> str:
    dims = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return "[" + ", ".join(str(int(d)) for d in dims) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# QuantizedTensor
# --------------------------------------------------------------------------------------------------
@dataclass
class QuantizedTensor:
    """One quantized linear layer: ``w[o, i] = (codes[o, i] - zero[o, g(i)]) * scale[o, g(i)]``.

    * ``codes``: uint8 (or any integer/integer-valued tensor) ``[out, in]``, values in ``[0, 2**bits)``.
    * ``scale``: fp32 or fp16 ``[out, n_groups]``; must be exactly representable in float16
      (grid.compute_grid already rounds scales to float16).
    * ``zero``: integer-valued ``[out, n_groups]``; for ``spec.sym`` it must be ``2**(bits-1)`` everywhere.
    * ``g_idx``: int ``[in]`` group of each input column (dynamic act order) or ``None`` (static groups).
    * ``bias``: the linear's bias or ``None``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    spec: QuantSpec
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return self.spec.groups(self.in_features)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[out, in]`` weights (grid.dequantize)."""
        return grid_dequantize(self.codes, self.scale, self.zero, self.spec, self.g_idx)

    def validate(self, name: str = "layer") -> None:
        """Raise RcsrError unless the tensors are mutually consistent and storable in format v1."""
        spec = self.spec
        if self.codes.dim() != 2:
            raise RcsrError(f"{name}: codes must be 2-D [out, in], got {_shape(self.codes)}")
        out_f, in_f = self.codes.shape
        spec.validate(in_f, name)
        ng = spec.groups(in_f)
        for what, t in (("scale", self.scale), ("zero", self.zero)):
            if tuple(t.shape) != (out_f, ng):
                raise RcsrError(f"{name}: {what} must be [{out_f}, {ng}] for {in_f} in-features at group size "
                                f"{spec.group_size}, got {_shape(t)}")
        if self.codes.is_floating_point() and not torch.equal(self.codes, torch.round(self.codes)):
            raise RcsrError(f"{name}: codes are not integer-valued")
        if self.codes.numel():
            lo, hi = torch.aminmax(self.codes)
            if int(lo) < 0 or int(hi) > spec.maxq:
                raise RcsrError(f"{name}: codes out of range [0, {spec.maxq}] for {spec.bits} bits")
        if self.scale.dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
            raise RcsrError(f"{name}: scale must be a float tensor, got {_dtype_name(self.scale.dtype)}")
        s = self.scale.detach().float()
        s16 = s.to(torch.float16)
        if not bool(torch.isfinite(s16).all()):
            raise RcsrError(f"{name}: scale has non-finite values (or values beyond the float16 range)")
        if not torch.equal(s16.float(), s):
            raise RcsrError(f"{name}: scale is not exactly representable in float16 "
                            "(round scales to float16 before choosing codes, as grid.compute_grid does)")
        z = self.zero.detach()
        zf = z.double()
        if not torch.equal(zf, torch.round(zf)):
            raise RcsrError(f"{name}: zero points are not integer-valued")
        if spec.sym:
            if z.numel() and not bool((zf == float(1 << (spec.bits - 1))).all()):
                raise RcsrError(f"{name}: symmetric grid needs zero == {1 << (spec.bits - 1)} everywhere "
                                "(the format stores no zeros for sym)")
        elif z.numel() and (float(zf.min()) < 0 or float(zf.max()) > spec.maxq):
            raise RcsrError(f"{name}: zero points out of range [0, {spec.maxq}] for {spec.bits} bits")
        if self.g_idx is not None:
            _check_group_index(self.g_idx, in_f, ng, spec, name + ".g_idx")
        if self.bias is not None and tuple(self.bias.shape) != (out_f,):
            raise RcsrError(f"{name}: bias must be [{out_f}], got {_shape(self.bias)}")

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """On-disk tensors ``{prefix}.qweight/.scales[/.zeros][/.group_index][/.bias]`` (CPU, contiguous)."""
        self.validate(prefix)
        codes = self.codes.detach().to("cpu")
        out: dict[str, torch.Tensor] = {
            f"{prefix}.qweight": pack_codes(codes, self.spec.bits).contiguous(),
            f"{prefix}.scales": self.scale.detach().to("cpu", torch.float32).to(torch.float16).contiguous(),
        }
        if not self.spec.sym:
            out[f"{prefix}.zeros"] = self.zero.detach().to("cpu", torch.float64).round().to(torch.uint8).contiguous()
        if self.g_idx is not None:
            out[f"{prefix}.group_index"] = self.g_idx.detach().to("cpu", torch.int32).contiguous()
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.detach().to("cpu").contiguous()
        return out


def _check_group_index(g: torch.Tensor, in_f: int, ng: int, spec: QuantSpec, name: str) -> None:
    if g.dim() != 1 or g.shape[0] != in_f:
        raise RcsrError(f"{name}: expected int32 [{in_f}], got {_dtype_name(g.dtype)} {_shape(g)}")
    if g.is_floating_point() or g.dtype == torch.bool or g.is_complex():
        raise RcsrError(f"{name}: expected an integer tensor, got {_dtype_name(g.dtype)}")
    gl = g.long()
    if in_f and (int(gl.min()) < 0 or int(gl.max()) >= ng):
        raise RcsrError(f"{name}: values must lie in [0, {ng}), got [{int(gl.min())}, {int(gl.max())}]")
    counts = torch.bincount(gl.cpu(), minlength=ng)
    glen = spec.group_len(in_f)
    if not bool((counts == glen).all()):
        raise RcsrError(f"{name}: every group must hold exactly {glen} input columns "
                        f"(got group sizes between {int(counts.min())} and {int(counts.max())})")


# --------------------------------------------------------------------------------------------------
# quantization_config
# --------------------------------------------------------------------------------------------------
def validate_quant_config(qc: object, where: str = "quantization_config") -> dict:
    """Check a ``quantization_config`` dict; return it unchanged (RcsrError naming the bad field)."""
    if not isinstance(qc, Mapping):
        raise RcsrError(f"{where} must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise RcsrError(f"{where}.quant_method is {method!r}, expected {QUANT_METHOD!r}")
    if "format_version" not in qc:
        raise RcsrError(f"{where}.format_version is missing")
    ver = qc["format_version"]
    if type(ver) is not int or ver not in READ_VERSIONS:
        raise RcsrError(f"{where}.format_version {ver!r} is not supported "
                        f"(this rcsr-deploy reads format_version {' and '.join(map(str, READ_VERSIONS))}; "
                        "upgrade rcsr-deploy)")
    for key in ("bits", "group_size", "sym", "act_order", "quantized_modules"):
        if key not in qc:
            raise RcsrError(f"{where}.{key} is missing")
    bits, gs = qc["bits"], qc["group_size"]
    if type(bits) is not int or bits not in SUPPORTED_BITS:
        raise RcsrError(f"{where}.bits {bits!r} is not supported (choose 2, 3, 4 or 8)")
    if type(gs) is not int or gs not in SUPPORTED_GROUP_SIZES:
        raise RcsrError(f"{where}.group_size {gs!r} is not supported (choose 32, 64, 128 or -1 for per-channel)")
    if type(qc["sym"]) is not bool:
        raise RcsrError(f"{where}.sym must be true or false, got {qc['sym']!r}")
    if qc["act_order"] not in ACT_ORDERS:
        raise RcsrError(f"{where}.act_order {qc['act_order']!r} is not supported (none, static or dynamic)")
    mods = qc["quantized_modules"]
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
        raise RcsrError(f"{where}.quantized_modules must be a non-empty list of module names")
    if len(set(mods)) != len(mods):
        raise RcsrError(f"{where}.quantized_modules lists a module twice")
    if qc.get("packing", PACKING) != PACKING:
        raise RcsrError(f"{where}.packing {qc['packing']!r} is not supported (expected {PACKING!r})")
    if qc.get("scale_dtype", SCALE_DTYPE) != SCALE_DTYPE:
        raise RcsrError(f"{where}.scale_dtype {qc['scale_dtype']!r} is not supported (expected {SCALE_DTYPE!r})")
    return dict(qc)


def _read_config_json(ckpt_dir: Path) -> dict:
    path = ckpt_dir / CONFIG_NAME
    if not path.is_file():
        raise RcsrError(f"{path}: config.json not found (not a model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise RcsrError(f"{path}: cannot read config.json ({e})") from e
    if not isinstance(cfg, dict):
        raise RcsrError(f"{path}: config.json is not a JSON object")
    return cfg


def read_quant_config(ckpt_dir: str | os.PathLike) -> dict:
    """The validated ``quantization_config`` of an rcsr checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    cfg = _read_config_json(ckpt_dir)
    if "quantization_config" not in cfg:
        raise RcsrError(f"{ckpt_dir / CONFIG_NAME} has no quantization_config: not a quantized rcsr checkpoint")
    return validate_quant_config(cfg["quantization_config"])


# --------------------------------------------------------------------------------------------------
# atomic directory writes
# --------------------------------------------------------------------------------------------------
@contextmanager
def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out_dir``; on success move it to ``out_dir`` atomically."""
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RcsrError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
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


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------
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


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _tied_weight_map(model) -> dict[str, str]:
    """``{target: source}`` of the model's declared tied parameters (transformers 4 and 5 semantics)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        try:
            tied = model.get_expanded_tied_weights_keys(all_submodels=True)
        except Exception:  # pragma: no cover - transformers internals vary
            tied = None
    if isinstance(tied, Mapping):
        return dict(tied)
    # transformers 4: _tied_weights_keys is a list of targets tied to the input embeddings
    keys = getattr(model, "_tied_weights_keys", None) or []
    cfg = getattr(model, "config", None)
    if not keys or not getattr(cfg, "tie_word_embeddings", False):
        return {}
    try:
        src = model.get_input_embeddings()
    except Exception:  # pragma: no cover
        return {}
    src_name = next((f"{n}.weight" for n, mod in model.named_modules() if mod is src), None)
    return {k: src_name for k in keys if src_name} if src_name else {}


def vocab_tables(model) -> set[str]:
    """Module names of the model's vocabulary tables: the input embedding and the output head."""
    mods = [f() for f in (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None))
            if f is not None]
    return {n for n, m in model.named_modules() if any(m is t for t in mods if t is not None)}


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _model_tensors(model, quantized: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Model state dict minus quantized weights and tied duplicates, with the quantized tensors added."""
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:   # as save_pretrained does
        state.pop(key, None)
    tied = _tied_weight_map(model)
    qnames = set(quantized)
    for m, qt in quantized.items():
        wkey = f"{m}.weight"
        if wkey not in state:
            raise RcsrError(f"{m}: not a module with a weight in this model (quantized module names must be "
                            "HF module names such as model.layers.0.self_attn.q_proj)")
        try:
            mod = model.get_submodule(m)
        except AttributeError as e:
            raise RcsrError(f"{m}: no such module in the model") from e
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            raise RcsrError(f"{m}: only nn.Linear and (tied) nn.Embedding modules can be quantized, "
                            f"got {type(mod).__name__}")
        if tuple(state[wkey].shape) != tuple(qt.codes.shape):
            raise RcsrError(f"{m}: codes are {_shape(qt.codes)} but the weight is {_shape(state[wkey])}")
        targets = [tgt for tgt, src in tied.items() if src == wkey]
        for tgt, src in tied.items():
            if wkey == tgt:
                raise RcsrError(f"{m}: its weight is tied to {src}; quantize the tied source {src.rsplit('.', 1)[0]} "
                                "(one table serves both)")
        if isinstance(mod, torch.nn.Embedding) and not targets:
            raise RcsrError(f"{m}: an embedding is quantized only as the table of a tied output head")
        if qt.bias is not None and getattr(mod, "bias", None) is None:
            raise RcsrError(f"{m}: the QuantizedTensor has a bias but the module has none")
        del state[wkey]
        for tgt in targets:  # the tied head is rebuilt from the quantized table when loading
            state.pop(tgt, None)
    # tied weights: store the source once, like save_pretrained
    for tgt, src in tied.items():
        if tgt in state and src in state:
            a, b = state[tgt], state[src]
            same = _storage_key(a) == _storage_key(b) or (
                a.shape == b.shape and a.dtype == b.dtype and a.device.type != "meta" and torch.equal(a, b))
            if not same:
                raise RcsrError(f"config.tie_word_embeddings/tied weights declare {tgt} = {src} but the two differ; "
                                "set config.tie_word_embeddings=False or re-tie the weights before saving")
            del state[tgt]
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.device.type == "meta":
            raise RcsrError(f"{k}: is on the meta device (offloaded model); load it fully before saving")
        out[k] = v
    for m in sorted(qnames, key=_natural_key):
        for k, v in quantized[m].to_tensors(m).items():
            out[k] = v  # a QuantizedTensor bias replaces the model's <m>.bias
    # remaining undeclared aliases (safetensors refuses shared storage): give each its own copy
    seen: dict = {}
    for k in list(out):
        v = out[k]
        if v.numel() == 0:
            continue
        key = (v.device, v.untyped_storage().data_ptr())
        if key in seen:
            out[k] = v.clone()
        else:
            seen[key] = k
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    names = sorted(tensors, key=_natural_key)
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


def _check_quantized_against_config(quantized: Mapping[str, QuantizedTensor], qc: dict) -> None:
    listed = qc["quantized_modules"]
    if set(listed) != set(quantized):
        missing = sorted(set(listed) - set(quantized), key=_natural_key)
        extra = sorted(set(quantized) - set(listed), key=_natural_key)
        parts = []
        if missing:
            parts.append(f"listed but not given: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"given but not listed: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        raise RcsrError("quantization_config.quantized_modules does not match the quantized tensors (" +
                        "; ".join(parts) + ")")
    want = QuantSpec(qc["bits"], qc["group_size"], qc["sym"])
    dynamic = qc["act_order"] == "dynamic"
    for m, qt in quantized.items():
        if not isinstance(qt, QuantizedTensor):
            raise RcsrError(f"{m}: expected a QuantizedTensor, got {type(qt).__name__}")
        if qt.spec != want:
            raise RcsrError(f"{m}: spec {qt.spec} differs from quantization_config (bits={want.bits}, "
                            f"group_size={want.group_size}, sym={want.sym})")
        if dynamic != (qt.g_idx is not None):
            raise RcsrError(f"{m}: act_order is {qc['act_order']!r} but g_idx is "
                            f"{'missing' if dynamic else 'given'}")


def _check_extra_name(name: str) -> str:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name.startswith("."):
        raise RcsrError(f"extra file name {name!r} must be a relative path inside the checkpoint")
    return name


def save_quantized(
    model,
    quantized: Mapping[str, QuantizedTensor],
    out_dir: str | os.PathLike,
    quant_config: dict,
    tokenizer=None,
    extra_files: Mapping[str, bytes | str] | None = None,
    max_shard_size: int | str = "2GB",
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` with ``quantized`` linears as an rcsr checkpoint folder, atomically.

    ``quantized`` maps HF module names to :class:`QuantizedTensor`; ``quant_config`` is the
    ``quantization_config`` (``packing``, ``scale_dtype`` and ``rcsr_version`` are filled in when
    absent).  Every other parameter/buffer of ``model.state_dict()`` is stored unchanged (tied
    weights once).  ``extra_files`` maps relative file names to contents (e.g. a quantization report).
    Returns the absolute ``out_dir``.
    """
    qc = dict(quant_config)
    qc.setdefault("packing", PACKING)
    qc.setdefault("scale_dtype", SCALE_DTYPE)
    qc.setdefault("rcsr_version", __version__)
    qc = validate_quant_config(qc)
    _check_quantized_against_config(quantized, qc)
    shard_bytes = parse_size(max_shard_size)
    if Path(out_dir).exists() and not overwrite:
        raise RcsrError(f"{Path(out_dir).absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    extra = {_check_extra_name(k): v for k, v in (extra_files or {}).items()}
    try:
        json.dumps(qc)
    except (TypeError, ValueError) as e:
        raise RcsrError(f"quantization_config is not JSON-serialisable ({e})") from e

    tables = vocab_tables(model) & set(quantized)
    if tables and qc["format_version"] < 2:
        raise RcsrError(f"quantized vocabulary table(s) {', '.join(sorted(tables))} need format_version 2 "
                        "(a format_version 1 reader would not know them)")
    tensors = _model_tensors(model, quantized)
    with _atomic_dir(out_dir, overwrite) as tmp:
        _write_safetensors(tensors, tmp, shard_bytes)
        del tensors
        cfg = copy.deepcopy(model.config)
        cfg.architectures = [type(model).__name__]
        try:
            cfg.dtype = _dtype_name(model.dtype)
        except Exception:  # pragma: no cover - non-HF model without a dtype property
            pass
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(str(tmp))
        cfg_path = tmp / CONFIG_NAME
        with open(cfg_path, encoding="utf-8") as f:
            cfg_json = json.load(f)
        cfg_json["quantization_config"] = qc
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg_json, f, indent=2, sort_keys=True)
            f.write("\n")
        gen = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", lambda: False)
        if gen is not None and can_generate():
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, content in extra.items():
            path = tmp / name
            if path.exists():
                raise RcsrError(f"extra file {name!r} would overwrite a checkpoint file")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else bytes(content))
    return Path(out_dir).absolute()


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def _weight_files(ckpt_dir: Path) -> dict[str, Path]:
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
            for name in _file_keys(ckpt_dir / fname):
                if name in listed:
                    raise RcsrError(f"{name}: stored twice ({listed[name].name} and {fname})")
                listed[name] = ckpt_dir / fname
        for name, fname in wm.items():
            if listed.get(name) != ckpt_dir / fname:
                raise RcsrError(f"{index}: {name} is mapped to {fname} but is not stored there")
        return listed
    if single.is_file():
        return {name: single for name in _file_keys(single)}
    raise RcsrError(f"{ckpt_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} (only safetensors checkpoints are read)")


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise RcsrError(f"{path}: cannot read safetensors file ({e})") from e


class _TensorReader:
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


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise RcsrError(f"{name}: expected {_dtype_name(dtype)} {_shape(shape)}, "
                        f"got {_dtype_name(t.dtype)} {_shape(t)}")


def _load_one(reader: _TensorReader, m: str, spec: QuantSpec, dynamic: bool) -> QuantizedTensor:
    qname = f"{m}.qweight"
    if qname not in reader:
        raise RcsrError(f"{qname}: missing (the module is listed in quantization_config.quantized_modules)")
    if f"{m}.weight" in reader:
        raise RcsrError(f"{m}.weight: unexpected for a quantized module (it is stored as {qname})")
    qweight = reader.get(qname)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise RcsrError(f"{qname}: expected int32 [out, in*{spec.bits}/32], got {_dtype_name(qweight.dtype)} "
                        f"{_shape(qweight)}")
    out_f, width = qweight.shape
    if width == 0 or width % spec.bits:
        raise RcsrError(f"{qname}: width {width} must be a positive multiple of {spec.bits} "
                        f"({spec.bits} words per 32 input columns at {spec.bits} bits)")
    in_f = width * 32 // spec.bits
    if spec.group_size != -1 and in_f % spec.group_size:
        raise RcsrError(f"{qname}: {in_f} in-features (from width {width}) are not divisible by group size "
                        f"{spec.group_size}")
    ng = spec.groups(in_f)

    sname = f"{m}.scales"
    if sname not in reader:
        raise RcsrError(f"{sname}: missing")
    scales = reader.get(sname)
    _expect(sname, scales, torch.float16, (out_f, ng))
    if not bool(torch.isfinite(scales).all()):
        raise RcsrError(f"{sname}: has non-finite values")

    zname = f"{m}.zeros"
    if spec.sym:
        if zname in reader:
            raise RcsrError(f"{zname}: unexpected for a symmetric checkpoint (sym: true stores no zeros)")
        zeros = torch.full((out_f, ng), 1 << (spec.bits - 1), dtype=torch.uint8)
    else:
        if zname not in reader:
            raise RcsrError(f"{zname}: missing (required when quantization_config.sym is false)")
        zeros = reader.get(zname)
        _expect(zname, zeros, torch.uint8, (out_f, ng))
        if zeros.numel() and int(zeros.max()) > spec.maxq:
            raise RcsrError(f"{zname}: values must lie in [0, {spec.maxq}] for {spec.bits} bits, "
                            f"got max {int(zeros.max())}")

    gname = f"{m}.group_index"
    g_idx = None
    if dynamic:
        if gname not in reader:
            raise RcsrError(f"{gname}: missing (required when quantization_config.act_order is 'dynamic')")
        g_idx = reader.get(gname)
        _expect(gname, g_idx, torch.int32, (in_f,))
        _check_group_index(g_idx, in_f, ng, spec, gname)
    elif gname in reader:
        raise RcsrError(f"{gname}: unexpected (only act_order 'dynamic' stores group_index)")

    bias = None
    bname = f"{m}.bias"
    if bname in reader:
        bias = reader.get(bname)
        if bias.dim() != 1 or bias.shape[0] != out_f:
            raise RcsrError(f"{bname}: expected [{out_f}], got {_shape(bias)}")
    codes = unpack_codes(qweight, spec.bits, in_f)
    return QuantizedTensor(codes=codes, scale=scales, zero=zeros, g_idx=g_idx, spec=spec, bias=bias)


def _quant_tensor_names(files: Mapping[str, Path], modules: list[str]) -> set[str]:
    """Names of the quantized tensors (qweight/scales/zeros/group_index) in a checkpoint; rejects strays."""
    mods = set(modules)
    names = set()
    for name in files:
        base, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            if base not in mods:
                raise RcsrError(f"{name}: quantized tensor of a module not listed in "
                                "quantization_config.quantized_modules")
            names.add(name)
    return names


def load_quantized_tensors(ckpt_dir: str | os.PathLike) -> dict[str, QuantizedTensor]:
    """Every quantized linear of a checkpoint as ``{module name: QuantizedTensor}``, fully validated.

    Codes are unpacked to uint8 ``[out, in]``; scales stay float16; zeros are uint8 (the constant
    ``2**(bits-1)`` for symmetric checkpoints); ``g_idx`` is int32 or None; ``bias`` is read when stored.
    """
    ckpt_dir = Path(ckpt_dir)
    qc = read_quant_config(ckpt_dir)
    spec = QuantSpec(qc["bits"], qc["group_size"], qc["sym"])
    files = _weight_files(ckpt_dir)
    _quant_tensor_names(files, qc["quantized_modules"])
    reader = _TensorReader(files)
    dynamic = qc["act_order"] == "dynamic"
    return {m: _load_one(reader, m, spec, dynamic) for m in qc["quantized_modules"]}


def _hf_config_without_quant(ckpt_dir: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(ckpt_dir))
    except Exception as e:
        raise RcsrError(f"{ckpt_dir / CONFIG_NAME}: transformers cannot read this config ({e})") from e
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _load_tokenizer(ckpt_dir: Path):
    if not any((ckpt_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir))
    except Exception as e:
        raise RcsrError(f"{ckpt_dir}: cannot load the tokenizer ({e})") from e


def load_fake_quant_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu"):
    """(model, tokenizer or None): the HF model with every quantized weight set to its dequantized value.

    The dequantized weights are computed in fp32 and cast to ``dtype``; every other tensor is loaded
    from the checkpoint and cast to ``dtype`` as usual.  Loading is strict: a missing tensor (other
    than a tied one) or an unexpected one raises RcsrError.  The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    ckpt_dir = Path(ckpt_dir)
    qc = read_quant_config(ckpt_dir)
    spec = QuantSpec(qc["bits"], qc["group_size"], qc["sym"])
    dynamic = qc["act_order"] == "dynamic"
    modules = qc["quantized_modules"]
    files = _weight_files(ckpt_dir)
    skip = _quant_tensor_names(files, modules)
    plain = [n for n in files if n not in skip]
    config = _hf_config_without_quant(ckpt_dir)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise RcsrError(f"{ckpt_dir}: cannot build the model from config.json ({e})") from e
    expected = model.state_dict()       # tensors sharing storage with the parameters / buffers
    tied = _tied_weight_map(model)
    provided = set(plain) | {f"{m}.weight" for m in modules}
    unexpected = sorted(provided - set(expected), key=_natural_key)
    missing = sorted(set(expected) - provided - {t for t, s in tied.items() if s in provided}, key=_natural_key)
    if unexpected:
        raise RcsrError(f"{ckpt_dir}: unexpected tensor(s) for {type(model).__name__}: "
                        f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if missing:
        raise RcsrError(f"{ckpt_dir}: missing tensor(s) for {type(model).__name__}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def put(name: str, t: torch.Tensor) -> None:
        dst = expected[name]
        if tuple(t.shape) != tuple(dst.shape):
            raise RcsrError(f"{name}: expected {_shape(dst)} from config.json, got {_shape(t)}")
        dst.copy_(t)

    reader = _TensorReader(files)
    with torch.no_grad():
        for name in plain:
            put(name, reader.get(name))
        for m in modules:               # one layer at a time: codes and fp32 weights never all in memory
            put(f"{m}.weight", _load_one(reader, m, spec, dynamic).dequantize())
        # a tied target absent from the files takes the source's value (normally it is the same tensor)
        for tgt, src in tied.items():
            if tgt in expected and tgt not in provided and src in provided:
                if expected[tgt].data_ptr() != expected[src].data_ptr():
                    expected[tgt].copy_(expected[src])
    del expected
    gen_path = ckpt_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(ckpt_dir))
        except Exception as e:
            raise RcsrError(f"{gen_path}: cannot read generation config ({e})") from e
    model = model.to(device)
    model.eval()
    return model, _load_tokenizer(ckpt_dir)


def export_dequantized(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       dtype: torch.dtype = torch.float32, *, overwrite: bool = False,
                       max_shard_size: int | str = "2GB") -> Path:
    """Write a plain HF checkpoint (no quantization_config) with the dequantized weights, atomically."""
    shard = parse_size(max_shard_size)
    if Path(out_dir).exists() and not overwrite:
        raise RcsrError(f"{Path(out_dir).absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    model, tokenizer = load_fake_quant_model(ckpt_dir, dtype=dtype)
    with _atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=shard)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).absolute()
