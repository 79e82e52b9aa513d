"""tools/ppl_vllm.py: perplexity as vLLM serves a model (prompt logprobs), one fresh vLLM process per run."""
import json
import math

import pytest
from click.testing import CliRunner
from tool_support import load_tool

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_ppl_of_a_served_model(tmp_path, tiny_llama_dir):
    """Two runs of the same model (the second with an environment variable that changes nothing for an FP
    model): finite, identical perplexities over the same windows, written to --json."""
    out = tmp_path / "ppl.json"
    res = CliRunner().invoke(load_tool("ppl_vllm").main, [
        "--run", f"a={tiny_llama_dir}", "--run", f"b={tiny_llama_dir}@RCSR_CPU_ISA=scalar",
        "--max-tokens", "512", "--seqlen", "128", "--dtype", "float32", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [r["run"] for r in rows] == ["a", "b"] and rows[1]["env"] == {"RCSR_CPU_ISA": "scalar"}
    for r in rows:
        assert r["windows"] == 4 and r["tokens"] == 4 * 128 and math.isfinite(r["ppl"])
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-5)


def test_bad_run_is_one_line(tmp_path):
    res = CliRunner().invoke(load_tool("ppl_vllm").main, ["--run", f"a={tmp_path / 'nope'}"])
    assert res.exit_code == 1 and "is not a model folder" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(load_tool("ppl_vllm").main, ["--run", "nonsense"])
    assert res.exit_code == 1 and "expected NAME=MODEL_DIR" in res.output
