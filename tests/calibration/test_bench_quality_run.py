"""tools/bench_quality.py end to end on a tiny model: rows, --extra-eval, resume."""
import json

from click.testing import CliRunner
from tool_support import load_tool


def _tool():
    return load_tool("bench_quality")


def test_rows_and_extra_eval(tmp_path, tiny_llama_dir, text_file):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    out = tmp_path / "rows.jsonl"
    args = ["--model", str(tiny_llama_dir), "--settings", "w4pc", "--methods", "fp,gptq-mse,snrq-auto-mse",
            "--nsamples", "8", "--seqlen", "64", "--calib", str(text_file), "--eval-data", str(text_file),
            "--extra-eval", f"{text_file},{other}", "--eval-tokens", "512", "--eval-seqlen", "128",
            "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(_tool().main, args)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"fp", "gptq-mse", "snrq-auto-mse"}
    for r in rows.values():
        extra = r["ppl_extra"]
        assert set(extra) == {str(text_file), str(other)}
        # the same text as --eval-data: the same perplexity; another text: another one
        assert abs(extra[str(text_file)] - r["ppl"]) <= 1e-9 * r["ppl"]
        assert extra[str(other)] != r["ppl"]
    cands = rows["snrq-auto-mse"]["alpha_selection"]["candidates"]
    assert set(cands) == {"0.0", "sample"}
    for c in cands.values():                      # every --alpha auto candidate is evaluated on every text
        assert set(c["eval_ppl_extra"]) == {str(text_file), str(other)}
        assert abs(c["eval_ppl_extra"][str(text_file)] - c["eval_ppl"]) <= 1e-9 * c["eval_ppl"]
    # resume: nothing left to do, no row added
    result = CliRunner().invoke(_tool().main, args)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3
