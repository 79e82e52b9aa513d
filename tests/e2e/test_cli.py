"""The CLI: bad input gives one clear line and exit code 2, never a traceback or a partial output."""
import json
import os
import subprocess
import sys

import pytest
import torch


def rcsr(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "rcsr_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def assert_clean_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "calib.txt"
    p.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 400))
    return p


def test_group_size_128_on_default_model(default_model_dir, tmp_path):
    out = tmp_path / "q"
    res = rcsr("quantize", "--model", "default", "--out", str(out), "--method", "gptq", "--bits", "4",
               "--group-size", "128")
    assert_clean_error(res, "group size 128 does not divide in-features 576")
    assert not out.exists() and not any(tmp_path.iterdir())


def test_missing_model(tmp_path):
    res = rcsr("quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "q"))
    assert_clean_error(res, "does not exist")


def test_unsupported_bits(tiny_llama_dir, tmp_path):
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--bits", "5")
    assert_clean_error(res, "bits=5 is not supported")
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--group-size", "48")
    assert_clean_error(res, "group size 48 is not supported")
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--alpha", "1.5")
    assert_clean_error(res, "--alpha must be in [0, 1]")
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--beam", "4")
    assert_clean_error(res, "--beam 4 needs --method ksnrq")
    assert not (tmp_path / "q").exists()


def test_calibration_text_too_short(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--group-size", "32",
               "--calib", str(short), "--seqlen", "64", "--nsamples", "2")
    assert_clean_error(res, "calibration text has")
    assert not (tmp_path / "q").exists()


def test_nan_weights(tiny_llama_dir, tmp_path, calib_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    bad = tmp_path / "bad"
    m.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bad)
    res = rcsr("quantize", "--model", str(bad), "--out", str(tmp_path / "q"), "--group-size", "32",
               "--calib", str(calib_text), "--seqlen", "32", "--nsamples", "2")
    assert_clean_error(res, "NaN/Inf", "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "q").exists()


def test_existing_output_refused_then_quantize_and_eval(tiny_llama_dir, tmp_path, calib_text):
    out = tmp_path / "q"
    out.mkdir()
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--group-size", "32")
    assert_clean_error(res, "already exists")
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite", "--group-size", "32",
               "--method", "ksnrq", "--bits", "3", "--calib", str(calib_text), "--seqlen", "32", "--nsamples", "4",
               "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "rcsr" and cfg["bits"] == 3 and cfg["method"]["beam"] == 4
    res = rcsr("eval", "--model", str(out), "--data", str(calib_text), "--seqlen", "32", "--max-tokens", "256",
               "--json", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["quantized"] and r["tokens"] > 0 and r["ppl"] > 1


def test_eval_bad_inputs(tmp_path):
    res = rcsr("eval", "--model", str(tmp_path / "missing"))
    assert_clean_error(res, "does not exist")
    res = rcsr("eval", "--model", "default", "--data", str(tmp_path / "no-such-file.txt"), "--max-tokens", "64")
    assert_clean_error(res)


def test_avg_bits_summary_line_names_the_mixed_grid(tiny_llama_dir, tmp_path, calib_text):
    """--avg-bits writes layers of several grids: the closing line gives the achieved bits per weight, not
    the unused --bits / --group-size."""
    out = tmp_path / "mix"
    res = rcsr("quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--method", "gptq", "--group-size",
               "32", "--avg-bits", "3.5", "--widths", "3,4", "--no-alloc-check", "--calib", str(calib_text),
               "--seqlen", "32", "--nsamples", "4", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    last = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("wrote ")][-1]
    report = json.loads((out / "quant_report.json").read_text())["allocation"]
    assert f"mixed precision, {report['achieved_avg_bits']:.3f} bits/weight" in last and " W4 " not in last, last
