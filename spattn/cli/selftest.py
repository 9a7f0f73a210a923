"""``spattn doctor --selftest``: backends, merges and the sequence-parallel modes checked on this
machine, one PASS/FAIL line each, with the tolerance rule the test suite uses (spattn.testing).
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .costmodel import mode_name


@dataclass(frozen=True)
class AttnCase:
    name: str
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    causal: bool


ATTN_CASES = (
    AttnCase("S=128", 128, 128, 4, 4, 64, False),
    AttnCase("S=128 causal", 128, 128, 4, 4, 64, True),
    AttnCase("GQA 8q/2kv causal", 128, 128, 8, 2, 64, True),
    AttnCase("odd q97/k131 d80", 97, 131, 4, 4, 80, False),
    AttnCase("odd S=97 causal d80", 97, 97, 4, 2, 80, True),
)


class Results:
    def __init__(self) -> None:
        self.passed = self.failed = self.skipped = 0

    def line(self, ok: bool, item: str, detail: str = "") -> None:
        self.passed += ok
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {item}" + (f": {detail}" if detail else ""), flush=True)

    def not_checked(self, item: str, why: str) -> None:
        self.skipped += 1
        print(f"----  {item}: not checked ({why})", flush=True)



def check_backend(be, device, dtype_name: str, case: AttnCase) -> Tuple[bool, str]:
    """One backend on one case: forward, LSE and backward against fp64, with SDPA's error in the same
    dtype as the yardstick (``spattn.testing.tolerance``, the test suite's rule)."""
    import torch

    from spattn.testing import DTYPES, error_table, references, tolerance, tolerance_misses

    dt = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    q = torch.randn(2, case.sq, case.hq, case.d, generator=g).to(device, dt)
    k, v = (torch.randn(2, case.sk, case.hkv, case.d, generator=g).to(device, dt) for _ in range(2))
    dout = torch.randn(2, case.sq, case.hq, case.d, generator=g).to(device, dt)
    scale = case.d ** -0.5
    ref, base = references(q, k, v, dout, case.causal, scale)  # fp64, and SDPA from the same inputs
    out, lse = be.forward(q, k, v, case.causal, scale)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, case.causal, scale)
    res = error_table({"out": out, "dq": dq, "dk": dk, "dv": dv, "lse": lse}, ref, base)
    ok = not tolerance_misses(res, dtype_name) and lse.dtype == torch.float32 and \
        tuple(lse.shape) == (2, case.hq, case.sq)
    detail = " ".join(f"{n} {e:.1e}/{tolerance(dtype_name, b, m, lse=n == 'lse'):.1e}"
                      for n, (e, b, m) in res.items())
    return ok, detail + " (err/tol vs fp64)"


def check_merge(impl: str, device, blk_dtype) -> Tuple[bool, str]:
    """A fused merge against merge_ref: into a strided slice (as the ring does), with -inf rows."""
    import torch

    from spattn import ops

    g = torch.Generator().manual_seed(1)
    B, S, H, D = 2, 67, 3, 80
    full_out = torch.randn(B, S + 8, H, D, generator=g).to(device)
    full_lse = torch.randn(B, H, S + 8, generator=g).to(device)
    out, lse = full_out[:, 4:4 + S], full_lse[:, :, 4:4 + S]  # strided views
    blk = torch.randn(B, S, H, D, generator=g).to(device, blk_dtype)
    blk_lse = torch.randn(B, H, S, generator=g).to(device)
    lse[:, :, :5] = float("-inf")          # rows that have seen nothing yet
    blk_lse[:, :, 3:9] = float("-inf")     # rows this block does not reach (3, 4: both -inf)
    want_out, want_lse = ops.merge_ref(out.clone(), lse.clone(), blk, blk_lse)
    ops.merge_(out, lse, blk, blk_lse, impl=impl)
    e_out = (out - want_out).abs().max().item()
    same_inf = torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    e_lse = (lse[fin] - want_lse[fin]).abs().max().item()
    ok = e_out <= 1e-5 and e_lse <= 1e-5 and same_inf and not torch.isnan(out).any().item()
    return ok, f"out {e_out:.1e} lse {e_lse:.1e} (tol 1e-5), -inf rows {'kept' if same_inf else 'WRONG'}"


