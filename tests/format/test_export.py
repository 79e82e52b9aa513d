"""``rcsr_deploy.export``: GPTQ and compressed-tensors exports of rcsr checkpoints.

Fast tests decode every exported tensor -- GPTQ with an independent decoder written here (AutoGPTQ's
dequantization rule), compressed-tensors with the compressed-tensors library itself through
transformers' loader -- and require the weights to equal the rcsr fake-quant reference bit for bit.
The slow test serves the 4-bit exports of the real default model with STOCK vLLM (our plugin disabled)
and checks its greedy tokens and logprobs against the fp32 fake-quant reference.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rcsr_deploy import checkpoint as ck
from rcsr_deploy.errors import RcsrError
from rcsr_deploy.export import export_checkpoint
from factories import tiny_llama

from rcsr_deploy.format import QUANT_SUFFIXES, QuantConfig, QuantizedTensor

from rcsr_deploy.grid import QuantSpec


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def synthetic(out_f: int, in_f: int, spec: QuantSpec, dynamic: bool, gen: torch.Generator) -> QuantizedTensor:
    """Random codes/scales/zeros covering the edges (codes 0 and maxq, zero points 0 and maxq)."""
    maxq = spec.maxq
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen)
    codes[0, 0], codes[0, 1], codes[-1, -1] = 0, maxq, maxq
    ng = spec.groups(in_f)
    scale = (torch.rand(out_f, ng, generator=gen) * 0.05 + 1e-3).half().float()
    if spec.sym:
        zero = torch.full((out_f, ng), float(1 << (spec.bits - 1)))
    else:
        zero = torch.randint(0, maxq + 1, (out_f, ng), generator=gen).float()
        zero[0, 0], zero[-1, -1] = 0, maxq
    g_idx = None
    if dynamic:
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // spec.group_len(in_f)).to(torch.int32)
    return QuantizedTensor(codes=codes.to(torch.uint8), scale=scale, zero=zero, g_idx=g_idx, spec=spec)


def make_ckpt(tmp_path: Path, bits: int, group_size: int, sym: bool, act_order: str, *, bias: bool = False,
              tie: bool = True, only: str | None = None, name: str = "rcsr", head: bool = False,
              model_kw: dict | None = None) -> Path:
    """A synthetic rcsr checkpoint of a tiny Llama (every decoder linear, or those whose name has ``only``)."""
    model = tiny_llama(bias=bias, tie=tie, **(model_kw or {}))
    spec = QuantSpec(bits, group_size, sym)
    gen = torch.Generator().manual_seed(1000 * bits + group_size + 7 * sym)
    q = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n and (only is None or only in n):
            q[n] = synthetic(m.out_features, m.in_features, spec, act_order == "dynamic", gen)
    if head:  # --lm-head: the tied embedding table, or the untied lm_head
        table = "model.embed_tokens" if tie else "lm_head"
        w = model.get_submodule(table).weight
        q[table] = synthetic(w.shape[0], w.shape[1], spec, act_order == "dynamic", gen)
    qc = {"quant_method": "rcsr", "format_version": 2 if head else 1, "bits": bits, "group_size": group_size, "sym": sym,
          "act_order": act_order, "quantized_modules": sorted(q), "method": {"name": "synthetic"}}
    out = ck.save_quantized(model, q, tmp_path / name, qc)
    (out / "chat_template.jinja").write_text("{{ messages }}\n")    # side file to be copied
    return out


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def reference_state(rcsr_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = ck.load_fake_quant_model(rcsr_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Independent GPTQ unpacker: value j of each int32 word in bits [j*bits, (j+1)*bits), along ``dim``."""
    per = 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, -1)
    vals = (w.unsqueeze(-1) >> (torch.arange(per) * bits)) & ((1 << bits) - 1)     # [..., n_words, per]
    return vals.reshape(*w.shape[:-1], -1).movedim(-1, dim)


def decode_gptq(t: dict[str, torch.Tensor], m: str, qc: dict) -> torch.Tensor:
    """AutoGPTQ's rule: w[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o]); v1 stores zero - 1."""
    bits = qc["bits"]
    q = unpack_words(t[f"{m}.qweight"], bits, dim=0)                   # [in, out]
    z = unpack_words(t[f"{m}.qzeros"], bits, dim=1)                    # [G, out]
    if qc["checkpoint_format"] == "gptq":
        z = z + 1
    else:
        assert qc["checkpoint_format"] == "gptq_v2"
    s = t[f"{m}.scales"].float()                                       # [G, out]
    g = t[f"{m}.g_idx"].long()                                         # [in]
    return ((q.float() - z[g].float()) * s[g]).t()                     # [out, in] fp32


