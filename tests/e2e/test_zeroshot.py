"""Zero-shot accuracy through lm-evaluation-harness (``rcsr eval --tasks``, :mod:`rcsr_cli.zeroshot`).

The model: the tiny random Llama of ``tiny_llama_dir`` with its embedding scaled by 10 and every
decoder linear by 20 ("sharpened").  As initialised (std 0.02) its logits are almost flat, so every
choice scores about ``-len(tokens) * log(49152)`` and the task's answer is decided by token counts
alone -- the same for any quantization of it (measured: FP and W2 gave identical acc and acc_norm).
Sharpened, its log-likelihoods depend on the text (per-item spread between the 4 choices ~37 nats)
and RTN W2 g32 with the tied embedding/head also quantized (``--lm-head``) moves them by ~9 nats per
choice and changes the chosen answer of 5 of the first 40 items.  Both models stay at chance level
(a random model knows no English): the FP-vs-quantized test shows that the quantized weights are
what lm-eval evaluates, not a quality ranking; docs/RESULTS.md has the real default model's numbers.

vLLM vs transformers on the same checkpoint: both dequantize the same codes to fp32 and run fp32, so
per choice the summed log-likelihood may differ only by float rounding of the two implementations.
The project's notes measured at most ~8e-4 per token between vLLM and HF on dequantized fp32 weights;
continuations here are at most ~50 tokens, so |delta| <= 0.05 per choice (``LL_TOL``, scaled up
for the sharpened model's large values by 1e-4 x |ll|).  Choices must then be identical on every
item whose HF top-2 margin exceeds twice that tolerance, and acc may differ only by the near ties.
Measured (2026-12-04): max |delta| 8.9e-5 over the 160 choices, no near ties, identical choices.

One vLLM start in the module (~40-60 s).  Timings: ``pytest tests/e2e/test_zeroshot.py --durations=0``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASK = "rcsr_mobydick_mc"
LIMIT = 40
LL_TOL = 0.05


def _samples(path: Path) -> list[dict]:
    return sorted((json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()), key=lambda s: s["doc_id"])


def _metrics(res: dict) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in res["results"] if r["task"] == TASK}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """{"fp": sharpened tiny model, "w2": its RTN W2 g32 checkpoint with the tied head quantized}."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    from rcsr_deploy.calib import QuantizeConfig
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    root = tmp_path_factory.mktemp("zeroshot")
    fp = root / "fp"
    shutil.copytree(tiny_llama_dir, fp)
    m = LlamaForCausalLM.from_pretrained(fp, dtype=torch.float32)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(10.0)
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(20.0)
    m.save_pretrained(fp)
    calib = root / "calib.txt"
    calib.write_text(" ".join(["It was the best of times, it was the worst of times, said the captain."] * 200))
    cfg = QuantizeConfig(method="rtn", bits=2, group_size=32, calib=str(calib), nsamples=4, seqlen=32,
                         lm_head=True)
    quantize_to_checkpoint(str(fp), root / "w2", cfg, device="cpu", progress=False)
    return {"fp": fp, "w2": root / "w2"}


