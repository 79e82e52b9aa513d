"""Offline assets, text loading, calibration windows and perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcsr_deploy import assets, data, evaluate
from rcsr_deploy.errors import RcsrError

WORDS = ("the whale ship sailed across grey water while the crew sang of home and harbour "
         "lights far behind them ").split()


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    model, _ = assets.load_model(str(tiny_llama_dir))
    return model


@pytest.fixture()
def text_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    paras = []
    for _ in range(40):
        idx = torch.randint(0, len(WORDS), (60,), generator=g).tolist()
        paras.append(" ".join(WORDS[i] for i in idx) + ".")
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------ assets
def test_default_model_folder(default_model_dir, tok):
    cfg = json.loads((Path(default_model_dir) / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a whale."}], tokenize=False,
                                     add_generation_prompt=True)
    assert "<|im_start|>user\nName a whale.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert assets.resolve_model("default") == str(default_model_dir)


def test_resolve_model(tmp_path, tiny_llama_dir):
    assert assets.resolve_model(str(tiny_llama_dir)) == str(tiny_llama_dir)
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(RcsrError, match="has no config.json"):
        assets.resolve_model(str(tmp_path))
    with pytest.raises(RcsrError, match="does not exist"):
        assets.resolve_model(str(tmp_path / "missing"))


def test_load_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # connection refused at once
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RcsrError, match=r"cannot load model 'no-such-org/no-such-model': .*unreachable"):
        assets.load_model("no-such-org/no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(RcsrError, match="cannot load model"):
        assets.load_model(str(tmp_path))


def test_build_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("RCSR_CACHE", str(tmp_path / "cache"))
    final = assets.cache_dir() / "things" / "x"
    complete = lambda d: (d / "done").is_file()  # noqa: E731

    def failing(tmp):
        (tmp / "partial").write_text("1")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._build_atomically(final, "x", complete, failing)
    assert not final.exists() and list(final.parent.iterdir()) == []  # temp dir cleaned up

    calls = []

    def ok(tmp):
        calls.append(tmp)
        (tmp / "done").write_text("1")

    assert assets._build_atomically(final, "x", complete, ok) == final
    assert assets._build_atomically(final, "x", complete, ok) == final
    assert len(calls) == 1 and (final / "done").read_text() == "1"
    assert oct(final.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_builtin_texts():
    sotu = assets.sotu_files()
    assert len(sotu) == 233 and sotu[0].name.startswith("1790_") and sotu[-1].name.startswith("2021_")
    moby = assets.moby_dick_files()
    assert [p.name for p in moby[:3]] == ["chapter_1.txt", "chapter_2.txt", "chapter_3.txt"]
    assert moby[134].name == "chapter_135.txt" and moby[-1].name == "epilogue.txt" and len(moby) == 136
    text = data.load_text("mobydick", "test")
    assert text.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    # Local files go through the datasets "text" builder and give the same text.
    folder = moby[0].parent
    assert data.load_text(str(folder / "chapter_[1-3].txt"), "train") == data.load_text(
        str(folder / "chapter_1.txt"), "train") + "\n\n" + "\n\n".join(
        p.read_text().strip() for p in (folder / "chapter_2.txt", folder / "chapter_3.txt"))


def test_builtin_emails():
    """The "emails" set: message bodies of the SpamAssassin "easy ham" corpus, no headers or quoted lines."""
    files = assets.email_files()
    assert len(files) == 2500 + 1400 and files[0].parent.name == "easy-ham-1" and files[-1].parent.name == "easy-ham-2"
    text = data.load_text("emails", "validation")
    assert 500_000 < len(text.split()) < 700_000
    lines = text.splitlines()
    assert not any(ln.startswith(">") for ln in lines)
    # the messages' own headers are gone; only forwarded messages quoted in a body keep theirs
    assert sum(ln.startswith(("Received: ", "Return-Path: ", "Message-Id: ")) for ln in lines) < 0.002 * len(lines)
    assert data.load_text("emails", "test") == text          # one text: every split gives the whole corpus
    # a body is what follows the headers, minus quotes and the list footer
    body = data._email_body(files[0])
    assert body and body.split()[0] in text and "From:" not in body.splitlines()[0]


# ------------------------------------------------------------------------------------- data
def test_tokenize_in_chunks_matches_whole(tok):
    text = data.load_text("mobydick", "test")[:400_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    chunked = data.tokenize_text(text, tok)
    assert len(data._chunks(text)) > 3
    assert chunked.dtype == torch.long and chunked.tolist() == whole
    assert data.tokenize_text(text, tok, max_tokens=1000).tolist() == whole[:1000]


def test_calibration_windows_deterministic(text_file, tok):
    a = data.calibration_windows(str(text_file), tok, nsamples=8, seqlen=32, seed=0)
    b = data.calibration_windows(str(text_file), tok, nsamples=8, seqlen=32, seed=0)
    c = data.calibration_windows(str(text_file), tok, nsamples=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # every window is a contiguous slice of the token stream
    stream = data.tokenize_text(data.load_text(str(text_file), "train"), tok).tolist()
    s = " ".join(map(str, stream))
    for row in a.tolist():
        assert " ".join(map(str, row)) in s


@pytest.mark.slow  # tokenizes all 233 addresses (~2.1M tokens, ~5 s)
def test_calibration_windows_sotu(tok):
    assert data.load_text("sotu", "train").startswith("Fellow-Citizens of the Senate")
    w = data.calibration_windows("sotu", tok, nsamples=4, seqlen=64, seed=3)
    assert w.shape == (4, 64)
    assert torch.equal(w, data.calibration_windows("sotu", tok, nsamples=4, seqlen=64, seed=3))


def test_calibration_text_too_short(tmp_path, tok):
    p = tmp_path / "short.txt"
    p.write_text("Call me Ishmael.")
    n = len(tok("Call me Ishmael.", add_special_tokens=False)["input_ids"])
    with pytest.raises(RcsrError, match=rf"calibration text has {n} tokens; need at least seqlen\+1 = 129"):
        data.calibration_windows(str(p), tok, nsamples=2, seqlen=128, seed=0)


def test_unknown_sources(tmp_path, tok):
    with pytest.raises(RcsrError, match="neither a known dataset"):
        data.load_text(str(tmp_path / "nope.txt"), "train")
    with pytest.raises(RcsrError, match="no files match"):
        data.load_text(str(tmp_path / "*.nothing"), "train")
    with pytest.raises(RcsrError, match="unknown split"):
        data.load_text("mobydick", "dev")
    with pytest.raises(RcsrError, match="neither a known dataset"):
        data.calibration_windows("wikitext-103", tok, nsamples=1, seqlen=8, seed=0)


def test_hub_sets_offline(monkeypatch, tok):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RcsrError, match=r"dataset 'wikitext2' needs the Hugging Face hub \(unreachable\): "
                                        r"pass a local text file"):
        data.calibration_windows("wikitext2", tok, nsamples=4, seqlen=32, seed=0)
    with pytest.raises(RcsrError, match="dataset 'c4' needs the Hugging Face hub"):
        data.eval_tokens("c4", tok, 100)


def test_eval_tokens(tok):
    t = data.eval_tokens("mobydick", tok, 300)
    assert t.shape == (300,) and t.dtype == torch.long
    assert tok.decode(t[:12]) == "CHAPTER 1. Loomings.\n\nCall"
    with pytest.raises(RcsrError):
        data.eval_tokens("mobydick", tok, 0)


# --------------------------------------------------------------------------------- evaluate
def _manual_ppl(model, windows, bos):
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor(([bos] if bos is not None else []) + w)[None]
            logits = model(ids).logits[0]
            total += F.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count), count


def test_perplexity_matches_manual(tiny_model, text_file, tok):
    seqlen = 24
    tokens = data.tokenize_text(data.load_text(str(text_file), "test"), tok)[: 2 * seqlen + 7]
    windows = [tokens[:seqlen].tolist(), tokens[seqlen:2 * seqlen].tolist()]  # partial tail dropped
    for bos in (1, None):
        expected, count = _manual_ppl(tiny_model, windows, bos)
        r = evaluate.perplexity(tiny_model, tokens, seqlen, bos_token_id=bos, progress=False)
        assert r["windows"] == 2 and r["seqlen"] == seqlen and r["tokens"] == count
        assert count == (2 * seqlen if bos is not None else 2 * (seqlen - 1))
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["ppl"] == pytest.approx(expected, rel=1e-5)
        assert r["nll"] == pytest.approx(math.log(expected), rel=1e-5)
        rb = evaluate.perplexity(tiny_model, tokens, seqlen, bos_token_id=bos, batch_size=2, progress=False)
        assert rb["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_perplexity_errors(tiny_llama_dir, tiny_model):
    tokens = torch.arange(10, 60)
    with pytest.raises(RcsrError, match="need at least seqlen = 64"):
        evaluate.perplexity(tiny_model, tokens, 64, bos_token_id=1, progress=False)
    broken, _ = assets.load_model(str(tiny_llama_dir))
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(RcsrError, match="perplexity is not finite"):
        evaluate.perplexity(broken, tokens, 16, bos_token_id=1, progress=False)


@pytest.mark.slow
def test_default_model_perplexity_mobydick(default_model_dir):
    model, tokenizer = assets.load_model("default")
    tokens = data.eval_tokens("mobydick", tokenizer, 2048)
    r = evaluate.perplexity(model, tokens, 1024, bos_token_id=tokenizer.bos_token_id, progress=False)
    print(f"default model fp32 perplexity, Moby-Dick first 2048 tokens, seqlen 1024: {r['ppl']:.3f}")
    assert r["windows"] == 2 and r["tokens"] == 2048
    assert 20 < r["ppl"] < 120
