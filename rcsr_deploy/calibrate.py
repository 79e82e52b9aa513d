"""Layer-by-layer calibration engine (two activation streams, true-sequential groups).

Top-down:

1. Find the decoder blocks (a ``ModuleList`` of ``num_hidden_layers`` blocks: Llama, Qwen2/3, Mistral,
   Gemma3, Phi-3, ...).  Run the calibration windows through the model with every block replaced by
   a catcher: this records the first block's inputs and each block's keyword arguments (masks,
   rotary embeddings — they differ per block in e.g. Gemma3), at the cost of the embeddings only.
2. Keep two streams of block inputs on the host: ``q`` (through already-quantized blocks) and, when
   the objective needs it (α ≠ 0), ``fp`` (through the original blocks).
3. For each block, only it (and its FP copy) sits on the compute device.  Its linears are grouped
   true-sequentially by *shared input* in execution order, discovered with hooks — for Llama this is
   ``[q,k,v] → [o] → [gate,up] → [down]``.  For each group: run both streams up to the group's input
   (the forward is cut short right there), accumulate ``H``/``D`` (``objective.LayerStats``), quantize
   every module of the group (``quantize_linear``) and put the dequantized weights back, so that the
   next group sees the quantized path.  The FP block does not change, so its stream is run through
   the block once, recording every group's input on the way (``_run_block_capturing``, bounded by
   ``FP_CAPTURE_BYTES``) — the second stream then costs one block forward, not one per group.
4. Propagate both streams through the block, store the block's result under the work directory
   (``--resume`` restarts at the first block without a result), free the device.

Memory on the host is ``2 · nsamples · seqlen · hidden`` activations (plus, for one block at a time,
the FP stream's group inputs when they fit in ``FP_CAPTURE_BYTES``) and the model; on the device one
block (twice when the FP stream is needed) and one group's statistics.  Nothing grows with depth.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import RcsrError
from .grid import QuantSpec, compute_grid, expand_groups
from .objective import LayerStats, closed_form_alpha, prepare_target, quadratic_objective, sample_alphas, shifted_target
from .rounding import decode_order, rtn, successive_round

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "gptaq", "snrq", "ksnrq")
ACT_ORDERS = ("none", "static", "dynamic")


#: ``--alpha closed-form`` decodes once at this α, computes α* from that decode, then decodes at α*.
#: α* minimises ‖W_ref(α) − Q‖_H for the Q it is given, so it stays near the α that produced Q: started
#: from the GPTQ point (α = 0) it returns α* ≈ 0.01 and GPTQ's quality (measured, docs/RESULTS.md).  The
#: reference code starts from its default fixed α, 0.25; so do we.
CLOSED_FORM_START = 0.25


@dataclass
class QuantizeConfig:
    """Everything that determines the quantized weights (stored in ``quantization_config.method``)."""

    method: str = "snrq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    beam: int = 1
    alpha: str = "sample"  # "sample" | "closed-form" | a float as string
    alpha_m: float = 5.0
    sarqc_lambda: float = 0.0
    clip: str = "auto"  # "auto" | "minmax" | "mse"; auto is resolved in __post_init__
    act_order: str = "static"  # "none" | "static" | "dynamic"
    percdamp: float = 0.01
    block: int = 128
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib: str = "sotu"
    batch_size: int = 8
    blocks: str = ""  # subset of decoder blocks to quantize, e.g. "0-3" or "0,5" ("" = all)
    lm_head: bool = False  # also quantize the output head (with a tied embedding: the shared table)

    def __post_init__(self) -> None:
        # ``auto``: the H-weighted clip search for every calibrated method (it lowered the W3 g64
        # perplexity of GPTQ from 183 to 85 and of SNRQ from 93 to 79, docs/RESULTS.md); the full range
        # for plain RTN, which then needs no calibration data (RTN + SARQC searches: it needs the grid).
        if self.clip == "auto":
            self.clip = "minmax" if self.method == "rtn" and self.sarqc_lambda == 0 else "mse"

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RcsrError(f"unknown method {self.method!r} (choose {', '.join(METHODS)})")
        if self.bits not in (2, 3, 4, 8):
            raise RcsrError(f"bits={self.bits} is not supported (choose 2, 3, 4 or 8)")
        if self.group_size not in (-1, 32, 64, 128):
            raise RcsrError(f"group size {self.group_size} is not supported (choose 32, 64, 128 or -1 for per-channel)")
        if self.act_order not in ACT_ORDERS:
            raise RcsrError(f"act-order must be one of {', '.join(ACT_ORDERS)}")
        if self.beam < 1:
            raise RcsrError("--beam must be >= 1")
        if self.beam > 1 and self.method != "ksnrq":
            raise RcsrError(f"--beam {self.beam} needs --method ksnrq")
        if self.alpha not in ("sample", "closed-form"):
            try:
                a = float(self.alpha)
            except ValueError:
                raise RcsrError(f"--alpha must be 'sample', 'closed-form' or a number in [0, 1], got {self.alpha!r}") from None
            if not 0.0 <= a <= 1.0:
                raise RcsrError(f"--alpha must be in [0, 1], got {a}")
        if self.sarqc_lambda < 0:
            raise RcsrError("--sarqc-lambda must be >= 0")
        if self.method != "rtn" and (self.nsamples < 1 or self.seqlen < 8):
            raise RcsrError("--nsamples must be >= 1 and --seqlen >= 8")
        if self.clip not in ("minmax", "mse"):
            raise RcsrError("--clip must be auto, minmax or mse")

    def block_set(self, n_blocks: int) -> list[int]:
        if not self.blocks:
            return list(range(n_blocks))
        out: set[int] = set()
        try:
            for part in self.blocks.split(","):
                a, _, b = part.strip().partition("-")
                out.update(range(int(a), int(b or a) + 1))
        except ValueError:
            raise RcsrError(f"--blocks must look like '0-3' or '0,5', got {self.blocks!r}") from None
        bad = [i for i in out if not 0 <= i < n_blocks]
        if bad:
            raise RcsrError(f"--blocks selects block {bad[0]} but the model has {n_blocks} blocks")
        return sorted(out)

    # -- derived behaviour -------------------------------------------------------------------
    @property
    def alpha_mode(self) -> tuple[str, float]:
        """('fixed', α) | ('sample', 1.0) | ('closed-form', CLOSED_FORM_START) after method defaults."""
        if self.method == "gptq":
            return "fixed", 0.0
        if self.method == "gptaq":
            return "fixed", 1.0
        if self.alpha == "sample":
            return "sample", 1.0
        if self.alpha == "closed-form":
            return "closed-form", CLOSED_FORM_START
        return "fixed", float(self.alpha)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.clip == "mse" or self.sarqc_lambda > 0

    @property
    def needs_fp_stream(self) -> bool:
        mode, a = self.alpha_mode
        return self.method != "rtn" and (mode != "fixed" or a != 0.0)

    @property
    def effective_beam(self) -> int:
        return self.beam if self.method == "ksnrq" else 1


# --------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------
def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The ModuleList of decoder blocks and its dotted name."""
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None and hasattr(model.config, "get_text_config"):
        n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len(mod) > 0:
            if best is None or name.count(".") < best[1].count("."):
                best = (mod, name)
    if best is None:
        raise RcsrError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of num_hidden_layers blocks)")
    return best


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class OutputHead:
    """The output projection (``lm_head``) and what its calibration needs.

    ``store_name`` is the module whose weight the checkpoint stores quantized: the head itself, or
    — when the head is tied to the input embedding — the embedding (one table serves both, so both
    the lookup and the logits then use the quantized weights).  ``norm`` is the final normalisation
    that turns the last block's output into the head's input.
    """

    name: str
    store_name: str
    module: nn.Linear
    norm: nn.Module
    tied: bool