@pytest.fixture(scope="module")
def hf_runs(models, tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """The local task on both models through the hf backend, in-process: (result, per-item samples)."""
    from rcsr_cli.zeroshot import run_zeroshot

    out = {}
    d = tmp_path_factory.mktemp("hf-samples")
    for name, path in models.items():
        samples = d / f"{name}.jsonl"
        res = run_zeroshot(str(path), TASK, backend="hf", limit=LIMIT, samples_out=samples, progress=False)
        out[name] = (res, _samples(samples))
    return out


def test_local_task_is_deterministic_and_true_to_the_text():
    from rcsr_cli.zeroshot import MOBYDICK_CHOICES, MOBYDICK_ITEMS, local_tasks_dir, mobydick_items
    from rcsr_deploy.assets import moby_dick_files

    files = moby_dick_files()
    a, b = mobydick_items(files, n_items=60, seed=7), mobydick_items(files, n_items=60, seed=7)
    assert a == b and a != mobydick_items(files, n_items=60, seed=8)
    text = " ".join(" ".join(f.read_text(encoding="utf-8").split()) for f in files)
    for it in a:
        assert len(set(it["choices"])) == MOBYDICK_CHOICES and 0 <= it["label"] < MOBYDICK_CHOICES
        assert f"{it['context']} {it['choices'][it['label']]}" in text  # the target really follows
    d = local_tasks_dir()
    rows = (d / f"{TASK}.jsonl").read_text().splitlines()
    assert len(rows) == MOBYDICK_ITEMS
    assert f"task: {TASK}" in (d / f"{TASK}.yaml").read_text()


def test_fp_and_quantized_accuracy_differ(hf_runs):
    (fp, fp_s), (w2, w2_s) = hf_runs["fp"], hf_runs["w2"]
    assert not fp["quantized"] and w2["quantized"]
    m_fp, m_w2 = _metrics(fp), _metrics(w2)
    for m in (m_fp, m_w2):
        assert set(m) == {"acc", "acc_norm"} and all(0.0 <= v <= 1.0 for v in m.values())
    assert all(r["n"] == LIMIT and r["stderr"] is not None and r["stderr"] > 0 for r in fp["results"])
    assert len(fp_s) == len(w2_s) == LIMIT
    flips = sum(max(range(4), key=a["loglikelihoods"].__getitem__) != max(range(4), key=b["loglikelihoods"].__getitem__)
                for a, b in zip(fp_s, w2_s))
    assert flips >= 2, flips
    assert m_fp != m_w2, (m_fp, m_w2)
    assert m_fp["acc"] != m_w2["acc"] or m_fp["acc_norm"] != m_w2["acc_norm"]


@pytest.mark.vllm
def test_vllm_backend_matches_hf_on_the_checkpoint(models, hf_runs, tmp_path):
    samples = tmp_path / "vllm.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc = subprocess.run([sys.executable, "-m", "rcsr_cli", "eval", "--model", str(models["w2"]),
                           "--tasks", TASK, "--backend", "vllm", "--limit", str(LIMIT), "--json", "--no-progress",
                           "--samples-out", str(samples)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(out) == 1, proc.stdout[-3000:]  # --json: one object on stdout, vLLM's logging on stderr
    res = json.loads(out[0])
    assert res["backend"] == "vllm" and res["quantized"]
    hf_res, hf_s = hf_runs["w2"]
    vl_s = _samples(samples)
    assert [s["doc_id"] for s in vl_s] == [s["doc_id"] for s in hf_s]
    near_ties = 0
    for h, v in zip(hf_s, vl_s):
        tol = [LL_TOL + 1e-4 * abs(x) for x in h["loglikelihoods"]]
        for x, y, t in zip(h["loglikelihoods"], v["loglikelihoods"], tol):
            assert abs(x - y) <= t, (h["doc_id"], h["loglikelihoods"], v["loglikelihoods"])
        top = sorted(h["loglikelihoods"], reverse=True)
        if top[0] - top[1] <= 2 * max(tol):
            near_ties += 1
        else:
            assert h["acc"] == v["acc"], (h, v)
    m_hf, m_vl = _metrics(hf_res), _metrics(res)
    dmax = max(abs(x - y) for h, v in zip(hf_s, vl_s) for x, y in zip(h["loglikelihoods"], v["loglikelihoods"]))
    print(f"vllm vs hf: max |dll| {dmax:.2e}, near ties {near_ties}/{LIMIT}, hf {m_hf}, vllm {m_vl}")
    assert abs(m_hf["acc"] - m_vl["acc"]) <= near_ties / LIMIT + 1e-12, (m_hf, m_vl, near_ties)


def test_unknown_task_one_error_line_exit_2(monkeypatch):
    """Through the real entry point (``rcsr`` = ``rcsr_cli.main:main``) under click's CliRunner."""
    from click.testing import CliRunner

    from rcsr_cli.main import main

    runner = CliRunner()
    monkeypatch.setattr(sys, "argv", ["rcsr", "eval", "--tasks", f"{TASK},arc_easyy", "--limit", "2"])
    with runner.isolation() as (out, err, *_):
        with pytest.raises(SystemExit) as exc:
            main()
        stderr = err.getvalue().decode()
    assert exc.value.code == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown lm-eval task arc_easyy"), stderr
    assert "did you mean arc_easy" in lines[0] and "Traceback" not in stderr
