"""`spattn doctor [--selftest]`: the report's sections, the selftest on this CPU (the test suite's
tolerance rule, the shared launcher), topology advice."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from spattn import backends
from spattn.backends.reference import ReferenceBackend
from spattn.cli import doctor_report, selftest, topology
from spattn.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_sections(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for section in ("== versions ==", "== C++ extension (spattn._C) ==", "== attention backends ==",
                    "== fused merges", "== devices ==", "== links =="):
        assert section in out
    for name in ("python", "torch", "triton", "diffusers", "transformers"):
        assert f"  {name} " in out
    assert f'cpu: backend="auto" picks {backends.get_backend("auto", torch.device("cpu")).name}' in out
    assert "triton is opt-in" in out


def test_missing_package_says_not_installed():
    assert doctor_report._version("surely-not-a-package-spattn") == "not installed"


def test_auto_on_cuda_prefers_torch_until_triton_is_verified():
    # No GPU here can check Triton, so auto must not pick it on CUDA.
    assert backends._AUTO_ORDER["cuda"][0] == "torch"
    assert "triton" not in backends._AUTO_ORDER["cuda"]
    assert backends.TRITON_GPU_VERIFIED is None
    assert "opt-in" in doctor_report.triton_policy()


def test_selftest_on_cpu_passes():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "spattn", "doctor", "--selftest"], cwd=ROOT, env=env,
                          capture_output=True, text=True,
                          timeout=float(os.environ.get("SPATTN_TEST_TIMEOUT", "600")))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    passes = [ln for ln in lines if ln.startswith("PASS")]
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    # backends x {fp32, bf16} x cases, merges, and the three SP modes
    assert sum(" torch     cpu " in ln for ln in passes) == 2 * len(selftest.ATTN_CASES)
    assert any(ln.startswith("PASS  merge torch") for ln in passes)
    for mode in ("ulysses", "ring", "hybrid 2x2"):
        assert any(ln.startswith(f"PASS  {mode}") for ln in passes), mode
    assert "triton kernels: not checked (no GPU" in out
    assert "TFLOP/s vs SDPA: not checked (no GPU)" in out
    assert "selftest: " in lines[-1] and " 0 FAIL" in lines[-1]


class _WrongBackend(ReferenceBackend):
    """Returns a slightly wrong output: the selftest must catch it and exit nonzero."""

    name = "wrong"

    def forward(self, q, k, v, causal, scale):
        out, lse = super().forward(q, k, v, causal, scale)
        return out * 1.01, lse


def test_selftest_fails_on_a_wrong_backend(capsys):
    backends.register_backend("wrong", _WrongBackend)
    try:
        rc = main(["doctor", "--selftest", "--ranks", "0"])
    finally:
        backends._REGISTRY.pop("wrong")
        backends._INSTANCES.pop("wrong", None)
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  wrong" in out and "PASS  torch" in out


NV8 = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity
GPU0\t X \tNV18\tNV18\tNV18\tPXB\t0-47\t0
GPU1\tNV18\t X \tNV18\tNV18\tPXB\t0-47\t0
GPU2\tNV18\tNV18\t X \tNV18\tSYS\t48-95\t1
GPU3\tNV18\tNV18\tNV18\t X \tSYS\t48-95\t1
NIC0\tPXB\tPXB\tSYS\tSYS\t X

Legend:
  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""

ISLANDS = """\
\tGPU0\tGPU1\tGPU2\tGPU3
GPU0\t X \tNV4\tSYS\tSYS
GPU1\tNV4\t X \tSYS\tSYS
GPU2\tSYS\tSYS\t X \tNV4
GPU3\tSYS\tSYS\tNV4\t X
"""

PCIE = """\
\tGPU0\tGPU1\tCPU Affinity
GPU0\t X \tPHB\t0-31
GPU1\tPHB\t X \t0-31
"""


def test_topology_parsing_and_advice():
    m = topology.parse_topo(NV8)
    assert len(m) == 4 and m[0] == ["X", "NV18", "NV18", "NV18"]
    assert "Ulysses first (ulysses_degree=4)" in topology.recommend_for_topology(m)
    adv = topology.recommend_for_topology(topology.parse_topo(ISLANDS))
    assert "hybrid with Ulysses inside an island (ulysses_degree=2, ring_degree=2)" in adv
    assert "not contiguous" not in adv
    shuffled = [[r[i] for i in (0, 2, 1, 3)] for r in (topology.parse_topo(ISLANDS)[j] for j in (0, 2, 1, 3))]
    assert "not contiguous" in topology.recommend_for_topology(shuffled)
    pcie = topology.recommend_for_topology(topology.parse_topo(PCIE))
    assert pcie.startswith("PCIe only (PHB): Ring (ring_degree=2)")
