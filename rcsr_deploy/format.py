"""The checkpoint contract (docs/FORMAT.md) in one place: grid spec, ``quantization_config``, tensor table.

Everything that writes, reads or serves an rcsr checkpoint agrees through this module:

* :class:`QuantSpec` -- the grid (bits, group size, symmetric) with the ONE validation of the
  supported values and of a layer's fit (``validate``); :func:`check_act_order` for the act order.
* :func:`dequantize` -- ``w[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]``, the meaning of the codes.
* :class:`QuantConfig` -- the typed ``quantization_config`` of ``config.json`` (``from_dict`` /
  ``to_dict`` / ``read``), with the format version checks.
* :func:`tensor_table` -- the stored tensors of one quantized module (name -> dtype, shape).
* :class:`QuantizedTensor` -- one quantized matrix in memory: what calibration produces and what the
  writer, the reader and the plugin consume (``to_tensors`` / ``from_tensors``).

Pure: imports torch and the standard library only (the vLLM plugin imports it).  The bit layout of
``qweight`` lives in :mod:`rcsr_deploy.packing`; safetensors files in :mod:`rcsr_deploy.storage`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RcsrError
from .packing import PACKING, SUPPORTED_BITS, pack_codes, packed_width, unpack_codes

QUANT_METHOD = "rcsr"
#: the newest version this writer produces; it writes the lowest version that can hold a checkpoint
FORMAT_VERSION = 3
#: 1: decoder linears only; 2: adds quantized vocabulary tables (lm_head / tied embedding);
#: 3: adds per-module grids (``module_grids``, mixed precision)
READ_VERSIONS = (1, 2, 3)
SCALE_DTYPE = "float16"
#: group sizes: -1 (one group per output channel) or any positive multiple of ``GROUP_QUANTUM`` that divides the
#: layer's in-features -- 32 / 64 / 128 for most models, and 96 / 192 where 128 does not divide the width
#: (SmolLM2's 576).  Each kernel states which of these it runs (``unsupported_reason``).
GROUP_QUANTUM = 32
#: the group sizes stock formats (GPTQ, compressed-tensors) and their vLLM kernels take everywhere
STOCK_GROUP_SIZES = (-1, 32, 64, 128)
ACT_ORDERS = ("none", "static", "dynamic")
#: tensor-name suffixes that replace ``<m>.weight`` of a quantized module
QUANT_SUFFIXES = ("qweight", "scales", "zeros", "group_index")
CONFIG_NAME = "config.json"


def shape_str(t: torch.Tensor | tuple | list) -> str:
    dims = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return "[" + ", ".join(str(int(d)) for d in dims) + "]"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------
def check_bits(bits: object, where: str = "bits") -> None:
    if type(bits) is not int or bits not in SUPPORTED_BITS:
        prefix = "bits=" if where == "bits" else f"{where} "
        raise RcsrError(f"{prefix}{bits!r} is not supported (choose 2, 3, 4 or 8)")


def supported_group_size(group_size: object) -> bool:
    return type(group_size) is int and (group_size == -1 or (group_size > 0 and group_size % GROUP_QUANTUM == 0))


def check_group_size(group_size: object, where: str = "group size") -> None:
    if not supported_group_size(group_size):
        raise RcsrError(f"{where} {group_size!r} is not supported (choose -1 for per-channel or a positive "
                        f"multiple of {GROUP_QUANTUM}: 32, 64, 96, 128, 192, ...)")


def check_act_order(act_order: object, where: str = "act-order") -> None:
    if act_order not in ACT_ORDERS:
        raise RcsrError(f"{where} {act_order!r} is not supported (none, static or dynamic)")


@dataclass(frozen=True)
class QuantSpec:
    """The grid of one quantized matrix.  ``group_size`` -1 = one group per output row."""

    bits: int
    group_size: int
    sym: bool = True

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The zero point of a symmetric grid (stored nowhere: implied by ``sym``)."""
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check(self) -> None:
        """The supported values (the one place they are listed)."""
        check_bits(self.bits)
        check_group_size(self.group_size)

    def validate(self, in_features: int, name: str = "layer") -> None:
        """Supported values, and ``in_features`` splits into whole groups and packed words."""
        self.check()
        if self.group_size != -1 and in_features % self.group_size:
            raise RcsrError(
                f"group size {self.group_size} does not divide in-features {in_features} of {name}")
        if in_features % 32:
            raise RcsrError(f"in-features {in_features} of {name} is not a multiple of 32 (packed format)")