def _merges_for(device) -> List[str]:
    import torch

    from spattn import ops

    if device.type == "cuda":
        try:  # registers the Triton merge for CUDA tensors
            import spattn.backends.triton_backend  # noqa: F401
        except ImportError:
            pass
    names = ["torch"]
    for name in ops.merge_impls():
        if name == "cpp" and device.type == "cpu":
            names.append(name)
        elif name in ("triton", "cuda") and device.type == "cuda" and torch.cuda.is_available():
            names.append(name)
    return names


def _tflops(fn, flops: float, reps: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return flops * reps / (start.elapsed_time(end) * 1e-3) / 1e12


def perf_lines(names: Sequence[str]) -> None:
    """TFLOP/s of each backend's forward and forward+backward next to SDPA's (bf16 or fp16)."""
    import torch

    from spattn import backends
    from spattn.testing import sdpa

    dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    B, S, H, D = 1, 8192, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=dt, generator=g) for _ in range(4))
    fwd_flops = 4.0 * B * S * S * H * D
    scale = D ** -0.5

    def sdpa_fwd():
        return sdpa(q, k, v, False, scale)

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_fb():
        sdpa(qs, ks, vs, False, scale).backward(do)

    base_f, base_fb = _tflops(sdpa_fwd, fwd_flops), _tflops(sdpa_fb, 3.5 * fwd_flops)
    for name in names:
        if name == "reference":
            continue
        be = backends._instance(name)

        def fwd():
            return be.forward(q, k, v, False, scale)

        def fb():
            o, l = be.forward(q, k, v, False, scale)
            be.backward(do, q, k, v, o, l, False, scale)

        f, fb_ = _tflops(fwd, fwd_flops), _tflops(fb, 3.5 * fwd_flops)
        print(f"perf  {name:<9} cuda {str(dt)[6:]} B={B} S={S} H={H} D={D}: fwd {f:.0f} TFLOP/s (SDPA {base_f:.0f}), "
              f"fwd+bwd {fb_:.0f} TFLOP/s (SDPA {base_fb:.0f})", flush=True)



# --- multi-rank check -------------------------------------------------------------------------

def _sp_seq(world: int) -> int:
    return 8 * world * 3 + 1  # odd length: padded shards


def _dist_worker(rank: int, world: int, init_method: str, use_cuda: bool, cases) -> Optional[list]:
    """Every (ulysses, ring, causal, layout) case on this rank; rank 0 returns their error tables."""
    import torch
    import torch.distributed as dist

    import spattn
    from spattn.launch import init_rank
    from spattn.testing import error_table, gather_checked, references

    dev = init_rank(rank, world, init_method, backend="nccl" if use_cuda else "gloo", timeout_s=120)
    rows = []
    for u, r, causal, layout in cases:
        mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
        g = torch.Generator().manual_seed(7)
        S, H, Hkv, D = _sp_seq(world), 4, 2, 16
        q = torch.randn(1, S, H, D, generator=g).to(dev)
        k, v = (torch.randn(1, S, Hkv, D, generator=g).to(dev) for _ in range(2))
        dout = torch.randn(1, S, H, D, generator=g).to(dev)
        kw = dict(seq_len=S, layout=layout)
        ql, kl, vl = (spattn.shard(t, mesh, **kw).requires_grad_() for t in (q, k, v))
        o, lse = spattn.attention(ql, kl, vl, mesh, causal=causal, return_lse=True, **kw)
        o.backward(spattn.shard(dout, mesh, **kw))
        got = gather_checked(mesh, S, kw, o, lse, ql.grad, kl.grad, vl.grad)  # padded rows: zero, -inf
        if rank == 0:
            ref, base = references(q, k, v, dout, causal)
            rows.append((u, r, causal, layout, error_table(got, ref, base)))
    dist.destroy_process_group()
    return rows if rank == 0 else None


