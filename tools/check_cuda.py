#!/usr/bin/env python
"""The quantizer on CUDA against the quantizer on the CPU, and its speed on both.

Two parts, each written as JSON lines (``--json``) and summarised on stdout:

* ``rounding``: ``rounding.successive_round`` (greedy = GPTQ/SNRQ, and K-SNRQ with ``--beam``) on one
  random layer ``W [out, in]`` with a Gram matrix ``H = XᵀX / n`` of random correlated activations.
  Reports the per-row objective ``f(q)`` and the wall time on each device, the share of codes that agree
  and the ratio of the mean objectives (CUDA ÷ CPU).  Codes need not agree bit for bit: the two devices
  sum in different orders, so a near tie can round the other way and the feedback carries it on; the
  objective shows whether either decode is worse.
* ``model``: ``calib.quantize_model`` on a tiny random Llama (and, with ``--moe``, a tiny Qwen3-MoE) on
  each device with the same calibration windows, per method.  Reports the share of equal codes, the
  mean relative output error of the modules (``info["rel_output_error"]``) on each device and the wall
  time.

Without CUDA it exits with code 2 (``--cpu-only`` times the CPU side alone, for a local baseline).
Timings use ``torch.cuda.synchronize`` around each call; one warm-up call precedes the timed one.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, dev: str):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def random_layer(out_f: int, in_f: int, seed: int):
    """``W`` and a damped Gram matrix of correlated activations (a few large channels, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    n = max(2 * in_f, 2048)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    X = torch.randn(n, in_f, generator=g) @ mix
    X[:, torch.randperm(in_f, generator=g)[: max(1, in_f // 64)]] *= 8.0
    H = (X.T @ X / n).double()
    H += 0.01 * torch.diag(H).mean() * torch.eye(in_f, dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    return W, H


def rounding_case(out_f: int, in_f: int, bits: int, group_size: int, beam: int, devices: list[str], seed: int):
    from rcsr_deploy.grid import QuantSpec, compute_grid, expand_groups
    from rcsr_deploy.rounding import decode_order, successive_round

    W, H = random_layer(out_f, in_f, seed)
    spec = QuantSpec(bits, group_size, True)
    scale, zero = compute_grid(W, spec, clip="minmax")
    S, Z = expand_groups(scale, spec, in_f), expand_groups(zero, spec, in_f)
    order = decode_order(H, True)
    res = {}
    for dev in devices:
        args = [t.to(dev) for t in (W, H, S, Z)]

        def call(args=args):
            return successive_round(args[0], args[1], args[2], args[3], spec.maxq, order.to(dev), beam=beam)
        call()                                                   # warm-up (CUDA context, allocator)
        r, secs = _timed(call, dev)
        res[dev] = (r.codes.cpu(), r.objective.cpu(), secs)
    row = {"part": "rounding", "out": out_f, "in": in_f, "bits": bits, "group_size": group_size, "beam": beam}
    for dev, (_, obj, secs) in res.items():
        row[f"{dev.split(':')[0]}_s"] = secs
        row[f"{dev.split(':')[0]}_objective"] = float(obj.mean())
    if len(res) == 2:
        (c0, o0, _), (c1, o1, _) = res.values()
        row["codes_equal"] = float((c0 == c1).float().mean())
        row["objective_ratio"] = float(o1.mean() / o0.mean())
    return row


def model_case(kind: str, method: str, extra: dict, devices: list[str], seed: int, nsamples: int, seqlen: int):
    from rcsr_deploy.calib import QuantizeConfig, quantize_model
    from tests import factories

    if kind == "llama":
        base = factories.tiny_llama(seed=seed, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2,
                                    vocab_size=1024)
    else:
        base = factories.tiny_moe(kind, vocab_size=1024, seed=seed)
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, base.config.vocab_size, (nsamples, seqlen), generator=g)
    cfg_kw = dict(method=method, bits=4, group_size=32, nsamples=nsamples, seqlen=seqlen, seed=seed,
                  batch_size=8, moe_min_tokens=8)
    cfg_kw.update(extra)
    out = {}
    for dev in devices:
        model = copy.deepcopy(base)
        cfg = QuantizeConfig(**cfg_kw)
        with tempfile.TemporaryDirectory() as wd:
            (results, _), secs = _timed(lambda: quantize_model(model, None, cfg, device=dev, work_dir=Path(wd),
                                                               progress=False, windows=windows), dev)
        out[dev] = (results, secs)
    row = {"part": "model", "model": kind, "method": method, **{k: v for k, v in extra.items()}}
    for dev, (results, secs) in out.items():
        errs = [r.info["rel_output_error"] for r in results.values() if "rel_output_error" in r.info]
        key = dev.split(":")[0]
        row[f"{key}_s"] = secs
        row[f"{key}_rel_output_error"] = sum(errs) / max(1, len(errs))
        row["modules"] = len(results)
    if len(out) == 2:
        (r0, _), (r1, _) = out.values()
        assert r0.keys() == r1.keys()
        eq = sum(int((r0[n].codes == r1[n].codes).sum()) for n in r0)
        row["codes_equal"] = eq / sum(r0[n].codes.numel() for n in r0)
        row["error_ratio"] = row["cuda_rel_output_error"] / max(row["cpu_rel_output_error"], 1e-30)
    return row


METHODS = [("gptq", {"alpha": "0.0"}), ("snrq", {}), ("snrq", {"alpha": "closed-form"}),
           ("ksnrq", {"beam": 4}), ("snrq", {"sarqc_lambda": 0.1})]


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--sizes", default="1024x1024,4096x4096,11008x4096", show_default=True,
              help="OUTxIN rounding layers timed on CUDA")
@click.option("--cpu-sizes", default="1024x1024", show_default=True,
              help="OUTxIN rounding layers also run on the CPU (cross-check and CPU time)")
@click.option("--beams", default="1,4", show_default=True)
@click.option("--moe/--no-moe", default=True, show_default=True, help="also a tiny Qwen3-MoE model")
@click.option("--cpu-only", is_flag=True, help="run the CPU side only (local baseline)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--seed", default=0, show_default=True)
def main(sizes, cpu_sizes, beams, moe, cpu_only, json_path, seed):
    if not cpu_only and not torch.cuda.is_available():
        click.echo("error: no CUDA device (--cpu-only times the CPU side alone)", err=True)
        sys.exit(2)
    rows = []

    def emit(row):
        rows.append(row)
        click.echo(json.dumps(row))
        if json_path:
            Path(json_path).write_text("".join(json.dumps(r) + "\n" for r in rows))

    env = {"part": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "gpu": None if cpu_only else torch.cuda.get_device_name(0)}
    emit(env)
    both = ["cpu"] if cpu_only else ["cpu", "cuda"]
    gpu_only = ["cpu"] if cpu_only else ["cuda"]
    cpu_set = {s for s in cpu_sizes.split(",") if s}
    for size in [s for s in sizes.split(",") if s]:
        out_f, in_f = (int(v) for v in size.lower().split("x"))
        for beam in (int(b) for b in beams.split(",")):
            emit(rounding_case(out_f, in_f, 4, 128, beam, both if size in cpu_set else gpu_only, seed))
    kinds = ["llama"] + (["qwen3_moe"] if moe else [])
    for kind in kinds:
        for method, extra in METHODS:
            emit(model_case(kind, method, extra, both, seed, nsamples=16, seqlen=128))


if __name__ == "__main__":
    main()
