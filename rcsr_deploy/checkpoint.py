"""Quantized checkpoints and Hugging Face models: write a model's quantized checkpoint, read it back.

The contract (what the tensors and ``quantization_config`` mean) is :mod:`rcsr_deploy.format`; files
and atomic folders are :mod:`rcsr_deploy.storage`; this module joins them to transformers models.

* :func:`save_quantized` -- write a whole model atomically (quantized modules packed, the rest as is).
* :func:`load_quantized_tensors` -- read and validate every quantized module (safetensors only).
* :func:`load_fake_quant_model` -- HF model whose quantized weights are the dequantized fp32 values.
* :func:`export_dequantized` -- a plain HF checkpoint of those dequantized weights.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import __version__, moe_format
from .errors import RcsrError
from .format import (
    CONFIG_NAME,
    QuantConfig,
    QuantizedTensor,
    dtype_name,
    quantized_tensor_names,
    read_config_json,
    shape_str,
)
from .storage import TensorReader, atomic_dir, natural_key, parse_size, weight_files, write_safetensors


def tied_weight_map(model) -> dict[str, str]:
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
    tied = tied_weight_map(model)
    qnames = set(quantized)
    slots = moe_format.expert_slots(model) if any(f"{m}.weight" not in state for m in quantized) else {}
    for m, qt in quantized.items():
        if m in slots:  # a routed expert's projection, a slice of a fused 3-D parameter (format v3)
            w = slots[m].view(state[slots[m].param])
            if tuple(w.shape) != tuple(qt.codes.shape) or qt.bias is not None:
                raise RcsrError(f"{m}: codes are {shape_str(qt.codes)} but the expert weight is {shape_str(w)}"
                                f"{' (and experts have no bias)' if qt.bias is not None else ''}")
            continue
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
            raise RcsrError(f"{m}: codes are {shape_str(qt.codes)} but the weight is {shape_str(state[wkey])}")
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
    for param in moe_format.check_complete(slots, qnames):
        del state[param]
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
    for m in sorted(qnames, key=natural_key):
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


def _check_quantized_against_config(quantized: Mapping[str, QuantizedTensor], qc: QuantConfig) -> None:
    listed = qc.quantized_modules
    if set(listed) != set(quantized):
        missing = sorted(set(listed) - set(quantized), key=natural_key)
        extra = sorted(set(quantized) - set(listed), key=natural_key)
        parts = []
        if missing:
            parts.append(f"listed but not given: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"given but not listed: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        raise RcsrError("quantization_config.quantized_modules does not match the quantized tensors (" +
                        "; ".join(parts) + ")")
    for m, qt in quantized.items():
        want = qc.spec_for(m)
        if not isinstance(qt, QuantizedTensor):
            raise RcsrError(f"{m}: expected a QuantizedTensor, got {type(qt).__name__}")
        if qt.spec != want:
            raise RcsrError(f"{m}: spec {qt.spec} differs from quantization_config (bits={want.bits}, "
                            f"group_size={want.group_size}, sym={want.sym})")
        if qc.dynamic != (qt.g_idx is not None):
            raise RcsrError(f"{m}: act_order is {qc.act_order!r} but g_idx is "
                            f"{'missing' if qc.dynamic else 'given'}")


def _check_extra_name(name: str) -> str:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name.startswith("."):
        raise RcsrError(f"extra file name {name!r} must be a relative path inside the checkpoint")
    return name


def save_quantized(
    model,
    quantized: Mapping[str, QuantizedTensor],
    out_dir: str | os.PathLike,
    quant_config: QuantConfig | Mapping,
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
    qc = QuantConfig.from_dict(quant_config.to_dict() if isinstance(quant_config, QuantConfig) else quant_config)
    if qc.rcsr_version is None:
        qc.rcsr_version = __version__
    _check_quantized_against_config(quantized, qc)
    shard_bytes = parse_size(max_shard_size)
    if Path(out_dir).exists() and not overwrite:
        raise RcsrError(f"{Path(out_dir).absolute()} already exists (pass overwrite=True / --overwrite to replace it)")
    extra = {_check_extra_name(k): v for k, v in (extra_files or {}).items()}
    try:
        json.dumps(qc.to_dict())
    except (TypeError, ValueError) as e:
        raise RcsrError(f"quantization_config is not JSON-serialisable ({e})") from e

    tables = vocab_tables(model) & set(quantized)
    if tables and qc.format_version < 2:
        raise RcsrError(f"quantized vocabulary table(s) {', '.join(sorted(tables))} need format_version 2 "
                        "(a format_version 1 reader would not know them)")
    if qc.format_version < moe_format.FORMAT_VERSION_EXPERTS and \
            moe_format.format_version_for(model, quantized, 0) == moe_format.FORMAT_VERSION_EXPERTS:
        raise RcsrError("quantized MoE expert projections need format_version 3 "
                        "(an older reader would not know them)")
    tensors = _model_tensors(model, quantized)
    names = moe_format.hub_names(getattr(model.config, "model_type", None))
    if not names.identity:  # on disk: the hub's names (Mixtral: block_sparse_moe.experts.<e>.w1 ...)
        tensors = {names.to_hub(k): v for k, v in tensors.items()}
        qc.quantized_modules = [names.to_hub(m) for m in qc.quantized_modules]
        if qc.module_grids:
            qc.module_grids = {names.to_hub(m): g for m, g in qc.module_grids.items()}
    with atomic_dir(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp, shard_bytes)
        del tensors
        cfg = copy.deepcopy(model.config)
        cfg.architectures = [type(model).__name__]
        try:
            cfg.dtype = dtype_name(model.dtype)
        except Exception:  # pragma: no cover - non-HF model without a dtype property
            pass
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(str(tmp))
        cfg_path = tmp / CONFIG_NAME
        with open(cfg_path, encoding="utf-8") as f:
            cfg_json = json.load(f)
        cfg_json["quantization_config"] = qc.to_dict()
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
def read_module(reader: TensorReader, m: str, qc: QuantConfig) -> QuantizedTensor:
    """Module ``m`` of a checkpoint, validated against the tensor table."""
    return QuantizedTensor.from_tensors(reader.get, reader.__contains__, m, qc.spec_for(m), qc.dynamic)


def load_quantized_tensors(ckpt_dir: str | os.PathLike) -> dict[str, QuantizedTensor]:
    """Every quantized module of a checkpoint as ``{module name: QuantizedTensor}``, fully validated.

    Codes are unpacked to uint8 ``[out, in]``; scales stay float16; zeros are uint8 (the constant
    ``2**(bits-1)`` for symmetric checkpoints); ``g_idx`` is int32 or None; ``bias`` is read when stored.
    """
    ckpt_dir = Path(ckpt_dir)
    qc = QuantConfig.read(ckpt_dir)
    files = weight_files(ckpt_dir)
    quantized_tensor_names(files, qc.quantized_modules)
    reader = TensorReader(files)
    names = checkpoint_names(ckpt_dir)
    return {names.to_model(m): read_module(reader, m, qc) for m in qc.quantized_modules}


def checkpoint_names(ckpt_dir: Path) -> moe_format.HubNames:
    """The hub-name <-> module-name translation of a checkpoint's model family (``config.json``'s
    ``model_type``; identity for dense families)."""
    try:
        model_type = read_config_json(ckpt_dir).get("model_type")
    except RcsrError:
        model_type = None
    return moe_format.hub_names(model_type)


def hf_config_without_quant(ckpt_dir: Path):
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
    qc = QuantConfig.read(ckpt_dir)
    files = weight_files(ckpt_dir)
    skip = quantized_tensor_names(files, qc.quantized_modules)
    config = hf_config_without_quant(ckpt_dir)
    names = moe_format.hub_names(getattr(config, "model_type", None))
    plain = {names.to_model(n): n for n in files if n not in skip}      # module name -> name on disk
    modules = {names.to_model(m): m for m in qc.quantized_modules}
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise RcsrError(f"{ckpt_dir}: cannot build the model from config.json ({e})") from e
    expected = model.state_dict()       # tensors sharing storage with the parameters / buffers
    tied = tied_weight_map(model)
    slots = moe_format.expert_slots(model) if qc.format_version >= moe_format.FORMAT_VERSION_EXPERTS else {}
    provided = set(plain) | {f"{m}.weight" for m in modules if m not in slots}
    provided |= moe_format.check_complete(slots, modules)
    unexpected = sorted(provided - set(expected), key=natural_key)
    missing = sorted(set(expected) - provided - {t for t, s in tied.items() if s in provided}, key=natural_key)
    if unexpected:
        raise RcsrError(f"{ckpt_dir}: unexpected tensor(s) for {type(model).__name__}: "
                        f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if missing:
        raise RcsrError(f"{ckpt_dir}: missing tensor(s) for {type(model).__name__}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def put(name: str, t: torch.Tensor) -> None:
        dst = expected[name]
        if tuple(t.shape) != tuple(dst.shape):
            raise RcsrError(f"{name}: expected {shape_str(dst)} from config.json, got {shape_str(t)}")
        dst.copy_(t)

    reader = TensorReader(files)
    with torch.no_grad():
        for name, on_disk in plain.items():
            put(name, reader.get(on_disk))
        for m, on_disk in modules.items():  # one layer at a time: codes and fp32 weights never all in memory
            if m in slots:              # a routed expert: its slice of the fused 3-D parameter
                w = read_module(reader, on_disk, qc).dequantize()
                dst = slots[m].view(expected[slots[m].param])
                if tuple(w.shape) != tuple(dst.shape):
                    raise RcsrError(f"{m}: expected {shape_str(dst)} from config.json, got {shape_str(w)}")
                dst.copy_(w)
                continue
            put(f"{m}.weight", read_module(reader, on_disk, qc).dequantize())
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
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=shard)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).absolute()