def check_distributed(res: Results, world: int, use_cuda: bool, timeout: float) -> None:
    """Ulysses, Ring (and with 4 ranks the hybrid) on local ranks against the fp64 full-sequence
    reference, fp32, under the test suite's tolerance rule."""
    from spattn.cli.costmodel import factorizations
    from spattn.launch import LocalRanks, RankFailed
    from spattn.testing import tolerance_misses

    modes = [m for m in factorizations(world, exact=True) if m[0] == world or m[1] == world or m == (2, 2)]
    cases = [(u, r, c, lay) for u, r in modes for c, lay in ((False, "contiguous"), (True, "zigzag"))]
    kind = f"{world} {'NCCL GPU' if use_cuda else 'gloo CPU'} ranks"
    try:
        with LocalRanks(_dist_worker, world, args=(use_cuda, cases)) as ranks:
            rows = ranks.wait(timeout=timeout)
    except (RankFailed, TimeoutError) as e:
        res.line(False, f"sequence parallel on {kind}", str(e).strip().splitlines()[-1])
        print(e, file=sys.stderr)
        return
    for u, r, causal, layout, errs in rows:
        bad = tolerance_misses(errs, "fp32")
        what = "causal " + layout if causal else "full"
        detail = " ".join(f"{n} {errs[n][0]:.1e}" for n in ("out", "dq", "dk", "dv", "lse")) + " (fp32 rule vs fp64)"
        res.line(not bad, f"{mode_name(u, r):<11} {kind}, fp32 {what} S={_sp_seq(world)} GQA 4/2",
                 "; ".join(bad) if bad else detail)


def selftest(args: argparse.Namespace) -> int:
    import torch

    from spattn import backends

    t0 = time.monotonic()
    res = Results()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    print(f"== selftest on {torch.cuda.get_device_name(0) if cuda else 'CPU'} ==", flush=True)
    dtypes = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) if cuda else ["fp32", "bf16"]
    usable = []
    for name in backends.available_backends():
        if name == "triton" and not cuda:
            res.not_checked("triton kernels", "no GPU; the test suite runs them in Triton's interpreter")
            continue
        try:
            be = backends._instance(name)
        except ImportError as e:
            res.not_checked(f"{name} backend", f"{e.name or e} not installed")
            continue
        if not be.available(dev):
            res.not_checked(f"{name} backend", f"not available on {dev.type}")
            continue
        usable.append(name)
        for dt in dtypes:
            for case in ATTN_CASES:
                try:
                    ok, detail = check_backend(be, dev, dt, case)
                except Exception as e:  # noqa: BLE001 - a crash is a FAIL of this item, not of the selftest
                    ok, detail = False, f"{type(e).__name__}: {e}"
                res.line(ok, f"{name:<9} {dev.type} {dt} {case.name}", detail)
    if not cuda:
        res.not_checked("fp16 on CPU", "CPU kernels are checked in fp32 and bf16")
    for impl in _merges_for(dev):
        for bdt in (torch.float32, torch.bfloat16):
            try:
                ok, detail = check_merge(impl, dev, bdt)
            except Exception as e:  # noqa: BLE001
                ok, detail = False, f"{type(e).__name__}: {e}"
            res.line(ok, f"merge {impl:<6} {dev.type} fp32 out + {str(bdt)[6:]} block", detail)
    if not cuda:
        res.not_checked("CUDA merges (triton, _C cuda)", "no GPU")
    ngpu = torch.cuda.device_count() if cuda else 0
    if args.ranks == 0:
        res.not_checked("sequence parallel (Ulysses, Ring, hybrid)", "--ranks 0")
    elif cuda and ngpu < 2:
        res.not_checked("sequence parallel on GPUs (Ulysses, Ring, hybrid)", "needs 2 GPUs; one is visible")
    else:
        world = args.ranks or (4 if not cuda or ngpu >= 4 else 2)
        if cuda and world > ngpu:
            world = 2
        check_distributed(res, world, cuda, args.timeout)
        if world < 4:
            res.not_checked("hybrid ulysses x ring", f"needs 4 ranks, ran {world}")
    if cuda:
        try:
            perf_lines(usable)
        except Exception as e:  # noqa: BLE001
            res.line(False, "perf", f"{type(e).__name__}: {e}")
    else:
        res.not_checked("TFLOP/s vs SDPA", "no GPU")
    if cuda and "triton" in usable:
        tri_ok = res.failed == 0
        print(f"note: triton {'passed' if tri_ok else 'did not pass'} on this GPU; "
              + ("to let backend='auto' prefer it, record the GPU, versions and figures in the README and "
                 "TRITON_GPU_VERIFIED, and put 'triton' first in _AUTO_ORDER['cuda'] (spattn/backends/__init__.py)"
                 if tri_ok else "auto keeps using torch's kernels"))
    print(f"selftest: {res.passed} PASS, {res.failed} FAIL, {res.skipped} not checked "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    return 1 if res.failed else 0
