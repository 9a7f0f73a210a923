"""Every shipped Triton tile config compiles ahead of time for sm_80 and sm_90 without spills.

Runs bench/kernel_report.py in a subprocess without TRITON_INTERPRET (the interpreter replaces the
kernels, so they cannot be compiled in this test process). No GPU is needed: Triton's CUDA backend
compiles to PTX and cubin with the ptxas it ships.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "kernel_report.py")
_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
@triton.jit
def k(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))
src = triton.compiler.ASTSource(fn=k, signature={"X": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 16})
triton.compile(src, target=GPUTarget("cuda", 80, 32))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    return env


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    probe_file = tmp_path_factory.mktemp("probe") / "probe.py"  # @jit needs its source in a file
    probe_file.write_text(_PROBE)
    probe = subprocess.run([sys.executable, str(probe_file)], env=_env(), capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"Triton's CUDA backend cannot compile ahead of time on this machine: {last}")
    res = subprocess.run([sys.executable, SCRIPT, "--json"], env=_env(), capture_output=True, text=True,
                         timeout=1500, cwd=ROOT)
    lines = res.stdout.strip().splitlines()
    assert lines, f"kernel_report printed nothing (rc {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_every_shipped_config_is_reported(rows):
    from spattn.kernels import flash_attn as fa  # only its tables are used here

    got = {(r["kernel"], r["arch"], r["head_dim"], r["dtype"]) for r in rows}
    kinds = ("fwd", "preprocess", "dkdv", "dq", "merge", "fwd_docs", "dkdv_docs", "dq_docs")  # *_docs: HAS_DOCS
    want = {(k, f"sm_{a}", d, t) for k in kinds for a in fa.ARCHS
            for d in fa.HEAD_DIM_BUCKETS for t in ("fp16", "bf16", "fp32")}
    assert want <= got, f"missing: {sorted(want - got)[:10]}"


def test_configs_compile_without_spills_and_fit_shared_memory(rows):
    bad = [r for r in rows if r["error"] or r["local"] != 0 or r["stack"] != 0 or r["spills"] != 0
           or not r["fits_smem"]]
    assert not bad, "bad kernel configs:\n" + "\n".join(json.dumps(r) for r in bad)


def test_sm90_forward_uses_wgmma(rows):
    fwd = [r for r in rows if r["kernel"] == "fwd" and r["arch"] == "sm_90" and r["dtype"] != "fp32"]
    assert fwd and all(r["wgmma"] and r["hgmma"] for r in fwd), [r for r in fwd if not r["wgmma"]]