CASES = [  # bits, group_size, sym, act_order
    (4, 32, True, "static"),
    (4, 64, False, "dynamic"),
    (4, -1, True, "dynamic"),
    (8, 32, True, "dynamic"),
    (8, -1, False, "none"),
    (8, 64, False, "static"),
]


def _ids(c):
    return f"w{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}-{c[3]}"


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gptq_export_decodes_exactly(tmp_path, case):
    bits, gs, sym, act_order = case
    src = make_ckpt(tmp_path, bits, gs, sym, act_order, bias=(bits == 4), tie=sym)
    out = export_checkpoint(src, tmp_path / "gptq", "gptq")
    assert out == (tmp_path / "gptq").absolute()

    qc_src = QuantConfig.read(src).to_dict()
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    dynamic = act_order == "dynamic" and gs != -1
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == gs and qc["sym"] is sym
    assert qc["desc_act"] is dynamic and qc["lm_head"] is False
    assert qc["checkpoint_format"] == qc["format"] == ("gptq" if sym else "gptq_v2")
    assert "dynamic" not in qc                  # every decoder linear is quantized; lm_head is covered by lm_head
    src_cfg = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
           {k: v for k, v in src_cfg.items() if k != "quantization_config"}

    t = read_tensors(out)
    st = read_tensors(src)
    ref = reference_state(src)
    per = 32 // bits
    for m in qc_src["quantized_modules"]:
        out_f, in_f = ref[f"{m}.weight"].shape
        ng = 1 if gs == -1 else in_f // gs
        assert t[f"{m}.qweight"].dtype == torch.int32 and t[f"{m}.qweight"].shape == (in_f // per, out_f)
        assert t[f"{m}.qzeros"].dtype == torch.int32 and t[f"{m}.qzeros"].shape == (ng, out_f // per)
        assert t[f"{m}.scales"].dtype == torch.float16 and t[f"{m}.scales"].shape == (ng, out_f)
        assert t[f"{m}.g_idx"].dtype == torch.int32 and t[f"{m}.g_idx"].shape == (in_f,)
        assert f"{m}.weight" not in t
        # for 4/8 bits our words hold the same codes in the same bit positions, only transposed
        assert torch.equal(t[f"{m}.qweight"], st[f"{m}.qweight"].t())
        if sym:   # v1 symmetric zero points are the classic 0x77777777 / 0x7F7F7F7F words
            word = {4: 0x77777777, 8: 0x7F7F7F7F}[bits]
            assert bool((t[f"{m}.qzeros"] == word).all())
        if dynamic:
            assert torch.equal(t[f"{m}.g_idx"], st[f"{m}.group_index"])
        else:
            assert torch.equal(t[f"{m}.g_idx"], (torch.arange(in_f) // (in_f if gs == -1 else gs)).int())
        w = decode_gptq(t, m, qc)
        assert torch.equal(w, ref[f"{m}.weight"]), m
    # everything that is not a quantized linear is copied unchanged (biases, norms, embeddings)
    plain = {k for k in st if k.rsplit(".", 1)[-1] not in QUANT_SUFFIXES}
    assert plain <= set(t)
    for k in plain:
        assert t[k].dtype == st[k].dtype and torch.equal(t[k], st[k]), k
    assert (out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    assert (out / "generation_config.json").is_file()
    info = json.loads((out / "rcsr_export.json").read_text())
    assert info["format"] == "gptq" and info["source_quantization_config"] == qc_src


# ------------------------------------------------------------------------------------------------
# compressed-tensors
# ------------------------------------------------------------------------------------------------
def load_ct_with_transformers(folder: Path):
    """Dequantize with transformers + the compressed-tensors library (their decoder, not ours)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.state_dict()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_compressed_tensors_export_decodes_exactly(tmp_path, case):
    from compressed_tensors.quantization import QuantizationConfig

    bits, gs, sym, act_order = case
    src = make_ckpt(tmp_path, bits, gs, sym, act_order, bias=(bits == 8), tie=not sym)
    out = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")

    qc_src = QuantConfig.read(src).to_dict()
    cfg = json.loads((out / "config.json").read_text())
    raw = cfg["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors" and raw["format"] == "pack-quantized"
    assert raw["quantization_status"] == "compressed" and raw["ignore"] == ["lm_head"]
    qcfg = QuantizationConfig.model_validate(raw)
    (scheme,) = qcfg.config_groups.values()
    wa = scheme.weights
    assert scheme.targets == ["Linear"] and scheme.input_activations is None
    assert wa.num_bits == bits and wa.symmetric is sym and wa.type == "int"
    assert wa.strategy == ("channel" if gs == -1 else "group") and wa.group_size == (None if gs == -1 else gs)
    dynamic = act_order == "dynamic" and gs != -1
    expected_actorder = None if act_order == "none" else "group" if dynamic else "static"
    assert raw["config_groups"]["group_0"]["weights"]["actorder"] == expected_actorder

    t = read_tensors(out)
    st = read_tensors(src)
    ref = reference_state(src)
    per = 32 // bits
    for m in qc_src["quantized_modules"]:
        out_f, in_f = ref[f"{m}.weight"].shape
        ng = 1 if gs == -1 else in_f // gs
        assert t[f"{m}.weight_packed"].dtype == torch.int32 and t[f"{m}.weight_packed"].shape == (out_f, in_f // per)
        # compressed-tensors' pack-quantized words equal our own 4/8-bit words
        assert torch.equal(t[f"{m}.weight_packed"], st[f"{m}.qweight"])
        assert t[f"{m}.weight_scale"].dtype == torch.float16 and t[f"{m}.weight_scale"].shape == (out_f, ng)
        assert torch.equal(t[f"{m}.weight_shape"], torch.tensor([out_f, in_f]))
        assert (f"{m}.weight_zero_point" in t) is (not sym)
        if not sym:
            zp = t[f"{m}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (-(-out_f // per), ng)
            assert torch.equal(unpack_words(zp, bits, dim=0)[:out_f], st[f"{m}.zeros"].long())
        assert (f"{m}.weight_g_idx" in t) is dynamic
        if dynamic:
            assert torch.equal(t[f"{m}.weight_g_idx"], st[f"{m}.group_index"])
    plain = {k for k in st if k.rsplit(".", 1)[-1] not in QUANT_SUFFIXES}
    for k in plain:
        assert t[k].dtype == st[k].dtype and torch.equal(t[k], st[k]), k

    dec = load_ct_with_transformers(out)
    for k, v in ref.items():
        assert torch.equal(dec[k].float(), v), k
    assert (out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()


# ------------------------------------------------------------------------------------------------
# partial quantization, refusals, atomic writes
# ------------------------------------------------------------------------------------------------
def test_partially_quantized_model(tmp_path):
    src = make_ckpt(tmp_path, 4, 32, False, "static", only="layers.0.")
    layer1 = [f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    ref = reference_state(src)

    g = export_checkpoint(src, tmp_path / "gptq", "gptq")
    qc = json.loads((g / "config.json").read_text())["quantization_config"]
    assert sorted(qc["dynamic"]) == sorted("-:^" + m.replace(".", r"\.") + "$" for m in layer1)
    t = read_tensors(g)
    for m in layer1:
        assert f"{m}.qweight" not in t and torch.equal(t[f"{m}.weight"], ref[f"{m}.weight"])
    assert torch.equal(decode_gptq(t, "model.layers.0.mlp.up_proj", qc), ref["model.layers.0.mlp.up_proj.weight"])

    c = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    raw = json.loads((c / "config.json").read_text())["quantization_config"]
    assert sorted(raw["ignore"]) == sorted(["lm_head"] + layer1)
    dec = load_ct_with_transformers(c)
    for k, v in ref.items():
        assert torch.equal(dec[k].float(), v), k


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_quantized_head_exported_dequantized(tmp_path, tie):
    """A quantized vocabulary table (--lm-head) leaves the export as an exact fp32 weight: the stock
    formats quantize decoder linears only."""
    src = make_ckpt(tmp_path, 4, 64, True, "static", tie=tie, head=True)
    table = "model.embed_tokens" if tie else "lm_head"
    ref = reference_state(src)
    g = export_checkpoint(src, tmp_path / "gptq", "gptq")
    t = read_tensors(g)
    assert f"{table}.qweight" not in t and torch.equal(t[f"{table}.weight"], ref[f"{table}.weight"])
    assert ("lm_head.weight" in t) == (not tie)
    info = json.loads((g / "rcsr_export.json").read_text())
    assert info["dequantized_tables"] == [table]
    qc = json.loads((g / "config.json").read_text())["quantization_config"]
    assert "dynamic" not in qc and qc["lm_head"] is False
    c = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    dec = load_ct_with_transformers(c)
    for k, v in ref.items():
        assert torch.equal(dec[k].float(), v), k


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_low_bit_export_refused(tmp_path, bits, fmt):
    src = make_ckpt(tmp_path, bits, 32, True, "static")
    with pytest.raises(RcsrError, match=rf"export to {fmt} supports 4 and 8 bits; 2/3-bit checkpoints are "
                                        r"served by the rcsr vLLM plugin"):
        export_checkpoint(src, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_group_outside_stock_kernels_refused(tmp_path, fmt):
    """g96 is an rcsr grid (576-wide models); stock GPTQ / compressed-tensors kernels take 32 / 64 / 128 / -1."""
    src = make_ckpt(tmp_path, 4, 96, True, "static", model_kw=dict(hidden=96, intermediate=192))
    with pytest.raises(RcsrError, match=rf"export to {fmt} supports group sizes 32, 64, 128 and per channel .* "
                                        r"this checkpoint has group 96: serve it with the rcsr vLLM plugin"):
        export_checkpoint(src, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_bad_format_and_paths(tmp_path):
    src = make_ckpt(tmp_path, 4, 32, True, "static")
    with pytest.raises(RcsrError, match="unknown export format 'awq'"):
        export_checkpoint(src, tmp_path / "out", "awq")
    with pytest.raises(RcsrError, match="must not be written into the source checkpoint"):
        export_checkpoint(src, src, "gptq", overwrite=True)
    with pytest.raises(RcsrError, match="must not be written into the source checkpoint"):
        export_checkpoint(src, src / "sub", "gptq")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(RcsrError, match="no quantization_config"):
        export_checkpoint(plain, tmp_path / "out", "gptq")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "rcsr"]     # no temp folders left


def test_existing_output_and_overwrite(tmp_path, monkeypatch):
    src = make_ckpt(tmp_path, 4, 32, True, "static")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RcsrError, match="already exists"):
        export_checkpoint(src, out, "gptq")
    assert (out / "keep.txt").read_text() == "old"

    import rcsr_deploy.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(src, out, "compressed-tensors", overwrite=True)
    assert (out / "keep.txt").read_text() == "old"                            # untouched on failure
    monkeypatch.undo()
    export_checkpoint(src, out, "compressed-tensors", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rcsr"]


# ------------------------------------------------------------------------------------------------
# stock vLLM serves the 4-bit exports of the real default model
# ------------------------------------------------------------------------------------------------
VLLM_SCRIPT = textwrap.dedent('''
    import gc, json, sys

    def main():
        from vllm import LLM, SamplingParams

        out, models = sys.argv[1], sys.argv[2:]
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
        params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)
        result = {}
        for path in models:          # one process, one engine after the other
            llm = LLM(model=path, dtype="float16", enforce_eager=True, max_model_len=256, seed=0)
            rows = []
            for o in llm.generate(prompts, params):
                c = o.outputs[0]
                rows.append({"prompt_ids": list(o.prompt_token_ids), "ids": list(c.token_ids),
                             "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
            result[path] = rows
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        with open(out, "w") as f:
            json.dump(result, f)

    if __name__ == "__main__":
        main()
''')

#: Max allowed |logprob(vLLM) - logprob(fp32 reference)| of each generated token, and max allowed
#: shortfall of vLLM's greedy token from the reference's best logprob.  vLLM serves in float16: our
#: scales are float16, so the weights are exact and only fp16 activations differ (measured <= 0.017 on
#: this model; bf16 serving gives <= 0.15 because vLLM also rounds the scales to bf16).  Exporting one
#: layer wrongly (a zero point off by one in one down_proj, or one layer's groups reversed) moves these
#: numbers by >= 0.5; a global error by > 20.
TOL = 0.1


@pytest.mark.vllm
@pytest.mark.slow
def test_stock_vllm_serves_4bit_exports(tmp_path, default_model_dir):
    from rcsr_deploy.calib import QuantizeConfig
    from rcsr_deploy.pipeline import quantize_to_checkpoint

    ckpts = {}
    for sym in (True, False):
        d = tmp_path / ("w4-sym" if sym else "w4-asym")
        quantize_to_checkpoint(str(default_model_dir), d, QuantizeConfig(method="rtn", bits=4, group_size=64, sym=sym),
                               progress=False)
        ckpts[sym] = d
    # vLLM 0.32 serves GPTQ only symmetric (uint4b8); compressed-tensors also asymmetric (uint4 + zero points)
    exports = {
        export_checkpoint(ckpts[True], tmp_path / "gptq-sym", "gptq"): ckpts[True],
        export_checkpoint(ckpts[True], tmp_path / "ct-sym", "compressed-tensors"): ckpts[True],
        export_checkpoint(ckpts[False], tmp_path / "ct-asym", "compressed-tensors"): ckpts[False],
    }
    script = tmp_path / "serve_exports.py"
    script.write_text(VLLM_SCRIPT)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["VLLM_CPU_INT4_W4A8"] = "0"     # true W4A16 also on AMX machines (else activations go int8)
    env["VLLM_PLUGINS"] = ""            # stock vLLM: no general plugins, in particular not rcsr's
    result_file = tmp_path / "vllm.json"
    proc = subprocess.run([sys.executable, str(script), str(result_file), *map(str, exports)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(result_file.read_text())

    for sym, src in ckpts.items():
        model, _ = ck.load_fake_quant_model(src)               # fp32 reference of the same codes
        for path, rows in result.items():
            if exports[Path(path)] != src:
                continue
            for row in rows:
                assert len(row["ids"]) == 16
                ids = torch.tensor([row["prompt_ids"] + row["ids"]])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0].float(), -1)
                p = len(row["prompt_ids"])
                for k, (tok, vlp) in enumerate(zip(row["ids"], row["logprobs"])):
                    ref = lp[p - 1 + k]
                    assert float(ref.max() - ref[tok]) <= TOL, (path, k, "greedy token is not the reference's")
                    assert abs(float(ref[tok]) - vlp) <= TOL, (path, k, float(ref[tok]), vlp)
        del model


def test_mixed_precision_exports_to_gptq_with_dynamic_rules(tmp_path):
    """A 4/8-bit mixed checkpoint (format version 3) exports to GPTQ: the top-level grid plus one
    GPTQModel/vLLM ``dynamic`` rule per module with its own grid, codes unchanged; compressed-tensors
    (one grid) and any 2/3-bit layer are refused with one line."""
    from rcsr_deploy.packing import unpack_lsb_words

    model = tiny_llama()
    gen = torch.Generator().manual_seed(5)
    q, grids = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            spec = QuantSpec(8, 64, True) if n.endswith("down_proj") else QuantSpec(4, 32, True)
            q[n] = synthetic(m.out_features, m.in_features, spec, False, gen)
            if spec.bits == 8:
                grids[n] = {"bits": 8, "group_size": 64}
    qc = {"quant_method": "rcsr", "format_version": 3, "bits": 4, "group_size": 32, "sym": True, "act_order": "none",
          "quantized_modules": sorted(q), "module_grids": grids}
    src = ck.save_quantized(model, q, tmp_path / "mixed", qc)
    out = export_checkpoint(src, tmp_path / "gptq", "gptq")
    gq = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (gq["bits"], gq["group_size"]) == (4, 32)
    assert gq["dynamic"] == {"+:^" + re.escape(m) + "$": {"bits": 8, "group_size": 64} for m in grids}
    t = read_tensors(out)
    for m, qt in q.items():
        codes = unpack_lsb_words(t[f"{m}.qweight"], qt.spec.bits, dim=0).t()
        assert torch.equal(codes, qt.codes.long()), m
    with pytest.raises(RcsrError, match="exports to gptq only"):
        export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    q["model.layers.0.mlp.down_proj"] = synthetic(64, 128, QuantSpec(3, 64, True), False, gen)
    grids["model.layers.0.mlp.down_proj"] = {"bits": 3, "group_size": 64}
    src3 = ck.save_quantized(model, q, tmp_path / "mixed3", {**qc, "module_grids": grids})
    with pytest.raises(RcsrError, match="has 3/4/8-bit layers"):
        export_checkpoint(src3, tmp_path / "g3", "gptq")


# ------------------------------------------------------------------------------------------------
# Mixture-of-Experts checkpoints: every routed expert exported like a linear
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,bits,gs,sym,act_order", [("qwen3_moe", 4, 32, False, "dynamic"),
                                                          ("mixtral", 8, -1, True, "static")])
def test_moe_exports_every_expert(tmp_path, family, bits, gs, sym, act_order):
    """Both formats store each expert projection under its per-expert hub name (Mixtral: w1/w3/w2), and
    both decode to the rcsr reference bit for bit: GPTQ with the decoder above, compressed-tensors with
    the compressed-tensors library's own ``unpack_from_int32``."""
    from compressed_tensors.compressors import unpack_from_int32

    from factories import tiny_moe, write_moe_checkpoint
    from rcsr_deploy.storage import TensorReader, weight_files

    model = tiny_moe(family)
    src = write_moe_checkpoint(model, tmp_path / "src", bits=bits, group_size=gs, sym=sym, act_order=act_order)
    qc = QuantConfig.read(src)
    experts = [m for m in qc.quantized_modules if ".experts." in m]
    assert len(experts) == 2 * 4 * 3                      # 2 blocks x 4 experts x 3 projections
    if family == "mixtral":
        assert all(m.rsplit(".", 1)[1] in ("w1", "w2", "w3") for m in experts)
    reader = TensorReader(weight_files(src))
    ref = {m: ck.read_module(reader, m, qc) for m in qc.quantized_modules}

    gq = export_checkpoint(src, tmp_path / "gptq", "gptq")
    gcfg = json.loads((gq / "config.json").read_text())["quantization_config"]
    routers = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    if family == "mixtral":
        routers = [r.replace("mlp", "block_sparse_moe") for r in routers]
    # the routers (transformers' TopKRouter modules, linears in vLLM) stay unquantized in both formats
    assert all("-:" + re.escape(r).join("^$") in gcfg["dynamic"] for r in routers), gcfg["dynamic"]
    t = read_tensors(gq)
    for m, qt in ref.items():
        assert torch.equal(decode_gptq(t, m, gcfg), qt.dequantize()), m

    ct = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    raw = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert raw["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert not any(".experts." in n for n in raw["ignore"])
    assert set(routers) <= set(raw["ignore"]), raw["ignore"]
    t = read_tensors(ct)
    for m, qt in ref.items():
        shape = torch.Size(t[f"{m}.weight_shape"].tolist())
        assert shape == (qt.out_features, qt.in_features)
        signed = unpack_from_int32(t[f"{m}.weight_packed"], bits, shape)
        assert torch.equal(signed.to(torch.int16) + (1 << (bits - 1)), qt.codes.to(torch.int16)), m
        assert torch.equal(t[f"{m}.weight_scale"], qt.scale.half())
        if not sym:
            zp = unpack_from_int32(t[f"{m}.weight_zero_point"], bits, torch.Size(qt.zero.shape), packed_dim=0)
            assert torch.equal(zp.to(torch.int16) + (1 << (bits - 1)), qt.zero.to(torch.int16)), m
        assert (f"{m}.weight_g_idx" in t) is (act_order == "dynamic" and gs != -1)
        if f"{m}.weight_g_idx" in t:
            assert torch.equal(t[f"{m}.weight_g_idx"], qt.g_idx.int())
    # the routers and everything else unquantized are copied unchanged
    st = read_tensors(src)
    plain = {k for k in st if k.rsplit(".", 1)[-1] not in QUANT_SUFFIXES}
    assert any(".gate.weight" in k for k in plain)
    for k in plain:
        assert torch.equal(t[k], st[k]), k


def test_gpt_oss_export_is_refused_in_one_line(tmp_path):
    """GPT-OSS's experts have no per-expert names in the stock formats (vLLM's GPT-OSS loader reads its
    own fused tensors): the export stops with one line and writes nothing."""
    from factories import tiny_moe, write_moe_checkpoint

    src = write_moe_checkpoint(tiny_moe("gpt_oss"), tmp_path / "src", bits=4, group_size=32, sym=True,
                               act_order="static")
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(RcsrError, match=r"GptOssForCausalLM stores its experts fused in its own layout") as e:
            export_checkpoint(src, tmp_path / fmt, fmt)
        assert "\n" not in str(e.value) and not (tmp_path / fmt).exists()
