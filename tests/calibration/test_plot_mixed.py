"""tools/plot_mixed.py: bits per weight of uniform, allocated and rule rows; the table and the plot."""
import json

from click.testing import CliRunner
from tool_support import load_tool


def test_table_bits_and_plot(tmp_path, tiny_llama_dir):
    base = {"method": "snrq-mse", "config": {"bits": 3, "group_size": 32, "sym": True}}
    rule = {"method": "snrq-mse", "config": {"bits": 3, "group_size": 32, "sym": True, "module_grids": {
        "model.layers.0.mlp.down_proj": {"bits": 4}, "model.layers.1.mlp.down_proj": {"bits": 4}}}}
    rows = [{**base, "setting": "w3g64", "seed": 0, "ppl": 80.0},
            {**base, "setting": "w3g64", "seed": 1, "ppl": 82.0},
            {"method": "snrq-mse", "setting": "avg3.25mix", "seed": 0, "ppl": 78.0,
             "allocation": {"achieved_bytes": 1000, "params": 2400}},
            {**rule, "setting": "rule3+1g64", "seed": 0, "ppl": 76.0},
            {**base, "method": "gptq-mse", "setting": "w3g64", "seed": 0, "ppl": 99.0},  # another method
            {**base, "setting": "w3g64", "seed": 2, "ppl": float("nan")}]                # failed row
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = tmp_path / "mixed.png"
    res = CliRunner().invoke(load_tool("plot_mixed").main, ["--data", str(data), "--model", str(tiny_llama_dir),
                                                             "--out", str(png)])
    assert res.exit_code == 0, res.output
    table = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in res.output.splitlines()
             if ln.startswith("| ") and not ln.startswith("| setting")}
    assert set(table) == {"w3g64", "avg3.25mix", "rule3+1g64"}
    # W3 at group 32 with fp16 scales: exactly 3.5 bits per weight; the allocation's own bytes; the rule between
    assert table["w3g64"][:2] == ["uniform", "3.500"] and table["w3g64"][-2:] == ["81.00 ± 1.41", "1.000"]
    assert table["avg3.25mix"][:2] == ["allocated", "3.333"]
    assert table["rule3+1g64"][0] == "rule" and 3.5 < float(table["rule3+1g64"][1]) < 4.5
    assert png.is_file() and png.stat().st_size > 1000
    bad = CliRunner().invoke(load_tool("plot_mixed").main, ["--data", str(data), "--method", "nope",
                                                             "--model", str(tiny_llama_dir)])
    assert bad.exit_code == 1 and "no rows of method 'nope'" in bad.output
