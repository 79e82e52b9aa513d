"""Shared fixtures, and the markers of each test folder.

The folders mirror the layers: ``unit`` (pure functions), ``format`` (checkpoint contract, packing,
export), ``calibration`` (the quantizer on tiny models), ``plugin`` (vLLM plugin and kernels, no
server), ``e2e`` (real models, real vLLM, the CLI).  Every test is marked with its folder's name;
``e2e`` tests are also ``slow``: ``pytest -m "not slow"`` runs everything else.

Assets (the converted default model, the npm texts) are cached in ``$RCSR_CACHE``; CI points it at a
folder inside the workspace so that they are built once per checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FOLDER_MARKERS = {"unit": (), "format": (), "calibration": (), "plugin": (), "e2e": ("slow",)}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
            for extra in FOLDER_MARKERS[folder]:
                item.add_marker(getattr(pytest.mark, extra))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct, fp32 HF folder); converted once, cached."""
    from rcsr_deploy import assets

    return assets.default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random fp32 LlamaForCausalLM with the default model's tokenizer (vocab 49,152).

    hidden 64, 2 layers, 4 heads of head_dim 32 (vLLM's CPU attention needs head_dim >= 32),
    2 KV heads, intermediate 128; every linear's in-features is a multiple of 32. Tied embeddings,
    like the default model. Deterministic (seed 0).
    """
    from factories import tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    for name in TOKENIZER_FILES:
        src = Path(default_model_dir) / name
        if src.is_file():
            shutil.copy(src, out / name)
    model = tiny_llama(vocab_size=49152, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    return out
