"""Perplexity of a causal LM on a token stream (model-agnostic: any HF ``*ForCausalLM``).

Protocol: the stream is cut into non-overlapping windows of ``seqlen`` tokens; a last window
shorter than ``seqlen`` is dropped (so every window sees the same context length and results for
different ``max_tokens`` are comparable). With ``bos_token_id`` the model reads ``[BOS] + window``
(``seqlen + 1`` ids) and every one of the ``seqlen`` window tokens is scored; without it the model
reads the window and its first token is only context (``seqlen - 1`` scored tokens per window).
The negative log-likelihood is summed in float64 over all scored tokens and
``ppl = exp(nll / tokens)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import RcsrError


def perplexity(model, tokens: torch.Tensor, seqlen: int, *, bos_token_id: int | None,
               batch_size: int = 1, device="cpu", progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``tokens`` (1-D LongTensor); see the module docstring.

    Returns ``{"ppl", "nll" (mean NLL per scored token, nats), "nll_sum", "tokens" (scored),
    "windows", "seqlen"}``.
    """
    from tqdm.auto import tqdm

    tokens = torch.as_tensor(tokens).reshape(-1).long()
    if seqlen < 2:
        raise RcsrError(f"seqlen must be at least 2 (got {seqlen})")
    if batch_size < 1:
        raise RcsrError(f"batch_size must be positive (got {batch_size})")
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise RcsrError(f"evaluation text has {tokens.numel()} tokens; need at least seqlen = {seqlen}")
    data = tokens[: windows * seqlen].view(windows, seqlen)
    if bos_token_id is not None:
        bos = torch.full((windows, 1), int(bos_token_id), dtype=torch.long)
        data = torch.cat([bos, data], dim=1)  # [windows, seqlen + 1]
    scored_per_window = data.shape[1] - 1

    was_training = model.training
    model.eval()
    total = 0.0  # python float = float64
    try:
        with torch.inference_mode(), tqdm(total=windows, desc="perplexity", unit="win",
                                          disable=not progress, leave=False) as bar:
            for i in range(0, windows, batch_size):
                batch = data[i:i + batch_size].to(device)
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                # Score position t's prediction of token t+1, one window at a time (bounds memory).
                for b in range(batch.shape[0]):
                    lg = logits[b, :-1, :].float()
                    nll = F.cross_entropy(lg, batch[b, 1:], reduction="none")
                    total += float(nll.double().sum())
                del out, logits
                bar.update(batch.shape[0])
    finally:
        if was_training:
            model.train()

    n = windows * scored_per_window
    mean = total / n
    if not math.isfinite(mean):
        raise RcsrError("perplexity is not finite: the model produced NaN/Inf")
    ppl = math.exp(mean) if mean < 709.0 else math.inf
    if not math.isfinite(ppl):
        raise RcsrError(f"perplexity is not finite: mean NLL {mean:.1f} overflows exp()")
    return {"ppl": ppl, "nll": mean, "nll_sum": total, "tokens": n, "windows": windows, "seqlen": seqlen}


def held_back_pass(model, windows: torch.Tensor, *, bos_token_id: int | None, device="cpu", reference=None):
    """One pass over held-back windows (``[n, seqlen]`` token ids): the mean NLL per scored token (as
    :func:`perplexity` scores it: ``[BOS] + window``, every window token scored) and every decoder block's
    output.

    Without ``reference`` the block outputs are returned (bf16, per window and block: the FP model's, to
    compare against); with the ``reference`` of the FP model, the relative error of every block's output,
    ``Σ‖h − h_fp‖² / Σ‖h_fp‖²`` over all held-back tokens.  Returns ``(nll, outputs_or_errors, window_nll)``:
    ``window_nll`` is each window's mean NLL per scored token (for paired comparisons of two models)."""
    from .calib.adapter import find_decoder_layers

    layers, _ = find_decoder_layers(model)
    box: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, _i=i: box.__setitem__(
        _i, (out[0] if isinstance(out, tuple) else out).detach())) for i, layer in enumerate(layers)]
    num = torch.zeros(len(layers), dtype=torch.float64)
    den = torch.zeros(len(layers), dtype=torch.float64)
    outputs: list[list[torch.Tensor]] = []
    total, scored = 0.0, 0
    window_nll: list[float] = []
    try:
        with torch.inference_mode():
            for k, w in enumerate(windows):
                ids = w.reshape(1, -1).long()
                if bos_token_id is not None:
                    ids = torch.cat([torch.full((1, 1), int(bos_token_id), dtype=torch.long), ids], 1)
                out = model(input_ids=ids.to(device), use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                s = float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(device), reduction="sum").double())
                total += s
                scored += ids.shape[1] - 1
                window_nll.append(s / max(ids.shape[1] - 1, 1))
                if reference is None:
                    outputs.append([box[i].to("cpu", torch.bfloat16) for i in range(len(layers))])
                else:
                    for i in range(len(layers)):
                        ref = reference[k][i].to(box[i].device, torch.float32)
                        num[i] += float((box[i].float() - ref).pow(2).sum())
                        den[i] += float(ref.pow(2).sum())
                box.clear()
    finally:
        for h in hooks:
            h.remove()
    nll = total / max(scored, 1)
    if not math.isfinite(nll):
        raise RcsrError("held-back NLL is not finite: the model produced NaN/Inf")
    return nll, outputs if reference is None else (num / den.clamp(min=1e-30)).tolist(), window_nll
