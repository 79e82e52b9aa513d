"""Export 4/8-bit rcsr checkpoints to formats that stock tools load: GPTQ and compressed-tensors.

``export_checkpoint(ckpt_dir, out_dir, fmt)`` rewrites every quantized linear of an rcsr checkpoint
(docs/FORMAT.md) into

* ``"gptq"`` -- the AutoGPTQ / GPTQModel / vLLM ``gptq`` layout: ``qweight`` int32 ``[in/p, out]``
  (packed along ``in``), ``qzeros`` int32 ``[G, out/p]`` (packed along ``out``), ``scales`` float16
  ``[G, out]``, ``g_idx`` int32 ``[in]``, with ``p = 32 / bits`` codes per word, least significant
  bits first.  Symmetric checkpoints are written as GPTQ "v1" (``checkpoint_format: "gptq"``,
  stored zero ``= zero - 1``, the historical convention every GPTQ reader expects); asymmetric ones
  as ``"gptq_v2"`` (stored zero ``= zero``), because v1 cannot represent a zero point of 0.
* ``"compressed-tensors"`` -- the ``pack-quantized`` format of the ``compressed-tensors`` library
  (what llm-compressor writes): ``weight_packed`` int32 ``[out, in/p]``, ``weight_scale``
  ``[out, G]``, ``weight_shape``, ``weight_zero_point`` (asymmetric, packed along ``out``) and
  ``weight_g_idx`` (dynamic act order).  Packing and the config are produced with the library's own
  functions (``pack_to_int32``, ``QuantizationConfig``, ``ModelCompressor.update_config``).

Both map our grid exactly: ``w = (q - z) * s`` with the same integer codes ``q``, integer zero points
``z`` and float16 scales ``s``.  Routed experts of a Mixture-of-Experts checkpoint (format_version 3) are
exported like linears under their per-expert names (``<experts>.<e>.gate_proj.weight_packed`` ...,
Mixtral's ``w1/w3/w2``), which is how llm-compressor and GPTQModel store them and what vLLM's
compressed-tensors / GPTQ-Marlin MoE loaders read.  Only 4 and 8 bits are exported; 2/3-bit checkpoints are served by the
rcsr vLLM plugin.  Every other tensor (embeddings, norms, lm_head, biases) is copied unchanged, and
so are the tokenizer / generation config files; a quantized vocabulary table (``--lm-head``: the
tied embedding or ``lm_head``) is written dequantized in fp32, since those formats quantize decoder
linears only.  The output folder is written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from . import __version__
from .checkpoint import hf_config_without_quant, read_module
from .errors import RcsrError
from .format import (CONFIG_NAME, STOCK_GROUP_SIZES, QuantConfig, QuantizedTensor, quantized_tensor_names,
                     read_config_json)
from .packing import pack_lsb_words
from .storage import TensorReader, atomic_dir, natural_key, parse_size, weight_files, write_safetensors

FORMATS = ("compressed-tensors", "gptq")
EXPORT_BITS = (4, 8)
#: informational file written next to the exported weights (where the export came from)
EXPORT_INFO_NAME = "rcsr_export.json"


def _normalize_format(fmt: str) -> str:
    f = str(fmt).strip().lower().replace("_", "-")
    if f not in FORMATS:
        raise RcsrError(f"unknown export format {fmt!r} (choose {' or '.join(FORMATS)})")
    return f


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------
def _static_g_idx(qt: QuantizedTensor) -> torch.Tensor:
    in_f = qt.in_features
    return (torch.arange(in_f) // qt.spec.group_len(in_f)).to(torch.int32)


def gptq_tensors(qt: QuantizedTensor, prefix: str, *, v2: bool) -> dict[str, torch.Tensor]:
    """GPTQ tensors ``{prefix}.qweight/.qzeros/.scales/.g_idx`` of one quantized linear (no bias).

    ``v2=False``: stored zero points are ``zero - 1`` (GPTQ v1 checkpoints); ``v2=True``: ``zero``.
    """
    bits = qt.spec.bits
    per = 32 // bits
    out_f = qt.out_features
    if out_f % per:
        raise RcsrError(f"{prefix}: {out_f} out-features cannot be packed into GPTQ qzeros "
                        f"(needs a multiple of {per} at {bits} bits)")
    codes = qt.codes.to(torch.int64)
    zeros = qt.zero.to(torch.int64)
    if not v2:
        if bool((zeros < 1).any()):     # export_checkpoint uses v2 for asymmetric grids
            raise RcsrError(f"{prefix}: a zero point of 0 cannot be stored in GPTQ v1 (zero - 1)")
        zeros = zeros - 1
    g_idx = qt.g_idx.to(torch.int32) if qt.g_idx is not None else _static_g_idx(qt)
    return {
        f"{prefix}.qweight": pack_lsb_words(codes.t(), bits, dim=0),               # [in/p, out]
        f"{prefix}.qzeros": pack_lsb_words(zeros.t(), bits, dim=1),                # [G, out/p]
        f"{prefix}.scales": qt.scale.to(torch.float16).t().contiguous(),           # [G, out]
        f"{prefix}.g_idx": g_idx.contiguous(),                                     # [in]
    }


def gptq_quant_config(qc: QuantConfig, unquantized_linears: Iterable[str] = ()) -> dict:
    """The ``quantization_config`` of the GPTQ export of an rcsr checkpoint with config ``qc``."""
    gs = qc.group_size
    desc_act = qc.act_order == "dynamic" and gs != -1
    fmt = "gptq" if qc.sym else "gptq_v2"
    out = {
        "quant_method": "gptq",
        "bits": qc.bits,
        "group_size": gs,
        "desc_act": desc_act,
        "sym": qc.sym,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"rcsr-deploy:{__version__}"]},
    }
    skip = sorted(unquantized_linears, key=natural_key)
    dynamic = {}
    if skip:
        # GPTQModel / vLLM "dynamic" rules: "-:" = leave the matching module unquantized.
        dynamic.update({"-:" + _exact_regex(m): {} for m in skip})
    for m in sorted(qc.module_grids or {}, key=natural_key):
        # mixed precision (format version 3): "+:" = this module with its own bits / group size
        spec = qc.spec_for(m)
        dynamic["+:" + _exact_regex(m)] = {"bits": spec.bits, "group_size": spec.group_size}
    if dynamic:
        out["dynamic"] = dynamic
    return out


def _exact_regex(name: str) -> str:
    import re

    return "^" + re.escape(name) + "$"


# --------------------------------------------------------------------------------------------------
# compressed-tensors
# --------------------------------------------------------------------------------------------------
def _ct():
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor, pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as e:
        raise RcsrError("export to compressed-tensors needs the compressed-tensors package "
                        f"(pip install compressed-tensors): {e}") from e
    return compressed_tensors, ModelCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned grid values ``[0, 2**bits)`` -> compressed-tensors' signed int8 ``v - 2**(bits-1)``."""
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def compressed_tensors_tensors(qt: QuantizedTensor, prefix: str) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors of one quantized linear (no bias).

    compressed-tensors stores the signed values ``q - 2**(bits-1)`` and ``z - 2**(bits-1)``;
    ``pack_to_int32`` adds the offset back, so the stored nibbles/bytes are our ``q`` and ``z``.
    """
    _, _, pack_to_int32, *_ = _ct()
    bits = qt.spec.bits
    out: dict[str, torch.Tensor] = {
        f"{prefix}.weight_packed": pack_to_int32(_signed(qt.codes, bits), bits).contiguous(),
        f"{prefix}.weight_scale": qt.scale.to(torch.float16).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([qt.out_features, qt.in_features], dtype=torch.int64),
    }
    if not qt.spec.sym:
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(_signed(qt.zero, bits), bits, packed_dim=0).contiguous()
    if qt.g_idx is not None and qt.spec.group_size != -1:
        out[f"{prefix}.weight_g_idx"] = qt.g_idx.to(torch.int32).contiguous()
    return out


def compressed_tensors_quant_config(qc: QuantConfig, ignore: Iterable[str] = ("lm_head",)):
    """The compressed-tensors ``QuantizationConfig`` object of the export of ``qc``."""
    _, _, _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    gs = qc.group_size
    act = qc.act_order
    actorder = None if act == "none" else "group" if (act == "dynamic" and gs != -1) else "static"
    weights = QuantizationArgs(
        num_bits=qc.bits, type="int", symmetric=qc.sym,
        strategy="channel" if gs == -1 else "group", group_size=None if gs == -1 else gs,
        actorder=actorder, dynamic=False, scale_dtype=torch.float16,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed",
                              ignore=sorted(ignore, key=natural_key))


# --------------------------------------------------------------------------------------------------
# whole checkpoint
# --------------------------------------------------------------------------------------------------
def _linear_modules(ckpt_dir: Path) -> tuple[list[str], set[str], set[str]]:
    """(names of every ``nn.Linear`` of the checkpoint's architecture, names of its vocabulary tables:
    the output-embedding linear such as ``lm_head`` and the input embedding, names of its routed expert
    projections as stored on disk: ``<experts>.<e>.gate_proj`` ..., under the family's hub names); the
    model is built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from . import moe_format

    config = hf_config_without_quant(ckpt_dir)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise RcsrError(f"{ckpt_dir}: cannot build the model from config.json ({e})") from e
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    linears, heads = [], set()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or _is_router(m):
            linears.append(n)
        if m is not None and (m is head or m is emb):
            heads.add(n)
    names = moe_format.hub_names(getattr(config, "model_type", None))   # module names -> names on disk
    slots = moe_format.expert_slots(model)
    fused = {s.param for s in slots.values() if s.transposed or s.step != 1}
    if fused:  # GPT-OSS: the hub and vLLM's loader know only its fused, transposed, interleaved tensors
        raise RcsrError(f"{ckpt_dir}: {type(model).__name__} stores its experts fused in its own layout "
                        f"({sorted(fused, key=natural_key)[0]} ...); stock GPTQ / compressed-tensors readers have no "
                        "per-expert names for them, so this checkpoint is not exported")
    experts = {names.to_hub(n) for n in slots}
    return [names.to_hub(n) for n in linears], {names.to_hub(n) for n in heads}, experts


def _is_router(m: torch.nn.Module) -> bool:
    """A MoE router that transformers keeps as its own module with a 2-D ``weight`` (Qwen3-MoE's
    ``TopKRouter``, Mixtral's ``gate``...): vLLM builds it as a linear layer, so the exports list it among
    the unquantized linears (compressed-tensors ``ignore``, GPTQ ``dynamic``), as llm-compressor does."""
    w = m._parameters.get("weight")
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, torch.nn.Embedding)
            and "router" in type(m).__name__.lower())


