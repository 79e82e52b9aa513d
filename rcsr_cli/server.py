"""One vLLM-server lifecycle for the whole project: start ``vllm serve`` on a free loopback port, wait
until ``/health`` answers, stop the whole process tree (API server, engine core, workers).

Used by ``rcsr bench`` (online serving), ``tools/main_job.py`` and the end-to-end tests.  The server
runs ``python -m rcsr_cli.vllm_cli serve MODEL ...`` in its own session, so stopping its process group
takes every vLLM process with it (killing only the Python PID would orphan the engine processes).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rcsr_deploy.errors import RcsrError

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``timeout`` seconds; no-op if it has exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def vllm_env(extra: dict[str, str] | None = None, kv_cache_gib: int = 1) -> dict[str, str]:
    """The environment of a vLLM subprocess: CPU KV-cache default, INFO logging (the plugin's kernel
    choice is logged there), unbuffered output, this checkout importable."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def vllm_command(*args: str) -> list[str]:
    """``vllm *args`` as a subprocess command line (works on the CPU build, whose script is broken)."""
    return [sys.executable, "-m", "rcsr_cli.vllm_cli", *args]


class VllmServer:
    """``vllm serve MODEL *args`` on a free loopback port; a context manager that always stops it.

    ``cli="rcsr"`` starts it through ``rcsr serve`` (the user's command) instead of vLLM's CLI.

        with VllmServer(model, ["--dtype", "bfloat16"], log_path=...) as srv:
            srv.wait_ready(600)
            srv.post("/v1/completions", {...})
    """

    def __init__(self, model: str | os.PathLike, args: list[str] | tuple[str, ...] = (), *, log_path: str | os.PathLike,
                 env: dict[str, str] | None = None, kv_cache_gib: int = 1, cli: str = "vllm"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        head = [sys.executable, "-m", "rcsr_cli", "serve"] if cli == "rcsr" else vllm_command("serve")
        self.cmd = [*head, str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                         env=vllm_env(env, kv_cache_gib), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 600) -> float:
        """Block until ``/health`` answers 200; returns the seconds it took.  RcsrError (naming the
        log) when the server exits or is not healthy in time."""
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RcsrError(f"vllm serve exited ({self.proc.returncode}) before it was healthy "
                                f"(log: {self.log_path}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RcsrError(f"vllm serve not healthy after {timeout:.0f}s (log: {self.log_path})")
            time.sleep(1.0)

    def post(self, path: str, payload: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, timeout=60)

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