def expand_groups(t: torch.Tensor, spec: QuantSpec, in_features: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in]`` following static groups or ``g_idx``."""
    if g_idx is not None:
        return t[:, g_idx.long()]
    return t.repeat_interleave(spec.group_len(in_features), dim=1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weights from codes ``[out, in]`` and ``[out, n_groups]`` scale/zero."""
    in_f = codes.shape[1]
    s = expand_groups(scale.float(), spec, in_f, g_idx)
    z = expand_groups(zero.float(), spec, in_f, g_idx)
    return (codes.float() - z) * s


def check_group_index(g: torch.Tensor, in_f: int, ng: int, spec: QuantSpec, name: str) -> None:
    """``g`` maps each of ``in_f`` columns to a group in ``[0, ng)``, every group holding the same count."""
    if g.dim() != 1 or g.shape[0] != in_f:
        raise RcsrError(f"{name}: expected int32 [{in_f}], got {dtype_name(g.dtype)} {shape_str(g)}")
    if g.is_floating_point() or g.dtype == torch.bool or g.is_complex():
        raise RcsrError(f"{name}: expected an integer tensor, got {dtype_name(g.dtype)}")
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
_KNOWN_KEYS = ("quant_method", "format_version", "bits", "group_size", "sym", "act_order", "quantized_modules",
               "packing", "scale_dtype", "lm_head", "method", "rcsr_version", "module_grids")
_GRID_KEYS = ("bits", "group_size")


