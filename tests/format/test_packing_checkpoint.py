"""Bit packing (rcsr_deploy/packing.py) and the checkpoint layer (rcsr_deploy/checkpoint.py)."""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from factories import tiny_llama

from rcsr_deploy import checkpoint as ck
from rcsr_deploy import storage
from rcsr_deploy import grid
from rcsr_deploy.format import QuantizedTensor
from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import QuantConfig
from rcsr_deploy.packing import pack_codes, packed_width, unpack_codes

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def u32_to_i32(words: list[int]) -> list[int]:
    return [w - (1 << 32) if w >= (1 << 31) else w for w in words]


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (5, 96), (17, 256), (0, 32)])
def test_pack_unpack_roundtrip(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[0] * 7 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if codes.numel():
        codes[0, 0] = 0
        codes[-1, -1] = (1 << bits) - 1
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (shape[0], shape[1] * bits // 32) == (shape[0], packed_width(shape[1], bits))
    back = unpack_codes(packed, bits, shape[1])
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_lsb_word_packing_roundtrip(bits, dim):
    """Whole-word packing (exports, vLLM's kernels, the Triton planes): value j of a word in bits
    [j*bits, (j+1)*bits), along either dimension."""
    from rcsr_deploy.packing import pack_lsb_words, unpack_lsb_words

    per = 32 // bits
    g = torch.Generator().manual_seed(bits)
    shape = (3 * per, 5) if dim == 0 else (5, 3 * per)
    v = torch.randint(0, 1 << bits, shape, generator=g)
    v.view(-1)[0] = (1 << bits) - 1  # the sign bit of a word is set when bits fill it up to bit 31
    words = pack_lsb_words(v, bits, dim=dim)
    assert words.dtype == torch.int32 and words.shape[dim] == 3 and words.shape[1 - dim] == 5
    first = words.movedim(dim, -1)[..., 0].long() & 0xFFFFFFFF
    expect = sum(v.movedim(dim, -1)[..., j].long() << (j * bits) for j in range(per))
    assert torch.equal(first, expect)
    assert torch.equal(unpack_lsb_words(words, bits, dim=dim), v)
    with pytest.raises(RcsrError, match="out of range"):
        pack_lsb_words(v + (1 << bits), bits, dim=dim)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_full_range_and_row_independence(bits):
    maxq = (1 << bits) - 1
    in_f = 32 * 8
    row = torch.arange(in_f) % (maxq + 1)                  # every code value, many times
    codes = torch.stack([row, row.flip(0), torch.full((in_f,), maxq), torch.zeros(in_f, dtype=torch.long)])
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, in_f), codes.to(torch.uint8))
    # each row is packed on its own: packing rows separately gives the same words
    for r in range(codes.shape[0]):
        assert torch.equal(pack_codes(codes[r:r + 1], bits), packed[r:r + 1])
    assert packed[2].ne(0).all() and packed[3].eq(0).all()


def test_golden_3bit_words():
    # codes c_k = k mod 8; words computed by hand (docs/FORMAT.md, section 3)
    codes = torch.tensor([[k % 8 for k in range(32)]], dtype=torch.uint8)
    w0 = (1 << 3) | (2 << 6) | (3 << 9) | (4 << 12) | (5 << 15) | (6 << 18) | (7 << 21) | (0 << 24) \
        | (1 << 27) | ((2 & 3) << 30)                     # c0..c9, low two bits of c10 = 0b010
    assert w0 == 0x88FAC688
    # word 1: bit 0 = bit 2 of c10 (0); c11..c20 at bits 1.., 3 each; bit 31 = bit 0 of c21 = 5 (1)
    w1 = (2 >> 2) | (3 << 1) | (4 << 4) | (5 << 7) | (6 << 10) | (7 << 13) | (0 << 16) | (1 << 19) \
        | (2 << 22) | (3 << 25) | (4 << 28) | ((5 & 1) << 31)
    assert w1 == 0xC688FAC6
    # word 2: bits 0-1 = bits 1,2 of c21 (0b10); c22..c31 at bits 2.., 3 each
    w2 = (5 >> 1) | (6 << 2) | (7 << 5) | (0 << 8) | (1 << 11) | (2 << 14) | (3 << 17) | (4 << 20) \
        | (5 << 23) | (6 << 26) | (7 << 29)
    assert w2 == 0xFAC688FA
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [u32_to_i32([0x88FAC688, 0xC688FAC6, 0xFAC688FA])]
    assert packed.tolist() == [[-1996831096, -964101434, -87652102]]
    assert torch.equal(unpack_codes(packed, 3, 32), codes)


