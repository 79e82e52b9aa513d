"""The Triton W{2,3,4,8}A16 kernel compiled ahead of time for a real H100/H200 (sm_90a), on the CPU.

No GPU is used: ``tools/compile_kernels.py`` lowers ``wna16_gemm_kernel`` with Triton's CUDA backend and
its bundled ptxas, specialized exactly like a launch of ``triton_wna16.matmul``, and inspects the
cubin (ptxas -v, cuobjdump, nvdisasm).  One representative specialization per bits x path (skinny
M = 1, tiled M = 64; ``default_config`` at 4096x4096, group 128, symmetric) x activation dtype.

The compiles run in a subprocess without ``TRITON_INTERPRET``: tests/test_triton_kernels.py sets it
at import in its own process (scripts/test.sh), and Triton fixes interpreter-or-compiled when the
kernel module is imported, so nothing here depends on what ran before in this pytest process.
Skipped only when Triton's NVIDIA backend (ptxas, cuobjdump, nvdisasm) is not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compile_kernels.py"
SM90_SHARED = 227 * 1024          # max dynamic shared memory per block on sm_90
SM90_REGS = 255


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=_env(),
                          cwd=str(ROOT), timeout=timeout)
    if proc.returncode == 2 and "no AOT toolchain" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"compile_kernels failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    _run_tool("--arch", "90", "--configs", "default", "--shapes", "4096x4096", "--m", "1,64",
              "--branches", "tile", "--sym", "sym", "--bits", "2,3,4,8", "--dtype", "fp16,bf16",
              "--no-table", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["sm"] == "sm_90a" and data["no_gpu_run"] is True
    return data["rows"]


def _where(r: dict) -> str:
    return f"bits {r['bits']} {r['dtype']} {r['path']} {r['config']}"


def test_every_specialization_compiles(rows):
    got = {(r["bits"], r["path"], r["dtype"]) for r in rows}
    assert got == {(b, p, d) for b in (2, 3, 4, 8) for p in ("skinny", "tiled") for d in ("fp16", "bf16")}
    for r in rows:
        assert r["ok"], f"{_where(r)}: {r['error']}"
        assert r["sass_instructions"] > 0 and not r.get("sass_error"), _where(r)
        # specialized like a real launch: Triton's own binder, None pointers and M = 1 as constexprs,
        # 16-byte-aligned pointers and 16-divisible sizes/strides with divisibility hints
        spec = r["specialization"]
        assert spec["how"] == "triton-binder"
        assert {"bias_ptr", "gidx_ptr", "z_ptr"} <= set(spec["constexpr_args"])
        assert ("qh_ptr" in spec["constexpr_args"]) == (r["bits"] != 3)
        assert (spec["constexpr_args"].get("M") == 1) == (r["M"] == 1)
        assert {"x_ptr", "qw_ptr", "s_ptr", "out_ptr", "K", "N_PAD", "stride_xm", "stride_qw"} <= set(spec["divisible_by_16"])
        assert spec["signature"]["out_ptr"] == ("*fp32" if r["config"]["SPLIT_K"] > 1 else f"*{r['dtype']}")


def test_shared_memory_and_registers_within_sm90_limits(rows):
    for r in rows:
        assert 0 < r["shared"] <= SM90_SHARED, f"{_where(r)}: {r['shared']} bytes of shared memory"
        assert 0 < r["regs"] <= SM90_REGS, f"{_where(r)}: {r['regs']} registers"
        assert r["cuobjdump_regs"] == r["regs"], f"{_where(r)}: ptxas -v rerun differs from Triton's cubin"


def test_default_configs_do_not_spill(rows):
    for r in rows:
        assert (r["spill_stores"], r["spill_loads"], r["local"]) == (0, 0, 0), \
            f"{_where(r)}: spill stores {r['spill_stores']} B, loads {r['spill_loads']} B, local {r['local']} B"


def test_tensor_cores_are_used(rows):
    for r in rows:
        assert r["mma_count"] >= 1, f"{_where(r)}: no tensor-core instruction in the SASS"
        # the x tile (fp16/bf16, rows of K contiguous elements) is loaded 128 bits at a time
        assert min(int(k.split(".")[1]) for k in r["loads_by_operand"]["x"]) == 128, _where(r)


def test_4bit_weight_tile_load_is_128bit_on_skinny_path(rows):
    skinny4 = [r for r in rows if r["bits"] == 4 and r["path"] == "skinny"]
    assert skinny4
    for r in skinny4:
        assert r["w_load_all_128"], f"{_where(r)}: weight-tile loads {r['loads_by_operand'].get('w')}"


def test_every_weight_tile_load_is_128bit(rows):
    # The N masks of the weight planes are written so that Triton's axis analysis sees them constant
    # over 128 columns; built as ``offs_w < N_PAD // PPW`` they capped these loads at 32 bits (2/3-bit)
    # and 64 bits (4-bit) in the sm_90 SASS.
    for r in rows:
        assert r["w_load_all_128"], f"{_where(r)}: weight-tile loads {r['loads_by_operand'].get('w')}"
        if r["bits"] == 3:      # 1-bit high plane: [BLOCK_K, BLOCK_N/32] words, 64-bit where a thread gets 2
            assert min(int(k.split(".")[1]) for k in r["loads_by_operand"]["qh"]) >= 64, _where(r)


def test_quick_json(tmp_path):
    out = tmp_path / "quick.json"
    proc = _run_tool("--quick", "--json", str(out))
    assert "limits for sm_90a: 227 KB shared memory per block" in proc.stdout
    data = json.loads(out.read_text())
    assert data["arch"] == 90 and data["triton"] and data["limits"]["shared"] == SM90_SHARED
    assert len(data["rows"]) >= 2
    for r in data["rows"]:
        assert r["ok"] and r["regs"] > 0 and r["shared"] > 0 and "flags" in r and r["loads_by_operand"]


def test_missing_triton_is_one_line_and_exit_2():
    code = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = ['compile_kernels.py', '--quick']; "
            f"runpy.run_path({str(TOOL)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=str(ROOT),
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no AOT toolchain: ")


def test_plane_loads_stay_128bit_when_the_row_stride_is_not_16_words(tmp_path):
    # N = 4224 = 33 x 128: the 2-bit plane's row stride is 264 words and the 3-bit high plane's 132,
    # neither a multiple of 16, so Triton gets no divisibility hint for them; the kernel restates
    # them as multiples of 4 words (N_PAD % 128 == 0), which keeps the rows 16-byte aligned.
    out = tmp_path / "rows.json"
    _run_tool("--arch", "90", "--configs", "default", "--shapes", "4224x4096", "--m", "1,64",
              "--branches", "tile", "--sym", "sym", "--bits", "2,3", "--dtype", "fp16",
              "--no-table", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["bits"], r["path"]) for r in rows} == {(b, p) for b in (2, 3) for p in ("skinny", "tiled")}
    for r in rows:
        assert r["ok"], f"{_where(r)}: {r['error']}"
        assert "stride_qw" not in r["specialization"]["divisible_by_16"], _where(r)
        assert r["w_load_all_128"], f"{_where(r)}: weight-tile loads {r['loads_by_operand'].get('w')}"
        if r["bits"] == 3:
            assert min(int(k.split(".")[1]) for k in r["loads_by_operand"]["qh"]) >= 64, _where(r)


def test_grouped_moe_launch_compiles(tmp_path):
    """The grouped (MoE) launch of ``triton_wna16.grouped_matmul`` (8 experts stacked, M = 1 and 64 rows per
    expert) compiles for sm_90a at every width and both half dtypes with the same code quality as the dense
    launch: no spills, 128-bit activation and weight-tile loads, tensor cores; the tile map, the expert ends
    and the expert strides are real arguments.  With per-expert act orders (``--perm``, activation columns
    gathered in the load) it compiles within the sm_90 limits; its tiled config spills a few bytes, which
    is recorded, not hidden (docs/KERNELS.md)."""
    out = tmp_path / "grouped.json"
    common = ["--arch", "90", "--configs", "default", "--shapes", "4096x4096", "--m", "1,64", "--branches", "tile",
              "--sym", "sym", "--bits", "2,3,4,8", "--dtype", "fp16,bf16", "--no-table", "--grouped", "8"]
    _run_tool(*common, "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["bits"], r["path"], r["dtype"]) for r in rows} == {
        (b, p, d) for b in (2, 3, 4, 8) for p in ("skinny", "tiled") for d in ("fp16", "bf16")}
    for r in rows:
        assert r["ok"] and r["grouped"] == 8 and not r["perm"], _where(r)
        spec = r["specialization"]
        assert {"tile_e_ptr", "tile_r_ptr", "ends_ptr"} <= set(spec["signature"]) - set(spec["constexpr_args"])
        assert "perm_ptr" in spec["constexpr_args"], _where(r)
        assert (r["spill_stores"], r["spill_loads"], r["local"]) == (0, 0, 0), _where(r)
        assert 0 < r["shared"] <= SM90_SHARED and 0 < r["regs"] <= SM90_REGS, _where(r)
        assert r["mma_count"] >= 1 and r["w_load_all_128"], _where(r)
        assert min(int(k.split(".")[1]) for k in r["loads_by_operand"]["x"]) == 128, _where(r)
    out = tmp_path / "grouped-perm.json"
    _run_tool(*common, "--perm", "--bits", "3,4", "--dtype", "bf16", "--json", str(out))
    for r in json.loads(out.read_text())["rows"]:
        assert r["ok"] and r["perm"] and "perm_ptr" not in r["specialization"]["constexpr_args"], _where(r)
        assert 0 < r["shared"] <= SM90_SHARED and 0 < r["regs"] <= SM90_REGS, _where(r)
