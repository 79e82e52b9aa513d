#!/usr/bin/env python
"""Perplexity against size: uniform grids, ``--avg-bits`` allocations and the simple rule (docs/RESULTS.md).

Reads ``tools/bench_quality.py`` rows (JSON lines) of one method, groups them by setting, and prints a
markdown table -- bits per quantized weight, perplexity per seed, mean ± sd, ratio to uniform W3 g64 --
and writes the plot (perplexity, log scale, against bits per weight).  Bits per weight count what the
checkpoint stores for the quantized matrices: codes, fp16 scales and uint8 zeros (asymmetric), as
``rcsr_deploy.allocate.Unit.nbytes`` does: for ``--avg-bits`` rows the allocation's achieved bytes, for
uniform and rule rows the same count over the model's decoder matrices.

    python tools/plot_mixed.py --data docs/data/mixed-precision.jsonl --data docs/data/quality.jsonl \\
        --method snrq-mse --out docs/mixed-precision.png
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import SETTINGS  # noqa: E402

UNIFORM = re.compile(r"^w(\d)(g(\d+)|pc)$")


def model_shapes(model: str) -> list[tuple[str, tuple[int, int]]]:
    """(module name, (out, in)) of every decoder-block matrix the quantizer takes."""
    from rcsr_deploy.allocate import block_units
    from rcsr_deploy.assets import load_model, resolve_model
    from rcsr_deploy.calib.adapter import find_decoder_layers

    m, _ = load_model(resolve_model(model))
    layers, prefix = find_decoder_layers(m)
    out = []
    for i, block in enumerate(layers):
        for u in block_units(block, i, prefix):
            out += list(zip(u.modules, u.shapes))
    return out


def grid_bits(shapes, grid_of, sym: bool = True) -> float:
    """Bits per quantized weight when module ``name`` is on ``grid_of(name) = (bits, group size)``."""
    total = params = 0
    for name, (o, i) in shapes:
        bits, gs = grid_of(name)
        g = 1 if gs == -1 else i // gs
        total += 8 * (o * i * bits // 8 + o * g * 2 + (0 if sym else o * g))
        params += o * i
    return total / params


def row_bits(r: dict, shapes) -> float | None:
    alloc = r.get("allocation")
    if alloc:
        return 8 * alloc["achieved_bytes"] / alloc["params"]
    cfg = r.get("config") or {}
    bits, gs = cfg.get("bits"), cfg.get("group_size")
    if bits is None:
        return None
    grids = cfg.get("module_grids") or {}
    return grid_bits(shapes, lambda n: (grids[n].get("bits", bits), grids[n].get("group_size", gs)) if n in grids
                     else (bits, gs), cfg.get("sym", True))


def kind(setting: str) -> str:
    return "uniform" if UNIFORM.match(setting) else "rule" if setting.startswith("rule") else "allocated"


@click.command()
@click.option("--data", "files", multiple=True, type=click.Path(exists=True, dir_okay=False), required=True,
              help="bench_quality JSON lines (repeatable; a later file's row replaces an earlier one)")
@click.option("--method", default="snrq-mse", show_default=True)
@click.option("--model", default="default", show_default=True, help="the model the rows quantized (for sizes)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the plot (PNG) here")
def main(files, method, model, out):
    rows = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("method") == method and not r.get("blocks") and r["ppl"] == r["ppl"] and r["setting"] in SETTINGS:
                rows[(r["setting"], r["seed"])] = r
    if not rows:
        raise click.ClickException(f"no rows of method {method!r} in {', '.join(files)}")
    shapes = model_shapes(model)
    by: dict[str, dict] = {}
    for (setting, seed), r in rows.items():
        b = row_bits(r, shapes)
        d = by.setdefault(setting, {"bits": [], "ppl": {}})
        d["bits"].append(b)
        d["ppl"][seed] = r["ppl"]
    ref = by.get("w3g64")
    ref_ppl = None if ref is None else sum(ref["ppl"].values()) / len(ref["ppl"])
    seeds = sorted({s for d in by.values() for s in d["ppl"]})
    click.echo("| setting | kind | bits/weight | " + " | ".join(f"seed {s}" for s in seeds)
               + " | mean ± sd | ÷ uniform W3 g64 |")
    click.echo("|---|---|---:|" + "---:|" * (len(seeds) + 2))
    order = sorted(by, key=lambda s: sum(by[s]["bits"]) / len(by[s]["bits"]))
    points = []
    for s in order:
        d = by[s]
        p = list(d["ppl"].values())
        mean = sum(p) / len(p)
        sd = math.sqrt(sum((x - mean) ** 2 for x in p) / (len(p) - 1)) if len(p) > 1 else None
        bits = sum(d["bits"]) / len(d["bits"])
        cells = [f"{d['ppl'][x]:,.2f}" if x in d["ppl"] else "–" for x in seeds]
        click.echo(f"| {s} | {kind(s)} | {bits:.3f} | " + " | ".join(cells) + f" | {mean:,.2f}"
                   + (f" ± {sd:,.2f}" if sd is not None else "") + " | "
                   + (f"{mean / ref_ppl:.3f}" if ref_ppl else "–") + " |")
        points.append((s, kind(s), bits, mean, sd))
    if out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        style = {"uniform": ("o", "tab:blue"), "allocated": ("s", "tab:red"), "rule": ("^", "tab:green")}
        for k, (mk, col) in style.items():
            pts = [p for p in points if p[1] == k]
            if not pts:
                continue
            ax.errorbar([p[2] for p in pts], [p[3] for p in pts], yerr=[p[4] or 0 for p in pts], fmt=mk,
                        color=col, label={"uniform": "uniform grid", "allocated": "--avg-bits (allocated)",
                                          "rule": "rule: down_proj, first/last block +1 bit"}[k], capsize=3,
                        linestyle="-" if k == "uniform" else "none")
            for p in pts:
                ax.annotate(p[0], (p[2], p[3]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("bits per quantized weight (codes + scales + zeros)")
        ax.set_ylabel(f"perplexity ({method})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        click.echo(f"plot: {out}", err=True)


if __name__ == "__main__":
    main()
