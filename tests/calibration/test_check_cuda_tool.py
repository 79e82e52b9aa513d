"""tools/check_cuda.py: the CUDA-vs-CPU quantizer check (its GPU half runs on a lent GPU only)."""
import json

import torch
from click.testing import CliRunner
from tool_support import load_tool


def _tool():
    return load_tool("check_cuda")


def test_without_cuda_exits_2(monkeypatch):
    tool = _tool()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(tool.main, [])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no CUDA device")


def test_cpu_only_rows(tmp_path):
    tool = _tool()
    out = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(tool.main, ["--cpu-only", "--sizes", "64x128", "--cpu-sizes", "64x128",
                                            "--beams", "1,4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rnd = [r for r in rows if r["part"] == "rounding"]
    assert [r["beam"] for r in rnd] == [1, 4]
    assert rnd[1]["cpu_objective"] <= rnd[0]["cpu_objective"] + 1e-12      # K-SNRQ never above SNRQ
    models = [r for r in rows if r["part"] == "model"]
    assert len(models) == 10
    # every linear of the dense model and every expert matrix of the MoE model was quantized
    assert {r["modules"] for r in models if r["model"] == "llama"} == {14}
    assert {r["modules"] for r in models if r["model"] == "qwen3_moe"} == {32}
    assert all(0 < r["cpu_rel_output_error"] < 0.05 for r in models)