@pytest.mark.parametrize("k,words", [
    (10, [0xC0000000, 0x00000001, 0]),      # straddles words 0/1: bits 30, 31 | bit 0
    (21, [0, 0x80000000, 0x00000003]),      # straddles words 1/2: bit 31 | bits 0, 1
    (0, [0x00000007, 0, 0]),
    (31, [0, 0, 0xE0000000]),
    (11, [0, 0x0000000E, 0]),
])
def test_golden_3bit_single_code(k, words):
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[1, 32 + k] = 7                                   # second run of 32 codes in row 1
    packed = pack_codes(codes, 3)
    assert packed[0].tolist() == [0] * 6
    assert packed[1].tolist() == [0, 0, 0] + u32_to_i32(words)
    assert torch.equal(unpack_codes(packed, 3, 64), codes)


def test_golden_4bit_2bit_8bit_words():
    c4 = torch.tensor([[k % 16 for k in range(32)]])
    assert pack_codes(c4, 4).tolist() == [u32_to_i32([0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98])]
    c4b = torch.zeros(1, 32, dtype=torch.long)
    c4b[0, 9] = 0xA                                        # word 1, nibble 1
    assert pack_codes(c4b, 4).tolist() == [[0, 0xA0, 0, 0]]
    c2 = torch.tensor([[k % 4 for k in range(32)]])
    assert (3 << 6 | 2 << 4 | 1 << 2) * 0x01010101 == 0xE4E4E4E4
    assert pack_codes(c2, 2).tolist() == [u32_to_i32([0xE4E4E4E4, 0xE4E4E4E4])]
    c8 = torch.zeros(1, 32, dtype=torch.long)
    c8[0, :4] = torch.tensor([5, 42, 79, 116])
    c8[0, 31] = 255
    assert pack_codes(c8, 8).tolist() == [u32_to_i32([0x744F2A05] + [0] * 6 + [0xFF000000])]