def _copy_side_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Tokenizer, generation config, chat template, reports...: every top-level file not in ``skip``."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors"):
            shutil.copy2(p, dst / p.name)


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str, *,
                      overwrite: bool = False, max_shard_size: int | str = "2GB") -> Path:
    """Export the rcsr checkpoint ``ckpt_dir`` to ``fmt`` ("gptq" or "compressed-tensors") in ``out_dir``.

    Only 4- and 8-bit checkpoints are exported.  The result is a normal HF folder whose
    ``config.json`` carries the target format's ``quantization_config``; it is written atomically
    (temp folder + rename).  Returns the absolute ``out_dir``.
    """
    fmt = _normalize_format(fmt)
    ckpt_dir = Path(ckpt_dir)
    qc = QuantConfig.read(ckpt_dir)
    widths = sorted({qc.spec_for(m).bits for m in qc.quantized_modules} | {qc.bits})
    if any(b not in EXPORT_BITS for b in widths):
        raise RcsrError(f"export to {fmt} supports 4 and 8 bits; 2/3-bit checkpoints are served by the "
                        f"rcsr vLLM plugin (this checkpoint has {'/'.join(map(str, widths))}-bit layers)")
    groups = sorted({qc.spec_for(m).group_size for m in qc.quantized_modules} | {qc.group_size})
    if any(g not in STOCK_GROUP_SIZES for g in groups):
        raise RcsrError(f"export to {fmt} supports group sizes 32, 64, 128 and per channel (what vLLM's GPTQ / "
                        f"compressed-tensors kernels all take); this checkpoint has group "
                        f"{'/'.join(map(str, groups))}: serve it with the rcsr vLLM plugin")
    if qc.mixed and fmt != "gptq":
        raise RcsrError("a mixed-precision checkpoint exports to gptq only (its per-module \"dynamic\" rules "
                        "carry the widths); compressed-tensors export takes one grid")
    out = Path(out_dir).absolute()
    if out == ckpt_dir.absolute() or ckpt_dir.absolute() in out.parents:
        raise RcsrError(f"{out}: the export must not be written into the source checkpoint {ckpt_dir}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RcsrError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    shard_bytes = parse_size(max_shard_size)

    modules = qc.quantized_modules
    linears, heads, experts = _linear_modules(ckpt_dir)
    not_linear = sorted(set(modules) - set(linears) - heads - experts, key=natural_key)
    if not_linear:
        raise RcsrError(f"{ckpt_dir}: quantized module(s) {', '.join(not_linear[:3])} are neither nn.Linear "
                        "modules nor routed expert projections of the model in config.json")
    # Stock GPTQ / compressed-tensors readers quantize decoder linears only: a quantized vocabulary
    # table (--lm-head) is exported dequantized, in fp32 (exact).
    tables = [m for m in modules if m in heads]
    quantized = set(modules) - set(tables)
    unquantized = [n for n in linears if n not in quantized]

    files = weight_files(ckpt_dir)
    quant_names = quantized_tensor_names(files, modules)
    reader = TensorReader(files)

    if fmt == "compressed-tensors":
        ct_config = compressed_tensors_quant_config(qc, ignore=unquantized)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if name not in quant_names:
            tensors[name] = reader.get(name)        # unchanged (embeddings, norms, lm_head, biases, ...)
    for m in modules:                               # one layer at a time
        qt = read_module(reader, m, qc)
        if m in tables:
            new = {f"{m}.weight": qt.dequantize().contiguous()}
            if qt.bias is not None:
                new[f"{m}.bias"] = qt.bias
        elif fmt == "gptq":
            new = gptq_tensors(qt, m, v2=not qc.sym)
        else:
            new = compressed_tensors_tensors(qt, m)
        clash = sorted(set(new) & set(tensors))
        if clash:
            raise RcsrError(f"{clash[0]}: already stored in the source checkpoint; cannot export over it")
        tensors.update(new)
        del qt

    cfg = read_config_json(ckpt_dir)
    cfg.pop("quantization_config", None)
    info = {"exported_by": f"rcsr-deploy {__version__}", "format": fmt, "source_quantization_config": qc.to_dict(),
            "dequantized_tables": tables}
    with atomic_dir(out, overwrite) as tmp:
        write_safetensors(tensors, tmp, shard_bytes)
        del tensors
        _copy_side_files(ckpt_dir, tmp, skip={CONFIG_NAME, "model.safetensors.index.json", EXPORT_INFO_NAME})
        if fmt == "gptq":
            # GPTQ readers quantize decoder-block linears only; lm_head is covered by "lm_head": false
            cfg["quantization_config"] = gptq_quant_config(qc, [n for n in unquantized if n not in heads])
            _write_json(tmp / CONFIG_NAME, cfg)
        else:
            _write_json(tmp / CONFIG_NAME, cfg)
            _, ModelCompressor, *_ = _ct()
            ModelCompressor(quantization_config=ct_config).update_config(str(tmp))
        _write_json(tmp / EXPORT_INFO_NAME, info)
    return out


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
