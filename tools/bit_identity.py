#!/usr/bin/env python
"""Bit-identity check of a refactor: quantize the default model's blocks 0-3 with a set of methods, then
compare two such runs tensor by tensor (codes, scales, zeros, g_idx), quantization_config and every
quant_report objective value.

    git worktree add /tmp/before <old commit>
    PYTHONPATH=/tmp/before python tools/bit_identity.py run /tmp/bitid/before
    python tools/bit_identity.py run /tmp/bitid/after
    python tools/bit_identity.py compare /tmp/bitid/before /tmp/bitid/after

One torch thread (the CPU GEMMs' summation order must not vary between runs).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

RUNS = {
    "snrq": dict(method="snrq"),
    "ksnrq": dict(method="ksnrq", beam=4),
    "gptq-asym-dyn-head": dict(method="gptq", sym=False, act_order="dynamic", lm_head=True),
    "rtn": dict(method="rtn"),
    "rtn-head": dict(method="rtn", lm_head=True, group_size=32),
    "snrq-cf-sarqc-chan": dict(method="snrq", alpha="closed-form", sarqc_lambda=0.1, group_size=-1),
}
REPORT_KEYS = ("objective", "rel_objective", "rel_output_error", "rel_weight_error", "alpha", "alpha_start", "beam",
               "method")


def run(root: Path) -> None:
    torch.set_num_threads(1)
    try:
        from rcsr_deploy.calib import QuantizeConfig
    except ImportError:  # before the calibration package existed
        from rcsr_deploy.calibrate import QuantizeConfig
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    for name, kw in RUNS.items():
        cfg = QuantizeConfig(**{**dict(bits=3, group_size=64, blocks="0-3", nsamples=16, seqlen=256), **kw})
        quantize_to_checkpoint("default", root / name, cfg, device="cpu", overwrite=True, progress=False)
        print(name, "done", flush=True)


def compare(a_root: Path, b_root: Path) -> bool:
    from safetensors import safe_open

    ok = True
    for n in RUNS:
        a, b = a_root / n, b_root / n
        fa, fb = safe_open(str(a / "model.safetensors"), "pt"), safe_open(str(b / "model.safetensors"), "pt")
        ka, kb = set(fa.keys()), set(fb.keys())
        diff = [k for k in ka & kb if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
        qa = json.loads((a / "config.json").read_text())["quantization_config"]
        qb = json.loads((b / "config.json").read_text())["quantization_config"]
        for q in (qa, qb):
            q.pop("rcsr_version", None)
            for k in ("moe_calib", "moe_min_tokens", "avg_bits", "widths", "group_sizes", "alloc_check", "bits_rules", "module_grids"):
                q.get("method", {}).pop(k, None)  # settings added later, at their no-op defaults
        ra, rb = json.loads((a / "quant_report.json").read_text()), json.loads((b / "quant_report.json").read_text())
        va = {(e["block"], m, k): v.get(k) for e in ra["layers"] for m, v in e["modules"].items() for k in REPORT_KEYS}
        vb = {(e["block"], m, k): v.get(k) for e in rb["layers"] for m, v in e["modules"].items() for k in REPORT_KEYS}
        same = ka == kb and not diff and qa == qb and va == vb
        ok &= same
        print(f"{n:22s} tensors {len(ka):4d} keys-equal {ka == kb} differing {len(diff)} qconfig-equal {qa == qb} "
              f"report-values-equal {va == vb} ({len(va) // len(REPORT_KEYS)} modules) -> "
              f"{'BIT-IDENTICAL' if same else 'DIFFERENT'}")
    print("ALL BIT-IDENTICAL" if ok else "MISMATCH")
    return ok


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
    else:
        sys.exit(__doc__)