def find_output_head(model: nn.Module) -> OutputHead:
    """The model's output head, its final norm and whether it is tied (``--lm-head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise RcsrError(f"--lm-head: {type(model).__name__} has no nn.Linear output head")
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    tied = emb is not None and getattr(emb, "weight", None) is not None and emb.weight is head.weight
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise RcsrError(f"--lm-head: cannot find the final norm of {type(model).__name__} (expected decoder.norm)")
    name = names[id(head)]
    return OutputHead(name=name, store_name=names[id(emb)] if tied else name, module=head, norm=norm, tied=tied)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder block: records its inputs, passes the hidden states through."""

    def __init__(self, idx: int, store: dict, record_inputs: bool):
        super().__init__()
        self.idx, self.store, self.record_inputs = idx, store, record_inputs

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RcsrError("decoder blocks called with positional extras are not supported")
        if self.record_inputs:
            self.store["inputs"].append(hidden_states.detach().to("cpu"))
        if self.idx not in self.store["kwargs"]:
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "cache_position")}
            self.store["kwargs"][self.idx] = _to_device(kw, "cpu")
        return hidden_states


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _expand_batch(obj, b: int):
    """Broadcast batch-1 tensors in kwargs (position ids, rotary tables) to batch ``b``."""
    if isinstance(obj, torch.Tensor):
        return obj.expand(b, *obj.shape[1:]) if obj.dim() >= 1 and obj.shape[0] == 1 and b > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_expand_batch(o, b) for o in obj)
    if isinstance(obj, dict):
        return {k: _expand_batch(v, b) for k, v in obj.items()}
    return obj