@dataclass
class QuantConfig:
    """The ``quantization_config`` of an rcsr checkpoint (docs/FORMAT.md, section 2).

    ``module_grids`` (format version 3) maps a quantized module to its own ``bits`` and/or
    ``group_size`` (mixed precision); every other module uses the top-level grid (``spec_for``).
    ``method`` (what produced the codes), ``lm_head`` and ``rcsr_version`` are informational; keys this
    version does not know are kept in ``extra`` and written back unchanged.
    """

    bits: int
    group_size: int
    sym: bool
    act_order: str
    quantized_modules: list[str]
    format_version: int = 1
    packing: str = PACKING
    scale_dtype: str = SCALE_DTYPE
    lm_head: bool | None = None
    method: dict | None = None
    rcsr_version: str | None = None
    module_grids: dict[str, dict[str, int]] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> QuantSpec:
        """The top-level grid (every module without an entry in ``module_grids``)."""
        return QuantSpec(self.bits, self.group_size, self.sym)

    def spec_for(self, module: str) -> QuantSpec:
        """The grid of one quantized module."""
        g = (self.module_grids or {}).get(module, {})
        return QuantSpec(g.get("bits", self.bits), g.get("group_size", self.group_size), self.sym)

    @property
    def mixed(self) -> bool:
        return bool(self.module_grids)

    @property
    def dynamic(self) -> bool:
        """Dynamic act order: every module stores a ``group_index``."""
        return self.act_order == "dynamic"

    @classmethod
    def from_dict(cls, qc: object, where: str = "quantization_config") -> "QuantConfig":
        """Validate a ``quantization_config`` dict (RcsrError naming the bad field)."""
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
        check_bits(qc["bits"], f"{where}.bits")
        check_group_size(qc["group_size"], f"{where}.group_size")
        if type(qc["sym"]) is not bool:
            raise RcsrError(f"{where}.sym must be true or false, got {qc['sym']!r}")
        check_act_order(qc["act_order"], f"{where}.act_order")
        mods = qc["quantized_modules"]
        if not isinstance(mods, list) or not mods or not all(isinstance(m, str) and m for m in mods):
            raise RcsrError(f"{where}.quantized_modules must be a non-empty list of module names")
        if len(set(mods)) != len(mods):
            raise RcsrError(f"{where}.quantized_modules lists a module twice")
        if qc.get("packing", PACKING) != PACKING:
            raise RcsrError(f"{where}.packing {qc['packing']!r} is not supported (expected {PACKING!r})")
        if qc.get("scale_dtype", SCALE_DTYPE) != SCALE_DTYPE:
            raise RcsrError(f"{where}.scale_dtype {qc['scale_dtype']!r} is not supported (expected {SCALE_DTYPE!r})")
        grids = qc.get("module_grids")
        if grids is not None:
            if ver < 3:
                raise RcsrError(f"{where}.module_grids needs format_version 3 (got {ver})")
            if not isinstance(grids, Mapping):
                raise RcsrError(f"{where}.module_grids must be a JSON object")
            listed = set(mods)
            for m, g in grids.items():
                if m not in listed:
                    raise RcsrError(f"{where}.module_grids.{m}: not in quantized_modules")
                if not isinstance(g, Mapping) or not g or set(g) - set(_GRID_KEYS):
                    raise RcsrError(f"{where}.module_grids.{m} must be an object with bits and/or group_size")
                if "bits" in g:
                    check_bits(g["bits"], f"{where}.module_grids.{m}.bits")
                if "group_size" in g:
                    check_group_size(g["group_size"], f"{where}.module_grids.{m}.group_size")
            grids = {m: dict(g) for m, g in grids.items()}
        return cls(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"], act_order=qc["act_order"],
                   quantized_modules=list(mods), format_version=ver, packing=qc.get("packing", PACKING),
                   scale_dtype=qc.get("scale_dtype", SCALE_DTYPE), lm_head=qc.get("lm_head"),
                   method=qc.get("method"), rcsr_version=qc.get("rcsr_version"), module_grids=grids,
                   extra={k: v for k, v in qc.items() if k not in _KNOWN_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``config.json`` (optional fields only when set)."""
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                               "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                               "act_order": self.act_order, "packing": self.packing, "scale_dtype": self.scale_dtype,
                               "quantized_modules": list(self.quantized_modules)}
        for key in ("lm_head", "method", "rcsr_version", "module_grids"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    def validated(self) -> "QuantConfig":
        """A validated copy (a QuantConfig built by hand is checked like one read from disk)."""
        return QuantConfig.from_dict(self.to_dict())

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> "QuantConfig":
        """The validated ``quantization_config`` of an rcsr checkpoint folder."""
        ckpt_dir = Path(ckpt_dir)
        cfg = read_config_json(ckpt_dir)
        if "quantization_config" not in cfg:
            raise RcsrError(f"{ckpt_dir / CONFIG_NAME} has no quantization_config: not a quantized rcsr checkpoint")
        return cls.from_dict(cfg["quantization_config"])


def read_config_json(ckpt_dir: Path) -> dict:
    """``config.json`` of a model folder as a dict (RcsrError when missing or malformed)."""
    path = Path(ckpt_dir) / CONFIG_NAME
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


# --------------------------------------------------------------------------------------------------
# the tensor table
# --------------------------------------------------------------------------------------------------
def tensor_table(spec: QuantSpec, out_features: int, in_features: int,
                 dynamic: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors of one quantized module ``<m>``: ``{suffix: (dtype, shape)}`` for the tensors
    ``<m>.qweight``, ``<m>.scales``, ``<m>.zeros`` (asymmetric only), ``<m>.group_index`` (dynamic act
    order only).  A bias, when the module has one, stays ``<m>.bias`` as in the FP model."""
    ng = spec.groups(in_features)
    table = {"qweight": (torch.int32, (out_features, packed_width(in_features, spec.bits))),
             "scales": (torch.float16, (out_features, ng))}
    if not spec.sym:
        table["zeros"] = (torch.uint8, (out_features, ng))
    if dynamic:
        table["group_index"] = (torch.int32, (in_features,))
    return table


#: dtype of each stored tensor suffix (the table's dtypes, for loaders that see one tensor at a time)
STORED_DTYPES = {k: v[0] for k, v in tensor_table(QuantSpec(4, -1, False), 1, 32, True).items()}


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise RcsrError(f"{name}: expected {dtype_name(dtype)} {shape_str(shape)}, "
                        f"got {dtype_name(t.dtype)} {shape_str(t)}")


# --------------------------------------------------------------------------------------------------
# QuantizedTensor
# --------------------------------------------------------------------------------------------------
@dataclass
class QuantizedTensor:
    """One quantized matrix: ``w[o, i] = (codes[o, i] - zero[o, g(i)]) * scale[o, g(i)]``.

    * ``codes``: uint8 (or any integer/integer-valued tensor) ``[out, in]``, values in ``[0, 2**bits)``.
    * ``scale``: fp32 or fp16 ``[out, n_groups]``; must be exactly representable in float16
      (grid.compute_grid already rounds scales to float16).
    * ``zero``: integer-valued ``[out, n_groups]``; for ``spec.sym`` it must be ``2**(bits-1)`` everywhere.
    * ``g_idx``: int ``[in]`` group of each input column (dynamic act order) or ``None`` (static groups).
    * ``bias``: the linear's bias or ``None``.
    * ``info``: what produced it (method, objective values, timing) -- the quantization report's entry.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    spec: QuantSpec
    bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

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
        """fp32 ``[out, in]`` weights."""
        return dequantize(self.codes, self.scale, self.zero, self.spec, self.g_idx)

    def validate(self, name: str = "layer") -> None:
        """Raise RcsrError unless the tensors are mutually consistent and storable."""
        spec = self.spec
        if self.codes.dim() != 2:
            raise RcsrError(f"{name}: codes must be 2-D [out, in], got {shape_str(self.codes)}")
        out_f, in_f = self.codes.shape
        spec.validate(in_f, name)
        ng = spec.groups(in_f)
        for what, t in (("scale", self.scale), ("zero", self.zero)):
            if tuple(t.shape) != (out_f, ng):
                raise RcsrError(f"{name}: {what} must be [{out_f}, {ng}] for {in_f} in-features at group size "
                                f"{spec.group_size}, got {shape_str(t)}")
        if self.codes.is_floating_point() and not torch.equal(self.codes, torch.round(self.codes)):
            raise RcsrError(f"{name}: codes are not integer-valued")
        if self.codes.numel():
            lo, hi = torch.aminmax(self.codes)
            if int(lo) < 0 or int(hi) > spec.maxq:
                raise RcsrError(f"{name}: codes out of range [0, {spec.maxq}] for {spec.bits} bits")
        if self.scale.dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
            raise RcsrError(f"{name}: scale must be a float tensor, got {dtype_name(self.scale.dtype)}")
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
            if z.numel() and not bool((zf == float(spec.sym_zero)).all()):
                raise RcsrError(f"{name}: symmetric grid needs zero == {spec.sym_zero} everywhere "
                                "(the format stores no zeros for sym)")
        elif z.numel() and (float(zf.min()) < 0 or float(zf.max()) > spec.maxq):
            raise RcsrError(f"{name}: zero points out of range [0, {spec.maxq}] for {spec.bits} bits")
        if self.g_idx is not None:
            check_group_index(self.g_idx, in_f, ng, spec, name + ".g_idx")
        if self.bias is not None and tuple(self.bias.shape) != (out_f,):
            raise RcsrError(f"{name}: bias must be [{out_f}], got {shape_str(self.bias)}")

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
        for suffix, (dtype, shape) in tensor_table(self.spec, self.out_features, self.in_features,
                                                   self.g_idx is not None).items():
            _expect(f"{prefix}.{suffix}", out[f"{prefix}.{suffix}"], dtype, shape)
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.detach().to("cpu").contiguous()
        return out

    @classmethod
    def from_tensors(cls, get: Callable[[str], torch.Tensor], has: Callable[[str], bool], m: str,
                     spec: QuantSpec, dynamic: bool) -> "QuantizedTensor":
        """Read and validate module ``m``'s stored tensors (``get(name)`` / ``has(name)``) against the table."""
        qname = f"{m}.qweight"
        if not has(qname):
            raise RcsrError(f"{qname}: missing (the module is listed in quantization_config.quantized_modules)")
        if has(f"{m}.weight"):
            raise RcsrError(f"{m}.weight: unexpected for a quantized module (it is stored as {qname})")
        qweight = get(qname)
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise RcsrError(f"{qname}: expected int32 [out, in*{spec.bits}/32], got {dtype_name(qweight.dtype)} "
                            f"{shape_str(qweight)}")
        out_f, width = qweight.shape
        if width == 0 or width % spec.bits:
            raise RcsrError(f"{qname}: width {width} must be a positive multiple of {spec.bits} "
                            f"({spec.bits} words per 32 input columns at {spec.bits} bits)")
        in_f = width * 32 // spec.bits
        if spec.group_size != -1 and in_f % spec.group_size:
            raise RcsrError(f"{qname}: {in_f} in-features (from width {width}) are not divisible by group size "
                            f"{spec.group_size}")
        table = tensor_table(spec, out_f, in_f, dynamic)
        ng = spec.groups(in_f)

        sname = f"{m}.scales"
        if not has(sname):
            raise RcsrError(f"{sname}: missing")
        scales = get(sname)
        _expect(sname, scales, *table["scales"])
        if not bool(torch.isfinite(scales).all()):
            raise RcsrError(f"{sname}: has non-finite values")

        zname = f"{m}.zeros"
        if spec.sym:
            if has(zname):
                raise RcsrError(f"{zname}: unexpected for a symmetric checkpoint (sym: true stores no zeros)")
            zeros = torch.full((out_f, ng), spec.sym_zero, dtype=torch.uint8)
        else:
            if not has(zname):
                raise RcsrError(f"{zname}: missing (required when quantization_config.sym is false)")
            zeros = get(zname)
            _expect(zname, zeros, *table["zeros"])
            if zeros.numel() and int(zeros.max()) > spec.maxq:
                raise RcsrError(f"{zname}: values must lie in [0, {spec.maxq}] for {spec.bits} bits, "
                                f"got max {int(zeros.max())}")

        gname = f"{m}.group_index"
        g_idx = None
        if dynamic:
            if not has(gname):
                raise RcsrError(f"{gname}: missing (required when quantization_config.act_order is 'dynamic')")
            g_idx = get(gname)
            _expect(gname, g_idx, *table["group_index"])
            check_group_index(g_idx, in_f, ng, spec, gname)
        elif has(gname):
            raise RcsrError(f"{gname}: unexpected (only act_order 'dynamic' stores group_index)")

        bias = None
        bname = f"{m}.bias"
        if has(bname):
            bias = get(bname)
            if bias.dim() != 1 or bias.shape[0] != out_f:
                raise RcsrError(f"{bname}: expected [{out_f}], got {shape_str(bias)}")
        codes = unpack_codes(qweight, spec.bits, in_f)
        return cls(codes=codes, scale=scales, zero=zeros, g_idx=g_idx, spec=spec, bias=bias)


def quantized_tensor_names(names, modules: list[str]) -> set[str]:
    """The quantized tensors (qweight/scales/zeros/group_index) among ``names``; rejects strays."""
    mods = set(modules)
    out = set()
    for name in names:
        base, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            if base not in mods:
                raise RcsrError(f"{name}: quantized tensor of a module not listed in "
                                "quantization_config.quantized_modules")
            out.add(name)
    return out