def test_packing_errors():
    with pytest.raises(RcsrError, match="not a multiple of 32"):
        pack_codes(torch.zeros(2, 48, dtype=torch.uint8), 4)
    with pytest.raises(RcsrError, match="not a multiple of 32"):
        packed_width(100, 3)
    with pytest.raises(RcsrError, match="out of range for 3-bit"):
        pack_codes(torch.full((1, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(RcsrError, match="out of range for 4-bit"):
        pack_codes(torch.full((1, 32), -1, dtype=torch.int32), 4)
    with pytest.raises(RcsrError, match="bits=5 is not supported"):
        pack_codes(torch.zeros(1, 32, dtype=torch.uint8), 5)
    with pytest.raises(RcsrError, match="2-D"):
        pack_codes(torch.zeros(32, dtype=torch.uint8), 4)
    with pytest.raises(RcsrError, match=r"int32 \[out, 12\]"):
        unpack_codes(torch.zeros(1, 11, dtype=torch.int32), 3, 128)
    with pytest.raises(RcsrError, match="int64"):
        unpack_codes(torch.zeros(1, 12, dtype=torch.int64), 3, 128)


# ------------------------------------------------------------------------------------------------
# helpers: tiny Llama + RTN
# ------------------------------------------------------------------------------------------------
def rtn(w: torch.Tensor, spec: grid.QuantSpec, dynamic: bool, seed: int = 0) -> QuantizedTensor:
    """Plain RTN; ``dynamic`` forms groups from a random column permutation (act-order style)."""
    out_f, in_f = w.shape
    columns = None
    g_idx = None
    if dynamic:
        columns = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[columns] = (torch.arange(in_f) // spec.group_len(in_f)).to(torch.int32)
    scale, zero = grid.compute_grid(w, spec, columns=columns)
    s = grid.expand_groups(scale, spec, in_f, g_idx)
    z = grid.expand_groups(zero, spec, in_f, g_idx)
    codes = grid.quantize_to_grid(w.float(), s, z, spec.maxq).to(torch.uint8)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, g_idx=g_idx, spec=spec)


def quantize_model(model, spec: grid.QuantSpec, act_order: str):
    dynamic = act_order == "dynamic"
    q = {}
    for i, (name, mod) in enumerate(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            q[name] = rtn(mod.weight.detach(), spec, dynamic, seed=i)
    qc = {"quant_method": "rcsr", "format_version": 1, "bits": spec.bits, "group_size": spec.group_size,
          "sym": spec.sym, "act_order": act_order, "quantized_modules": sorted(q),
          "method": {"name": "rtn"}}
    return q, qc


def write_ckpt(tmp_path, bits=4, group_size=32, sym=True, act_order="static", tie=True, name="ckpt", **kw):
    model = tiny_llama(tie=tie)
    spec = grid.QuantSpec(bits, group_size, sym)
    q, qc = quantize_model(model, spec, act_order)
    out = ck.save_quantized(model, q, tmp_path / name, qc, **kw)
    return model, q, qc, out


def rewrite_tensors(ckpt: Path, fn):
    """Load model.safetensors, let ``fn`` edit the dict, write it back."""
    path = ckpt / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(ckpt: Path, fn):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------------
# save -> load round trips
# ------------------------------------------------------------------------------------------------
CASES = [
    (4, 32, True, "static"),
    (3, 64, False, "static"),
    (2, -1, True, "none"),
    (8, -1, False, "none"),
    (4, 32, True, "dynamic"),
    (3, 32, False, "dynamic"),
    (2, 64, False, "dynamic"),
    (8, -1, True, "dynamic"),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order", CASES)
def test_save_load_roundtrip(tmp_path, bits, group_size, sym, act_order):
    model, q, qc, out = write_ckpt(tmp_path, bits, group_size, sym, act_order)
    assert QuantConfig.read(out).to_dict()["bits"] == bits
    loaded = ck.load_quantized_tensors(out)
    assert set(loaded) == set(q) and len(q) == 14
    for name, qt in q.items():
        lt = loaded[name]
        assert lt.spec == qt.spec
        assert lt.codes.dtype == torch.uint8 and torch.equal(lt.codes, qt.codes)
        assert lt.scale.dtype == torch.float16 and torch.equal(lt.scale.float(), qt.scale)
        assert torch.equal(lt.zero.float(), qt.zero)
        if act_order == "dynamic":
            assert lt.g_idx.dtype == torch.int32 and torch.equal(lt.g_idx, qt.g_idx)
        else:
            assert lt.g_idx is None
        assert torch.equal(lt.dequantize(), qt.dequantize())

    # the files hold exactly the format's tensors
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        m = "model.layers.1.mlp.down_proj"
        in_f = 128
        ng = 1 if group_size == -1 else in_f // group_size
        assert f.get_tensor(f"{m}.qweight").dtype == torch.int32
        assert tuple(f.get_tensor(f"{m}.qweight").shape) == (64, in_f * bits // 32)
        assert f.get_tensor(f"{m}.scales").dtype == torch.float16
        assert tuple(f.get_tensor(f"{m}.scales").shape) == (64, ng)
        if not sym:
            assert f.get_tensor(f"{m}.zeros").dtype == torch.uint8
        if act_order == "dynamic":
            assert f.get_tensor(f"{m}.group_index").dtype == torch.int32
    for name in q:
        assert f"{name}.weight" not in keys
        assert f"{name}.qweight" in keys and f"{name}.scales" in keys
        assert (f"{name}.zeros" in keys) == (not sym)
        assert (f"{name}.group_index" in keys) == (act_order == "dynamic")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys      # tied: stored once
    assert "model.norm.weight" in keys and "model.layers.0.input_layernorm.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    qcfg = cfg["quantization_config"]
    assert qcfg["packing"] == "int32-lsb-bitstream" and qcfg["scale_dtype"] == "float16"
    assert qcfg["method"] == {"name": "rtn"} and "rcsr_version" in qcfg
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("bits,group_size,sym,act_order", [CASES[0], CASES[1], CASES[6]])
def test_fake_quant_model_matches_dequantized(tmp_path, bits, group_size, sym, act_order):
    model, q, qc, out = write_ckpt(tmp_path, bits, group_size, sym, act_order)
    fq, tok = ck.load_fake_quant_model(out)
    assert tok is None
    assert not fq.training
    assert not hasattr(fq.config, "quantization_config")
    for name, qt in q.items():
        assert torch.equal(fq.get_submodule(name).weight.data, qt.dequantize())
    assert fq.lm_head.weight.data_ptr() == fq.model.embed_tokens.weight.data_ptr()
    assert torch.equal(fq.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(fq.model.norm.weight, model.model.norm.weight)

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, qt in q.items():
            ref.get_submodule(name).weight.copy_(qt.dequantize())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = fq(ids).logits
        b = ref(ids).logits
        c = model(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)              # quantization did change the model

    # other dtype: weights are the dequantized fp32 values cast once
    fq16, _ = ck.load_fake_quant_model(out, dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj"
    assert fq16.get_submodule(name).weight.dtype == torch.bfloat16
    assert torch.equal(fq16.get_submodule(name).weight, q[name].dequantize().to(torch.bfloat16))


def test_untied_and_sharded_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    model, q, qc, out = write_ckpt(tmp_path, 4, 64, False, "static", tie=False, tokenizer=tok,
                                   max_shard_size="40KB", extra_files={"quant_report.json": '{"a": 1}',
                                                                      "sub/bytes.bin": b"\x00\x01"})
    files = sorted(os.listdir(out))
    shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    assert len(shards) > 1 and "model.safetensors" not in files
    assert all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" in index["weight_map"]
    assert "model.layers.0.mlp.up_proj.zeros" in index["weight_map"]
    sizes = 0
    for s in shards:
        with safe_open(str(out / s), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == sizes
    assert (out / "quant_report.json").read_text() == '{"a": 1}'
    assert (out / "sub" / "bytes.bin").read_bytes() == b"\x00\x01"

    loaded = ck.load_quantized_tensors(out)
    for name, qt in q.items():
        assert torch.equal(loaded[name].codes, qt.codes)
    fq, tok2 = ck.load_fake_quant_model(out)
    assert tok2 is not None and tok2("hello world")["input_ids"] == [1, 2]
    assert fq.lm_head.weight.data_ptr() != fq.model.embed_tokens.weight.data_ptr()
    assert torch.equal(fq.lm_head.weight, model.lm_head.weight)
    for name, qt in q.items():
        assert torch.equal(fq.get_submodule(name).weight.data, qt.dequantize())


def test_export_dequantized(tmp_path):
    from transformers import AutoModelForCausalLM

    model, q, qc, out = write_ckpt(tmp_path, 3, 32, True, "dynamic")
    exp = ck.export_dequantized(out, tmp_path / "deq")
    cfg = json.loads((exp / "config.json").read_text())
    assert "quantization_config" not in cfg
    ref = AutoModelForCausalLM.from_pretrained(str(exp), dtype=torch.float32)
    for name, qt in q.items():
        assert ref.get_submodule(name).weight.dtype == torch.float32
        assert torch.equal(ref.get_submodule(name).weight, qt.dequantize())
    assert torch.equal(ref.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with safe_open(str(exp / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    with pytest.raises(RcsrError, match="already exists"):
        ck.export_dequantized(out, tmp_path / "deq")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reference_implementation_in_format_doc(tmp_path):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def dequantize_layer" in b)
    ns: dict = {}
    exec(code, ns)
    for bits, gs, sym, act in [(3, 32, False, "dynamic"), (4, -1, True, "none"), (2, 64, True, "static")]:
        _, q, qc, out = write_ckpt(tmp_path, bits, gs, sym, act, name=f"c{bits}{gs}{act}")
        disk_qc = QuantConfig.read(out).to_dict()
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        for name, qt in q.items():
            assert torch.equal(ns["dequantize_layer"](t, name, disk_qc), qt.dequantize())


# ------------------------------------------------------------------------------------------------
# atomicity
# ------------------------------------------------------------------------------------------------
def _hidden(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("shard", ["2GB", "40KB"])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, shard):
    model = tiny_llama()
    q, qc = quantize_model(model, grid.QuantSpec(4, 32, True), "static")
    calls = []

    def boom(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2 or shard == "2GB":
            Path(filename).write_bytes(b"partial")          # a half-written file
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(storage, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_quantized(model, q, tmp_path / "out", qc, max_shard_size=shard)
    assert calls
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_refused_and_overwrite(tmp_path, monkeypatch):
    model = tiny_llama()
    q, qc = quantize_model(model, grid.QuantSpec(4, 32, True), "static")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RcsrError, match="already exists"):
        ck.save_quantized(model, q, out, qc)
    assert sorted(os.listdir(out)) == ["keep.txt"]

    # a failing overwrite keeps the old folder intact
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_quantized(model, q, out, qc, overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert _hidden(tmp_path) == []
    monkeypatch.undo()

    ck.save_quantized(model, q, out, qc, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _hidden(tmp_path) == []
    assert set(ck.load_quantized_tensors(out)) == set(q)


# ------------------------------------------------------------------------------------------------
# validation on write
# ------------------------------------------------------------------------------------------------
def test_save_validation_errors(tmp_path):
    model = tiny_llama()
    spec = grid.QuantSpec(4, 32, True)
    q, qc = quantize_model(model, spec, "static")

    def fails(match, qq=q, cfg=qc, m=model):
        with pytest.raises(RcsrError, match=match):
            ck.save_quantized(m, qq, tmp_path / "x", cfg)
        assert list(tmp_path.iterdir()) == []

    fails("quant_method is 'gptq'", cfg={**qc, "quant_method": "gptq"})
    fails("format_version 4 is not supported", cfg={**qc, "format_version": 4})
    fails(r"quantization_config\.bits 5 is not supported", cfg={**qc, "bits": 5})
    fails(r"quantization_config\.act_order 'sometimes'", cfg={**qc, "act_order": "sometimes"})
    fails(r"quantization_config\.sym is missing", cfg={k: v for k, v in qc.items() if k != "sym"})
    fails("does not match the quantized tensors", cfg={**qc, "quantized_modules": qc["quantized_modules"][1:]})
    fails("differs from quantization_config", cfg={**qc, "bits": 3})
    fails("act_order is 'dynamic' but g_idx is missing", cfg={**qc, "act_order": "dynamic"})
    with pytest.raises(RcsrError, match="max_shard_size 'lots'"):
        ck.save_quantized(model, q, tmp_path / "x", qc, max_shard_size="lots")

    name = "model.layers.0.self_attn.q_proj"
    bad = dict(q)
    qt = q[name]
    bad[name] = QuantizedTensor(qt.codes, qt.scale * 1.0001, qt.zero, None, spec)
    fails(f"{name}: scale is not exactly representable in float16", qq=bad)
    bad[name] = QuantizedTensor(qt.codes, qt.scale, qt.zero - 1, None, spec)
    fails(f"{name}: symmetric grid needs zero == 8", qq=bad)
    bad[name] = QuantizedTensor(qt.codes, qt.scale[:, :1], qt.zero[:, :1], None, spec)
    fails(rf"{name}: scale must be \[64, 2\]", qq=bad)

    lm = QuantizedTensor(torch.zeros(512, 64, dtype=torch.uint8), torch.ones(512, 2), torch.full((512, 2), 8.0),
                         None, spec)
    fails("lm_head: its weight is tied to model.embed_tokens.weight", qq={**q, "lm_head": lm},
          cfg={**qc, "format_version": 2, "quantized_modules": qc["quantized_modules"] + ["lm_head"]})
    fails("vocabulary table.* lm_head need format_version 2", qq={**q, "lm_head": lm},
          cfg={**qc, "quantized_modules": qc["quantized_modules"] + ["lm_head"]})
    fails("model.nope: not a module", qq={**q, "model.nope": qt},
          cfg={**qc, "quantized_modules": qc["quantized_modules"] + ["model.nope"]})


# ------------------------------------------------------------------------------------------------
# validation on read: each error names the tensor / field
# ------------------------------------------------------------------------------------------------
M = "model.layers.0.mlp.up_proj"      # [128, 64]


def test_load_error_misshaped_scales(tmp_path):
    *_, out = write_ckpt(tmp_path, 4, 32, True, "static")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.scales", t[f"{M}.scales"][:, :1].contiguous()))
    with pytest.raises(RcsrError) as e:
        ck.load_quantized_tensors(out)
    assert str(e.value) == f"{M}.scales: expected float16 [128, 2], got float16 [128, 1]"


def test_load_error_missing_qweight(tmp_path):
    *_, out = write_ckpt(tmp_path, 4, 32, True, "static")
    rewrite_tensors(out, lambda t: t.pop(f"{M}.qweight"))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.qweight: missing")):
        ck.load_quantized_tensors(out)


def test_load_error_wrong_dtypes(tmp_path):
    *_, out = write_ckpt(tmp_path, 4, 32, False, "static")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.scales", t[f"{M}.scales"].float()))
    with pytest.raises(RcsrError) as e:
        ck.load_quantized_tensors(out)
    assert str(e.value) == f"{M}.scales: expected float16 [128, 2], got float32 [128, 2]"

    *_, out = write_ckpt(tmp_path, 4, 32, False, "static", name="c2")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.zeros", t[f"{M}.zeros"].to(torch.int32)))
    with pytest.raises(RcsrError) as e:
        ck.load_quantized_tensors(out)
    assert str(e.value) == f"{M}.zeros: expected uint8 [128, 2], got int32 [128, 2]"

    *_, out = write_ckpt(tmp_path, 4, 32, False, "static", name="c3")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.qweight", t[f"{M}.qweight"].to(torch.int64)))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.qweight: expected int32 [out, in*4/32], got int64 [128, 8]")):
        ck.load_quantized_tensors(out)


def test_load_error_zeros(tmp_path):
    *_, out = write_ckpt(tmp_path, 3, 32, False, "static")
    rewrite_tensors(out, lambda t: t.pop(f"{M}.zeros"))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.zeros: missing (required when quantization_config.sym "
                                                  "is false)")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 3, 32, False, "static", name="c2")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.zeros", torch.full_like(t[f"{M}.zeros"], 8)))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.zeros: values must lie in [0, 7]")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c3")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.zeros", torch.zeros(128, 2, dtype=torch.uint8)))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.zeros: unexpected for a symmetric checkpoint")):
        ck.load_quantized_tensors(out)


def test_load_error_group_index(tmp_path):
    *_, out = write_ckpt(tmp_path, 4, 32, True, "dynamic")
    rewrite_tensors(out, lambda t: t.pop(f"{M}.group_index"))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.group_index: missing (required when "
                                                  "quantization_config.act_order is 'dynamic')")):
        ck.load_quantized_tensors(out)

    def out_of_range(t):
        g = t[f"{M}.group_index"].clone()
        g[5] = 2
        t[f"{M}.group_index"] = g

    *_, out = write_ckpt(tmp_path, 4, 32, True, "dynamic", name="c2")
    rewrite_tensors(out, out_of_range)
    with pytest.raises(RcsrError, match=re.escape(f"{M}.group_index: values must lie in [0, 2), got [0, 2]")):
        ck.load_quantized_tensors(out)

    def unbalanced(t):
        t[f"{M}.group_index"] = torch.zeros(64, dtype=torch.int32)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "dynamic", name="c3")
    rewrite_tensors(out, unbalanced)
    with pytest.raises(RcsrError, match=re.escape(f"{M}.group_index: every group must hold exactly 32")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c4")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.group_index", torch.zeros(64, dtype=torch.int32)))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.group_index: unexpected")):
        ck.load_quantized_tensors(out)


def test_load_error_qweight_width_and_strays(tmp_path):
    *_, out = write_ckpt(tmp_path, 3, 32, True, "static")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.qweight", t[f"{M}.qweight"][:, :5].contiguous()))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.qweight: width 5 must be a positive multiple of 3")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 64, True, "static", name="c2")
    # 4 words -> 32 in-features, not divisible by group size 64
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.qweight", t[f"{M}.qweight"][:, :4].contiguous()))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.qweight: 32 in-features (from width 4) are not divisible")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c3")
    rewrite_tensors(out, lambda t: t.__setitem__("lm_head.qweight", torch.zeros(512, 8, dtype=torch.int32)))
    with pytest.raises(RcsrError, match=re.escape("lm_head.qweight: quantized tensor of a module not listed")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c4")
    rewrite_tensors(out, lambda t: t.__setitem__(f"{M}.weight", torch.zeros(128, 64)))
    with pytest.raises(RcsrError, match=re.escape(f"{M}.weight: unexpected for a quantized module")):
        ck.load_quantized_tensors(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c5")
    rewrite_tensors(out, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(RcsrError, match=re.escape("unexpected tensor(s) for LlamaForCausalLM: model.extra.weight")):
        ck.load_fake_quant_model(out)

    *_, out = write_ckpt(tmp_path, 4, 32, True, "static", name="c6")
    rewrite_tensors(out, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(RcsrError, match=re.escape("missing tensor(s) for LlamaForCausalLM: model.norm.weight")):
        ck.load_fake_quant_model(out)


def test_read_quant_config_errors(tmp_path):
    with pytest.raises(RcsrError, match="config.json not found"):
        QuantConfig.read(tmp_path).to_dict()
    *_, out = write_ckpt(tmp_path, 4, 32, True, "static")

    cases = [
        (lambda c: c.pop("quantization_config"), "has no quantization_config"),
        (lambda c: c["quantization_config"].update(quant_method="gptq"),
         "quantization_config.quant_method is 'gptq', expected 'rcsr'"),
        (lambda c: c["quantization_config"].update(format_version=4),
         "quantization_config.format_version 4 is not supported"),
        (lambda c: c["quantization_config"].pop("format_version"), "quantization_config.format_version is missing"),
        (lambda c: c["quantization_config"].update(bits=6), "quantization_config.bits 6 is not supported"),
        (lambda c: c["quantization_config"].update(bits=True), "quantization_config.bits True is not supported"),
        (lambda c: c["quantization_config"].update(group_size=48),
         "quantization_config.group_size 48 is not supported (choose -1 for per-channel or a positive multiple "
         "of 32"),
        (lambda c: c["quantization_config"].update(group_size=0), "quantization_config.group_size 0 is not supported"),
        (lambda c: c["quantization_config"].update(act_order="yes"),
         "quantization_config.act_order 'yes' is not supported"),
        (lambda c: c["quantization_config"].update(sym="true"), "quantization_config.sym must be true or false"),
        (lambda c: c["quantization_config"].update(quantized_modules=[]),
         "quantization_config.quantized_modules must be a non-empty list"),
        (lambda c: c["quantization_config"].update(packing="int32-msb"),
         "quantization_config.packing 'int32-msb' is not supported"),
        (lambda c: c["quantization_config"].update(scale_dtype="bfloat16"),
         "quantization_config.scale_dtype 'bfloat16' is not supported"),
    ]
    original = (out / "config.json").read_text()
    for edit, msg in cases:
        (out / "config.json").write_text(original)
        edit_config(out, edit)
        with pytest.raises(RcsrError, match=re.escape(msg)):
            QuantConfig.read(out).to_dict()
        with pytest.raises(RcsrError, match=re.escape(msg)):
            ck.load_quantized_tensors(out)
    (out / "config.json").write_text(original)
    (out / "model.safetensors").unlink()
    with pytest.raises(RcsrError, match="no model.safetensors"):
        ck.load_quantized_tensors(out)


def test_quantized_tensor_to_tensors():
    spec = grid.QuantSpec(3, 32, False)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    qt = rtn(w, spec, dynamic=True)
    qt.bias = torch.arange(8.0)
    t = qt.to_tensors("a.b")
    assert set(t) == {"a.b.qweight", "a.b.scales", "a.b.zeros", "a.b.group_index", "a.b.bias"}
    assert t["a.b.qweight"].dtype == torch.int32 and tuple(t["a.b.qweight"].shape) == (8, 6)
    assert t["a.b.scales"].dtype == torch.float16 and tuple(t["a.b.scales"].shape) == (8, 2)
    assert t["a.b.zeros"].dtype == torch.uint8 and torch.equal(t["a.b.zeros"].float(), qt.zero)
    assert t["a.b.group_index"].dtype == torch.int32
    assert torch.equal(unpack_codes(t["a.b.qweight"], 3, 64), qt.codes)
    deq = qt.dequantize()
    assert deq.dtype == torch.float32
    assert (deq - w).abs().max() <= qt.scale.max() * 1.01      # RTN error is at most one step
    sym = rtn(w, grid.QuantSpec(4, -1, True), dynamic=False)
    assert set(sym.to_tensors("p")) == {"p.qweight", "p.scales"}


def test_quantized_tensor_validation_and_parse_size():
    spec = grid.QuantSpec(4, 32, True)
    ok = rtn(torch.randn(4, 64, generator=torch.Generator().manual_seed(5)), spec, dynamic=False)
    bad_codes = ok.codes.clone()
    bad_codes[0, 0] = 16
    with pytest.raises(RcsrError, match=re.escape("x: codes out of range [0, 15] for 4 bits")):
        QuantizedTensor(bad_codes, ok.scale, ok.zero, None, spec).to_tensors("x")
    with pytest.raises(RcsrError, match="x: codes are not integer-valued"):
        QuantizedTensor(ok.codes.float() + 0.5, ok.scale, ok.zero, None, spec).to_tensors("x")
    g = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RcsrError, match=re.escape("x.g_idx: every group must hold exactly 32 input columns")):
        QuantizedTensor(ok.codes, ok.scale, ok.zero, g, spec).to_tensors("x")
    with pytest.raises(RcsrError, match=re.escape("x: bias must be [4], got [5]")):
        QuantizedTensor(ok.codes, ok.scale, ok.zero, None, spec, bias=torch.zeros(5)).to_tensors("x")
    assert storage.parse_size("2GB") == 2 * 10**9 and storage.parse_size("1.5 MiB") == 3 * 2**19
    assert storage.parse_size(1234) == 1234 and storage.parse_size("40kb") == 40_000
    with pytest.raises(RcsrError, match="must be positive"):
        storage.parse_size(0)


def test_quantized_table_needs_format_version_2(tmp_path):
    """A quantized vocabulary table is new in format_version 2: the writer refuses to label it 1."""
    model = tiny_llama(layers=1, vocab_size=96)
    spec = grid.QuantSpec(4, 32, True)
    w = model.model.embed_tokens.weight.detach()
    scale, zero = grid.compute_grid(w, spec)
    codes = grid.quantize_to_grid(w, grid.expand_groups(scale, spec, 64), grid.expand_groups(zero, spec, 64), spec.maxq)
    q = {"model.embed_tokens": QuantizedTensor(codes=codes.to(torch.uint8), scale=scale, zero=zero, g_idx=None,
                                               spec=spec)}
    qc = {"quant_method": "rcsr", "format_version": 1, "bits": 4, "group_size": 32, "sym": True,
          "act_order": "none", "quantized_modules": ["model.embed_tokens"]}
    with pytest.raises(RcsrError, match="model.embed_tokens need format_version 2"):
        ck.save_quantized(model, q, tmp_path / "v1", qc)
    assert not (tmp_path / "v1").exists()
    out = ck.save_quantized(model, q, tmp_path / "v2", {**qc, "format_version": 2})
    fq, _ = ck.load_fake_quant_model(out)
    assert torch.equal(fq.lm_head.weight.detach(), q["model.embed_tokens"].dequantize())
    # the tied head is a table of its own only as the embedding's source: quantizing it by name is refused
    with pytest.raises(RcsrError, match="tied to model.embed_tokens.weight; quantize the tied source"):
        ck.save_quantized(model, {"lm_head": q["model.embed_tokens"]}, tmp_path / "h",
                       {**qc, "format_version": 2, "quantized_modules": ["lm_head"]})


def test_mixed_grids_roundtrip_reference_and_errors(tmp_path):
    """Format version 3: ``module_grids`` gives modules their own bits/group size; the writer checks every
    tensor against its module's grid, the reader and the doc's reference implementation decode it."""
    model = tiny_llama()
    base = grid.QuantSpec(4, 32, False)
    q, qc = quantize_model(model, base, "static")
    grids = {}
    for i, name in enumerate(sorted(q)):
        if name.endswith(("down_proj", "o_proj")):
            spec = grid.QuantSpec(2 if name.endswith("down_proj") else 8, 64, False)
            q[name] = rtn(model.get_submodule(name).weight.detach(), spec, False, seed=i)
            grids[name] = {"bits": spec.bits, "group_size": spec.group_size}
    with pytest.raises(RcsrError, match="module_grids needs format_version 3"):
        ck.save_quantized(model, q, tmp_path / "v1", {**qc, "module_grids": grids})
    with pytest.raises(RcsrError, match="differs from quantization_config"):
        ck.save_quantized(model, q, tmp_path / "nogrid", {**qc, "format_version": 3})
    out = ck.save_quantized(model, q, tmp_path / "mixed", {**qc, "format_version": 3, "module_grids": grids})
    loaded = ck.load_quantized_tensors(out)
    for name, qt in q.items():
        assert loaded[name].spec == qt.spec and torch.equal(loaded[name].codes, qt.codes.to(torch.uint8)), name
    ns: dict = {}
    exec(next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "def dequantize_layer" in b), ns)
    disk_qc = QuantConfig.read(out).to_dict()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    for name, qt in q.items():
        assert torch.equal(ns["dequantize_layer"](t, name, disk_qc), qt.dequantize()), name
    fq, _ = ck.load_fake_quant_model(out)
    for name, qt in q.items():
        assert torch.equal(fq.get_submodule(name).weight, qt.dequantize()), name