def capture_block_inputs(model, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int, device):
    """Layer-0 inputs ``[N, L, d]`` (host) and per-block kwargs for batch 1."""
    store = {"inputs": [], "kwargs": {}}
    originals = list(layers)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, store, record_inputs=(i == 0))
        model.to(device) if device != "cpu" else None
        with torch.inference_mode():
            for s in range(windows.shape[0]):
                decoder(input_ids=windows[s:s + 1].to(device), use_cache=False)
    finally:
        for i, blk in enumerate(originals):
            layers[i] = blk
        if device != "cpu":
            model.to("cpu")
    return torch.cat(store["inputs"], 0), store["kwargs"]


def _run_block(block, x: torch.Tensor, kwargs: dict, device, batch_size: int, dtype) -> torch.Tensor:
    """Run ``block`` over host tensor ``x`` [N, L, d] in mini-batches; returns host [N, L, d]."""
    out = torch.empty_like(x)
    for b0 in range(0, x.shape[0], batch_size):
        xb = x[b0:b0 + batch_size].to(device, dtype)
        kw = _expand_batch(_to_device(kwargs, device), xb.shape[0])
        with torch.inference_mode():
            y = block(xb, **kw)
        if isinstance(y, tuple):
            y = y[0]
        out[b0:b0 + xb.shape[0]] = y.to("cpu", x.dtype)
    return out


# Host bytes the FP stream may spend on caching every group's inputs of one block (see ``_run_block_capturing``).
FP_CAPTURE_BYTES = 2 * 2**30


