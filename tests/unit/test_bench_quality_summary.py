"""The quality benchmark's markdown summary (tools/bench_quality.py --summary), on synthetic rows."""
import json

from tool_support import load_tool


def _load_tool():
    return load_tool("bench_quality")


def _row(setting, method, seed, ppl, n=32, L=512, blocks="", alpha=None, secs=10.0):
    return {"setting": setting, "method": method, "seed": seed, "ppl": ppl, "nsamples": n, "seqlen": L,
            "blocks": blocks, "mean_alpha": alpha, "quant_seconds": secs}


def test_summary_tables_ratios_and_labels(tmp_path):
    bq = _load_tool()
    rows = [_row("fp", "fp", 0, 50.0),
            _row("w3g64", "gptq", 0, 100.0, alpha=0.0), _row("w3g64", "gptq", 1, 200.0, alpha=0.0),
            _row("w3g64", "snrq", 0, 60.0), _row("w3g64", "snrq", 1, 90.0),
            _row("w3g64", "gptq", 0, 120.0, n=128), _row("w3g64", "snrq", 0, 60.0, n=128),
            _row("w3g64", "snrq", 0, float("nan"), blocks="0-9"),          # timing row: left out
            _row("w2g64", "snrq", 0, 1234567.0)]
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = bq.render_summary(p)
    lines = md.splitlines()
    assert "**w3g64** (FP 50.00)" in lines and "**w2g64** (FP 50.00)" in lines
    gptq = next(line for line in lines if line.startswith("| gptq |"))
    snrq = next(line for line in lines if line.startswith("| snrq |"))
    assert "150.00 ± 70.71" in gptq and "| 1.00 |" in gptq and "0.000" in gptq
    assert "75.00 ± 21.21" in snrq and "| 0.50 |" in snrq          # 75 / 150
    # the other calibration size is labelled and compared with GPTQ at the same size
    big = next(line for line in lines if line.startswith("| snrq (128×512) |"))
    assert "| 0.50 |" in big                                          # 60 / 120
    assert "1,234,567.00" in md and "nan" not in md.lower()
    # every table row has as many cells as its header
    assert md.count("| method |") == 2
    for block in md.split("\n\n"):
        t = [x for x in block.splitlines() if x.startswith("|")]
        assert len({x.count("|") for x in t}) <= 1
