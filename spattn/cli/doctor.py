"""``spattn doctor [--selftest]``: the command; the report, the topology advice and the selftest live in
doctor_report.py, topology.py and selftest.py.

The report (one screen): versions, the C++ extension, which attention backends are usable and which
``backend="auto"`` picks, the fused merges, the devices and, with several GPUs, the link topology
(``nvidia-smi topo -m``) with the mode the guide's best practices recommend for it.

``--selftest`` checks, with one PASS/FAIL line per item (exit code 1 on any FAIL):

* every usable backend on this device against an fp64 reference (``attention_ref``) and SDPA:
  forward, LSE, backward; causal and not; GQA; odd lengths and head_dim; fp32 + bf16 on CPU,
  fp32/fp16/bf16 on GPUs. Tolerance: the test suite's rule (``spattn.testing``): at most 2x SDPA's
  own error in the same dtype against fp64, plus a rounding floor.
* the fused merges registered in ``spattn.ops`` against ``merge_ref``;
* Ulysses, Ring and the hybrid on local ranks against the full-sequence reference (CPU: gloo ranks;
  GPUs: NCCL on 2 or 4 devices);
* on a GPU, each backend's TFLOP/s next to SDPA's.

It says what it could not check (e.g. Triton with no GPU).
"""
from __future__ import annotations

import argparse

from .doctor_report import report
from .selftest import selftest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selftest", action="store_true", help="check kernels, merges and SP modes on this machine")
    p.add_argument("--ranks", type=int, choices=[0, 2, 4], default=None,
                   help="local ranks for the Ulysses/Ring/hybrid check (default: 4 on CPU, 4 or 2 GPUs; 0 skips)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds allowed for the multi-rank check")


def run(args: argparse.Namespace) -> int:
    report()
    if args.selftest:
        print()
        return selftest(args)
    return 0