def _run_block_capturing(block, x: torch.Tensor, kwargs: dict, device, batch_size: int, dtype,
                         modules: dict[str, nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``_run_block`` that also records the input of each of ``modules`` (host, ``[N, L, in]``).

    The FP block never changes while its block is calibrated, so one full forward yields the inputs
    of all its groups *and* the next block's FP stream — instead of one forward cut short per group
    and one more to propagate (``_collect_inputs``).  The recorded tensors are bit-identical to what
    the cut-short forwards return (same ops, same mini-batches)."""
    box: dict[str, torch.Tensor] = {}
    store = {n: None for n in modules}
    hooks = []
    for n, m in modules.items():
        def pre(mod, args, _n=n):
            box[_n] = args[0].detach()
        hooks.append(m.register_forward_pre_hook(pre))
    out = torch.empty_like(x)
    try:
        for b0 in range(0, x.shape[0], batch_size):
            xb = x[b0:b0 + batch_size].to(device, dtype)
            kw = _expand_batch(_to_device(kwargs, device), xb.shape[0])
            with torch.inference_mode():
                y = block(xb, **kw)
            if isinstance(y, tuple):
                y = y[0]
            out[b0:b0 + xb.shape[0]] = y.to("cpu", x.dtype)
            for n in modules:
                v = box.pop(n)
                if store[n] is None:
                    store[n] = torch.empty(x.shape[0], *v.shape[1:], dtype=v.dtype)
                store[n][b0:b0 + xb.shape[0]] = v.to("cpu")
    finally:
        for h in hooks:
            h.remove()
    return out, store


def _cached_inputs(cache: torch.Tensor, device, batch_size: int):
    """Same stream shape as ``_collect_inputs``, from a ``_run_block_capturing`` cache."""
    for b0 in range(0, cache.shape[0], batch_size):
        yield b0, cache[b0:b0 + batch_size].to(device)


def discover_groups(block, x0: torch.Tensor, kwargs: dict, device, dtype) -> list[list[str]]:
    """True-sequential groups: linears in execution order, grouped by identical input tensor.

    The hooks keep every input tensor alive until the forward is over and compare tensors with
    ``is``: an ``id()`` alone may be recycled — the attention output is freed after ``o_proj`` and
    the next norm's output can land on the same address, which would merge ``o_proj`` with
    ``gate_proj``/``up_proj`` and calibrate them on the wrong inputs."""
    mods = linear_modules(block)
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, m in mods.items():
        def pre(mod, args, _name=name):
            calls.append((_name, args[0]))
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        _run_block(block, x0[:1], kwargs, device, 1, dtype)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, t in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and t is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = t
    missing = [n for n in mods if n not in seen]
    if missing:
        log.warning("linears never called during calibration stay unquantized: %s", missing)
    return groups


def _collect_inputs(block, module: nn.Module, x: torch.Tensor, kwargs, device, dtype, batch_size):
    """Inputs of ``module`` for host stream ``x``, forward cut short at that module. Yields per batch."""
    box = {}

    def pre(mod, args):
        box["x"] = args[0].detach()
        raise _Stop

    h = module.register_forward_pre_hook(pre)
    try:
        for b0 in range(0, x.shape[0], batch_size):
            xb = x[b0:b0 + batch_size].to(device, dtype)
            kw = _expand_batch(_to_device(kwargs, device), xb.shape[0])
            try:
                with torch.inference_mode():
                    block(xb, **kw)
            except _Stop:
                pass
            yield b0, box.pop("x")
    finally:
        h.remove()


# --------------------------------------------------------------------------------------------
# one linear layer
# --------------------------------------------------------------------------------------------
@dataclass
class LinearResult:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    info: dict = field(default_factory=dict)


def quantize_linear(W: torch.Tensor, stats: LayerStats | None, cfg: QuantizeConfig, name: str) -> LinearResult:
    """Objective → grid → rounding for one weight matrix (fp32, on the compute device)."""
    spec = cfg.spec
    out_f, in_f = W.shape
    spec.validate(in_f, name)
    if not torch.isfinite(W).all():
        raise RcsrError(f"{name}: weights contain NaN/Inf")
    t0 = time.perf_counter()
    info: dict = {"method": cfg.method}
    if stats is None:  # plain RTN, no calibration
        scale, zero = compute_grid(W.float(), spec, clip=cfg.clip)
        S, Z = expand_groups(scale, spec, in_f), expand_groups(zero, spec, in_f)
        codes = rtn(W, S, Z, spec.maxq)
        q = (codes.float() - Z) * S
        info.update(rel_weight_error=float(((W - q).norm() / W.norm().clamp(min=1e-12)).item()))
        info["seconds"] = time.perf_counter() - t0
        return LinearResult(codes.cpu(), scale.cpu(), zero.cpu(), None, info)

    mode, a0 = cfg.alpha_mode
    tgt = prepare_target(W, stats.H, stats.D, alpha=a0, percdamp=cfg.percdamp,
                         sarqc_lambda=cfg.sarqc_lambda if cfg.method != "rtn" else 0.0, name=name)
    act = cfg.act_order != "none"
    order = decode_order(tgt.H, act)
    columns = order if cfg.act_order == "dynamic" else None
    g_idx = None
    if columns is not None:
        glen = spec.group_len(in_f)
        g_idx = torch.empty(in_f, dtype=torch.int32, device=W.device)
        g_idx[order] = (torch.arange(in_f, device=W.device) // glen).to(torch.int32)

    def grid_for(w_ref):
        scale, zero = compute_grid(w_ref, spec, clip=cfg.clip, H=stats.H, w_fp=tgt.W,
                                   drift_lambda=cfg.sarqc_lambda if cfg.method == "rtn" else 0.0,
                                   columns=columns)
        return scale, zero, expand_groups(scale, spec, in_f, g_idx), expand_groups(zero, spec, in_f, g_idx)

    if cfg.method == "rtn":
        scale, zero, S, Z = grid_for(tgt.W)
        codes = rtn(tgt.W, S, Z, spec.maxq)
        W_ref = tgt.W
    else:
        beam = cfg.effective_beam
        alpha_used = None if mode == "sample" else a0
        W_ref = tgt.W_ref
        if mode == "closed-form":
            scale, zero, S, Z = grid_for(W_ref)
            q0 = (successive_round(W_ref, tgt.H, S, Z, spec.maxq, order, beam=1, block=cfg.block).codes.float() - Z) * S
            alpha_used = closed_form_alpha(tgt.W, q0, tgt.WD, tgt.L)
            info["alpha_start"] = a0
            W_ref = shifted_target(tgt.W, tgt.WD, tgt.L, alpha_used)
        scale, zero, S, Z = grid_for(W_ref)
        res = successive_round(W_ref, tgt.H, S, Z, spec.maxq, order, beam=beam, block=cfg.block)
        codes = res.codes
        info["alpha"] = alpha_used
        info["beam"] = beam
    q = (codes.float() - Z) * S
    obj = quadratic_objective(W_ref, q, tgt.H)
    denom = quadratic_objective(W_ref, torch.zeros_like(W_ref), tgt.H)
    # calibration-output error vs the FP layer on the quantized-path inputs: ‖(W − Q) X̃‖² / ‖W X̃‖²
    out_err = quadratic_objective(tgt.W, q, stats.H) / max(quadratic_objective(tgt.W, torch.zeros_like(q), stats.H), 1e-30)
    info.update(objective=obj, rel_objective=obj / max(denom, 1e-30), rel_output_error=out_err,
                rel_weight_error=float(((tgt.W - q).norm() / tgt.W.norm().clamp(min=1e-12)).item()))
    info["seconds"] = time.perf_counter() - t0
    return LinearResult(codes.cpu(), scale.cpu(), zero.cpu(), None if g_idx is None else g_idx.cpu(), info)


def _dequant_into(module: nn.Linear, r: LinearResult, spec: QuantSpec) -> None:
    in_f = module.weight.shape[1]
    S = expand_groups(r.scale, spec, in_f, r.g_idx)
    Z = expand_groups(r.zero, spec, in_f, r.g_idx)
    with torch.no_grad():
        module.weight.copy_(((r.codes.float() - Z) * S).to(module.weight.device, module.weight.dtype))


# --------------------------------------------------------------------------------------------
# the whole model
# --------------------------------------------------------------------------------------------
class WorkDir:
    """Per-block results of an interrupted-or-running quantization (for ``--resume``)."""

    def __init__(self, path: Path, cfg: QuantizeConfig, model_id: str):
        self.path = Path(path)
        self.meta = {"config": asdict(cfg), "model": model_id, "format": 1}

    def open(self, resume: bool) -> set[int]:
        """Create or validate; return the indices of finished blocks (to skip)."""
        meta_file = self.path / "run.json"
        if self.path.exists() and resume and meta_file.exists():
            old = json.loads(meta_file.read_text())
            if old != self.meta:
                raise RcsrError(f"--resume: {self.path} belongs to a run with different settings; remove it or drop --resume")
            return {int(p.stem.split("_")[1]) for p in self.path.glob("block_*.safetensors")}
        if self.path.exists():
            import shutil
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        meta_file.write_text(json.dumps(self.meta, indent=1))
        return set()

    def save_block(self, idx: int, results: dict[str, LinearResult]) -> None:
        from safetensors.torch import save_file
        tensors, infos = {}, {}
        for name, r in results.items():
            tensors[f"{name}.codes"] = r.codes.contiguous()
            tensors[f"{name}.scale"] = r.scale.contiguous()
            tensors[f"{name}.zero"] = r.zero.contiguous()
            if r.g_idx is not None:
                tensors[f"{name}.g_idx"] = r.g_idx.contiguous()
            infos[name] = r.info
        tmp = self.path / f".block_{idx:04d}.tmp"
        save_file(tensors, str(tmp), metadata={"info": json.dumps(infos)})
        tmp.rename(self.path / f"block_{idx:04d}.safetensors")

    def load_block(self, idx: int) -> dict[str, LinearResult]:
        from safetensors import safe_open
        out: dict[str, LinearResult] = {}
        with safe_open(str(self.path / f"block_{idx:04d}.safetensors"), "pt") as f:
            infos = json.loads(f.metadata()["info"])
            keys = set(f.keys())
            for name, info in infos.items():
                g = f.get_tensor(f"{name}.g_idx") if f"{name}.g_idx" in keys else None
                out[name] = LinearResult(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                         f.get_tensor(f"{name}.zero"), g, info)
        return out


def quantize_model(model, tokenizer, cfg: QuantizeConfig, *, device: str = "cpu", work_dir: Path,
                   resume: bool = False, model_id: str = "", progress: bool = True,
                   fp_capture_bytes: int | None = None):
    """Quantize every linear of every decoder block. Returns ``({full_name: LinearResult}, report)``.

    ``fp_capture_bytes`` bounds the host cache of one block's FP-stream group inputs (default
    ``FP_CAPTURE_BYTES``); above it the FP stream falls back to one cut-short forward per group."""
    fp_capture_bytes = FP_CAPTURE_BYTES if fp_capture_bytes is None else fp_capture_bytes
    from .data import calibration_windows

    cfg.validate()
    layers, prefix = find_decoder_layers(model)
    for pname, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise RcsrError(f"model weights contain NaN/Inf: {pname}")
    dtype = next(model.parameters()).dtype
    wd = WorkDir(work_dir, cfg, model_id)
    done = wd.open(resume)
    if done:
        log.info("resuming: %d finished blocks found", len(done))
    t_start = time.perf_counter()
    results: dict[str, LinearResult] = {}
    report_layers = []
    spec = cfg.spec

    selected = set(cfg.block_set(len(layers)))
    # the head's inputs come out of the last block: with --lm-head every block is propagated
    last = len(layers) - 1 if cfg.lm_head else max(selected)
    head = find_output_head(model) if cfg.lm_head else None
    if head is not None:
        spec.validate(head.module.in_features, head.name)
    if not cfg.needs_calibration:
        for i in tqdm(sorted(selected), desc="rtn", disable=not progress):
            block = layers[i]
            if i in done:
                blk = wd.load_block(i)
            else:
                t0 = time.perf_counter()
                blk = {n: quantize_linear(m.weight.data.to(device).float(), None, cfg, f"{prefix}.{i}.{n}")
                       for n, m in linear_modules(block).items()}
                wd.save_block(i, blk)
            for n, r in blk.items():
                results[f"{prefix}.{i}.{n}"] = r
                _dequant_into(dict(block.named_modules())[n], r, spec)
            report_layers.append({"block": i, "modules": {n: r.info for n, r in blk.items()}})
        if head is not None:
            r = _head_result(wd, len(layers), head, spec, lambda: quantize_linear(
                head.module.weight.data.to(device).float(), None, cfg, head.name))
            results[head.store_name] = r
            report_layers.append({"block": len(layers), "modules": {head.name: r.info}})
        return results, _report(cfg, report_layers, time.perf_counter() - t_start)

    windows = calibration_windows(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    t_cap = time.perf_counter()
    x0, block_kwargs = capture_block_inputs(model, layers, windows, cfg.batch_size, device)
    x0 = x0.float() if dtype == torch.float32 else x0
    q_stream = x0
    fp_stream = x0.clone() if cfg.needs_fp_stream else None
    log.info("captured %d block inputs in %.1fs", x0.shape[0], time.perf_counter() - t_cap)
    mode, _ = cfg.alpha_mode
    bs = cfg.batch_size

    bar = tqdm(range(last + 1), desc=f"{cfg.method} W{cfg.bits}", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = layers[i]
        kwargs = block_kwargs[i]
        if i not in selected:  # left in full precision: both streams see the same block
            block.to(device)
            q_stream = _run_block(block, q_stream, kwargs, device, bs, dtype)
            if fp_stream is not None:
                fp_stream = _run_block(block, fp_stream, kwargs, device, bs, dtype)
            block.to("cpu")
            continue
        fp_block = copy.deepcopy(block).to(device) if fp_stream is not None else None
        fp_next = fp_cache = None
        block.to(device)
        mods = dict(block.named_modules())
        if i in done:
            blk = wd.load_block(i)
            for n, r in blk.items():
                _dequant_into(mods[n], r, spec)
        else:
            blk = {}
            groups = discover_groups(block, q_stream, kwargs, device, dtype)
            if fp_block is not None:
                fmods = dict(fp_block.named_modules())
                firsts = {g[0]: fmods[g[0]] for g in groups}
                elem = torch.finfo(dtype).bits // 8
                need = fp_stream.shape[0] * fp_stream.shape[1] * sum(m.in_features for m in firsts.values()) * elem
                if need <= fp_capture_bytes:
                    fp_next, fp_cache = _run_block_capturing(fp_block, fp_stream, kwargs, device, bs, dtype, firsts)
            for gi, group in enumerate(groups):
                first = mods[group[0]]
                stats = LayerStats(first.in_features, device, with_d=fp_stream is not None)
                alphas = (sample_alphas(q_stream.shape[0], cfg.alpha_m, _seed(cfg.seed, i, gi))
                          if mode == "sample" else None)
                if fp_cache is not None:
                    fp_iter = _cached_inputs(fp_cache.pop(group[0]), device, bs)
                elif fp_block is not None:
                    fp_iter = _collect_inputs(fp_block, fmods[group[0]], fp_stream, kwargs, device, dtype, bs)
                else:
                    fp_iter = None
                q_iter = _collect_inputs(block, first, q_stream, kwargs, device, dtype, bs)
                try:
                    for b0, xq in q_iter:
                        xf = next(fp_iter)[1] if fp_iter is not None else None
                        scale = 1.0 if alphas is None else alphas[b0:b0 + xq.shape[0]]
                        stats.add(xq, xf, dx_scale=scale)
                finally:  # removes the hooks even if a generator is left suspended
                    q_iter.close()
                    if fp_iter is not None:
                        fp_iter.close()
                for n in group:
                    full = f"{prefix}.{i}.{n}"
                    bar.set_postfix_str(n)
                    r = quantize_linear(mods[n].weight.data.float(), stats, cfg, full)
                    _dequant_into(mods[n], r, spec)
                    blk[n] = r
                del stats
            wd.save_block(i, blk)
        q_stream = _run_block(block, q_stream, kwargs, device, bs, dtype)
        if fp_stream is not None:
            fp_stream = fp_next if fp_next is not None else _run_block(fp_block, fp_stream, kwargs, device, bs, dtype)
        del fp_next, fp_cache
        if not torch.isfinite(q_stream).all():
            raise RcsrError(f"block {i}: NaN/Inf activations on the quantized path")
        block.to("cpu")
        del fp_block
        for n, r in blk.items():
            results[f"{prefix}.{i}.{n}"] = r
        entry = {"block": i, "seconds": time.perf_counter() - t0, "modules": {n: r.info for n, r in blk.items()}}
        if i not in done:  # the linears that shared one set of calibration statistics
            entry["groups"] = groups
        report_layers.append(entry)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if head is not None:
        t0 = time.perf_counter()
        bar.set_postfix_str(head.name)

        def run():
            stats = _head_stats(head, q_stream, fp_stream, cfg, device, dtype, len(layers))
            return quantize_linear(head.module.weight.data.to(device).float(), stats, cfg, head.name)

        r = _head_result(wd, len(layers), head, spec, run)
        results[head.store_name] = r
        report_layers.append({"block": len(layers), "seconds": time.perf_counter() - t0,
                              "modules": {head.name: r.info}})
    return results, _report(cfg, report_layers, time.perf_counter() - t_start)


def _head_stats(head: OutputHead, q_stream, fp_stream, cfg: QuantizeConfig, device, dtype, index: int) -> LayerStats:
    """``H``/``D`` of the head: its inputs are the final norm of each stream's last-block output."""
    mode, _ = cfg.alpha_mode
    stats = LayerStats(head.module.in_features, device, with_d=fp_stream is not None)
    alphas = sample_alphas(q_stream.shape[0], cfg.alpha_m, _seed(cfg.seed, index, 0)) if mode == "sample" else None
    norm = head.norm.to(device)
    try:
        with torch.inference_mode():
            for b0 in range(0, q_stream.shape[0], cfg.batch_size):
                xq = norm(q_stream[b0:b0 + cfg.batch_size].to(device, dtype))
                xf = None if fp_stream is None else norm(fp_stream[b0:b0 + cfg.batch_size].to(device, dtype))
                scale = 1.0 if alphas is None else alphas[b0:b0 + xq.shape[0]]
                stats.add(xq, xf, dx_scale=scale)
    finally:
        norm.to("cpu")
    return stats


def _head_result(wd: "WorkDir", index: int, head: OutputHead, spec: QuantSpec, quantize) -> LinearResult:
    """Quantize the head (or reuse the saved result with --resume) and write its dequantized weight
    back (with a tied head that is the input embedding too)."""
    done = (wd.path / f"block_{index:04d}.safetensors").exists()
    r = wd.load_block(index)[head.name] if done else quantize()
    if not done:
        wd.save_block(index, {head.name: r})
    _dequant_into(head.module, r, spec)
    return r


def _seed(seed: int, block: int, group: int) -> int:
    return (seed * 1_000_003 + block * 1009 + group) % (2 ** 32)


def _report(cfg: QuantizeConfig, layers: list, seconds: float) -> dict:
    return {"config": asdict(cfg), "seconds": seconds, "layers": layers}
