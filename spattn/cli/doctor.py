"""``spattn doctor [--selftest]``: what this machine has, and whether spattn is right on it.

The report (one screen): versions, the C++ extension, which attention backends are usable and which
``backend="auto"`` picks, the fused merges, the devices and, with several GPUs, the link topology
(``nvidia-smi topo -m``) with the mode the guide's best practices recommend for it.

``--selftest`` checks, with one PASS/FAIL line per item (exit code 1 on any FAIL):

* every usable backend on this device against an fp64 reference (``attention_ref``) and SDPA:
  forward, LSE, backward; causal and not; GQA; odd lengths and head_dim; fp32 + bf16 on CPU,
  fp32/fp16/bf16 on GPUs. Tolerance (flash-attention's rule): at most 2x SDPA's own error in the
  same dtype against fp64, plus a rounding floor.
* the fused merges registered in ``spattn.ops`` against ``merge_ref``;
* Ulysses, Ring and the hybrid on local ranks against the full-sequence reference (CPU: gloo ranks;
  GPUs: NCCL on 2 or 4 devices);
* on a GPU, each backend's TFLOP/s next to SDPA's.

It says what it could not check (e.g. Triton with no GPU).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selftest", action="store_true", help="check kernels, merges and SP modes on this machine")
    p.add_argument("--ranks", type=int, choices=[0, 2, 4], default=None,
                   help="local ranks for the Ulysses/Ring/hybrid check (default: 4 on CPU, 4 or 2 GPUs; 0 skips)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds allowed for the multi-rank check")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> Dict[str, str]:
    import torch

    import spattn

    cuda = torch.version.cuda or "none (CPU build)"
    return {"python": platform.python_version(), "torch": torch.__version__, "CUDA (torch build)": cuda,
            "triton": _version("triton"), "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "spattn": f"{_version('spattn')} ({os.path.dirname(os.path.abspath(spattn.__file__))})"}


def extension_status() -> str:
    from spattn import _ext

    mod, why = _ext._try_load()
    if mod is None:
        return f"not usable: {why} (Python ring engine and torch merge are used; build: {_ext.REBUILD_CMD})"
    cuda = "CUDA kernels compiled" if mod.cuda_compiled() else "CPU only (no CUDA kernels)"
    archs = ""
    if mod.cuda_compiled():
        archs = (f", archs not recorded in the build (setup.py default SPATTN_CUDA_ARCHS=80;90; this torch "
                 f"targets {' '.join(_torch_archs()) or 'unknown'})")
    return f"built (ABI {mod.ABI_VERSION}, sources {getattr(mod, 'SOURCE_HASH', '?')}), {cuda}{archs}"


def _torch_archs() -> List[str]:
    import torch

    try:
        return list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001 - a CPU build may raise or return nothing
        return []


def backend_status(device) -> Tuple[Dict[str, str], str]:
    """Per registered backend: 'usable' or why not, and what backend="auto" picks on ``device``."""
    from spattn import backends

    out = {}
    for name in backends.available_backends():
        try:
            be = backends._instance(name)
        except ImportError as e:
            out[name] = f"not usable ({e.name or e} not installed)"
            continue
        if not be.available(device):
            why = "needs a CUDA device" if name == "triton" else f"not available on {device.type}"
            out[name] = f"not usable ({why})"
        elif name == "triton" and device.type == "cpu":
            out[name] = "interpreter only (TRITON_INTERPRET=1): for tests, not a GPU check"
        else:
            out[name] = "usable"
    try:
        auto = backends.get_backend("auto", device).name
    except RuntimeError as e:
        auto = f"none ({e})"
    return out, auto


def triton_policy() -> str:
    from spattn import backends

    order = backends._AUTO_ORDER.get("cuda", ())
    verified = getattr(backends, "TRITON_GPU_VERIFIED", None)
    if order and order[0] == "triton":
        return f"auto on CUDA prefers triton (verified on a GPU: {verified or 'no record'})"
    return ("auto on CUDA prefers torch's fused kernels; triton is opt-in (backend=\"triton\") until its kernels "
            "pass `spattn doctor --selftest` on a real GPU" + (f" (verified: {verified})" if verified else
                                                               " (no GPU has run them yet)"))


def merge_status() -> Dict[str, str]:
    from spattn import ops

    out = {}
    from spattn import backends

    for name in ops.merge_impls():
        acc = dict(backends.MERGE_ORDER).get(name)
        auto = [d for d in ("cpu", "cuda") if acc is not None and _accepts(acc, d)]
        out[name] = ("always (fallback)" if name == "torch" else
                     f"auto on {', '.join(auto)}" if auto else "explicit only (impl=...)")
    return out


def _accepts(acc, device: str) -> bool:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return False
    try:
        return bool(acc(torch.empty(1, device=device)))
    except Exception:  # noqa: BLE001
        return False


def devices() -> List[str]:
    import torch

    lines = [f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if not torch.cuda.is_available():
        lines.append("cuda: no GPU visible" + ("" if torch.version.cuda else " (CPU build of torch)"))
        return lines
    for i in range(torch.cuda.device_count()):
        pr = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {pr.name}, sm_{pr.major}{pr.minor}, {pr.total_memory / 2**30:.0f} GiB, "
                     f"bf16 {'yes' if pr.major >= 8 else 'no'}")
    return lines


# ----------------------------------------------------------------------------------------------
# Link topology (nvidia-smi topo -m) and the guide's recommendation for it
# ----------------------------------------------------------------------------------------------


def parse_topo(text: str) -> List[List[str]]:
    """The GPU x GPU matrix of ``nvidia-smi topo -m`` ("X", "NV12", "PIX", "PXB", "PHB", "NODE", "SYS")."""
    gpu_rows = []
    for line in text.splitlines():
        toks = line.split()  # the header line is indented; GPU rows start at column 0
        if line.startswith("GPU") and toks[0][3:].isdigit():
            gpu_rows.append(toks[1:])
    n = len(gpu_rows)
    return [row[:n] for row in gpu_rows]


def _islands(matrix: Sequence[Sequence[str]]) -> List[List[int]]:
    """GPUs connected by NVLink (directly or through others), as sorted groups."""
    n = len(matrix)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in range(n):
        for j in range(n):
            if i != j and matrix[i][j].startswith("NV"):
                parent[find(i)] = find(j)
    groups: Dict[int, List[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def recommend_for_topology(matrix: Sequence[Sequence[str]]) -> str:
    """The guide's best practice for these links: NVLink -> Ulysses first; PCIe -> Ring, or a hybrid
    with Ulysses inside NVLink islands."""
    n = len(matrix)
    if n < 2:
        return "one GPU: no sequence parallelism across links"
    isl = _islands(matrix)
    if len(isl) == 1:
        return (f"NVLink between all {n} GPUs: Ulysses first (ulysses_degree={n}); "
                f"Ring or a hybrid only for sequences too long for Ulysses' memory")
    k = min(len(g) for g in isl)
    if k == 1:
        kinds = sorted({matrix[i][j] for i in range(n) for j in range(n) if i != j})
        return (f"PCIe only ({'/'.join(kinds)}): Ring (ring_degree={n}) hides its P2P transfers behind compute; "
                f"compare with `spattn plan --link pcie --link-gbps 25 --gpus {n}`")
    contiguous = all(g == list(range(g[0], g[0] + len(g))) for g in isl) and len({len(g) for g in isl}) == 1
    order = "" if contiguous else (f"; islands {isl} are not contiguous ranks: order CUDA_VISIBLE_DEVICES island by "
                                   f"island, since init_mesh puts Ulysses on contiguous ranks")
    return (f"NVLink islands {isl} joined by PCIe: hybrid with Ulysses inside an island "
            f"(ulysses_degree={k}, ring_degree={n // k}){order}")


def topology() -> List[str]:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return ["fewer than 2 GPUs: links not checked"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ["nvidia-smi not found: links not checked"]
    try:
        text = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"nvidia-smi topo -m failed ({e}): links not checked"]
    m = parse_topo(text)
    if len(m) < 2:
        return ["nvidia-smi topo -m printed no GPU matrix: links not checked"]
    lines = [f"GPU{i}: " + " ".join(f"{m[i][j]:>5}" for j in range(len(m))) for i in range(len(m))]
    return lines + ["recommended: " + recommend_for_topology(m)]


def report() -> None:
    import torch

    print("== versions ==")
    for k, v in versions().items():
        print(f"  {k:<20}{v}")
    print("== C++ extension (spattn._C) ==")
    print(f"  {extension_status()}")
    print("== attention backends ==")
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devs:
        status, auto = backend_status(dev)
        print(f"  {dev.type}: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
        print(f"  {dev.type}: backend=\"auto\" picks {auto}")
    print(f"  {triton_policy()}")
    print("== fused merges (spattn.ops.merge_) ==")
    print("  " + "; ".join(f"{k}: {v}" for k, v in merge_status().items()))
    print("== devices ==")
    for line in devices():
        print(f"  {line}")
    print("== links ==")
    for line in topology():
        print(f"  {line}")


# ----------------------------------------------------------------------------------------------
# Selftest
# ----------------------------------------------------------------------------------------------


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
# Rounding floor added to 2x SDPA's error (errors are max|diff| / max|reference|).
FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
LSE_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}


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


def _rel(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    return ((a - b).abs()[finite].max() / b.abs()[finite].max().clamp_min(1e-30)).item() if finite.any() else 0.0


def _sdpa(q, k, v, causal, scale):
    import torch.nn.functional as F

    hq, hkv = q.shape[2], k.shape[2]
    if hq != hkv:  # expand instead of enable_gqa: older torch versions lack it
        k, v = (x.repeat_interleave(hq // hkv, dim=2) for x in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, scale=scale)
    return o.transpose(1, 2)


def check_backend(be, device, dtype_name: str, case: AttnCase) -> Tuple[bool, str]:
    """One backend on one case: forward, LSE and backward against fp64, with SDPA's error as yardstick."""
    import torch

    from spattn.backends.reference import attention_ref

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    q = torch.randn(2, case.sq, case.hq, case.d, generator=g).to(device, dt)
    k, v = (torch.randn(2, case.sk, case.hkv, case.d, generator=g).to(device, dt) for _ in range(2))
    dout = torch.randn(2, case.sq, case.hq, case.d, generator=g).to(device, dt)
    scale = case.d ** -0.5
    # fp64 reference from the same (rounded) inputs
    r = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*r, causal=case.causal, scale=scale)
    ref_out.backward(dout.double())
    ref_g = [t.grad for t in r]
    # SDPA in the same dtype: the yardstick
    s = [t.clone().requires_grad_() for t in (q, k, v)]
    s_out = _sdpa(*s, case.causal, scale)
    s_out.backward(dout)
    sdpa_err = [_rel(s_out, ref_out)] + [_rel(t.grad, gr) for t, gr in zip(s, ref_g)]
    # the backend
    out, lse = be.forward(q, k, v, case.causal, scale)
    grads = be.backward(dout, q, k, v, out, lse, case.causal, scale)
    errs = [_rel(out, ref_out)] + [_rel(t, gr) for t, gr in zip(grads, ref_g)]
    lse_err = (lse.double() - ref_lse.double()).abs().max().item()
    tols = [2 * e + FLOOR[dtype_name] for e in sdpa_err]
    ok = all(e <= t for e, t in zip(errs, tols)) and lse_err <= LSE_TOL[dtype_name] and \
        lse.dtype == torch.float32 and tuple(lse.shape) == (2, case.hq, case.sq)
    names = ("out", "dq", "dk", "dv")
    detail = " ".join(f"{n} {e:.1e}/{t:.1e}" for n, e, t in zip(names, errs, tols)) + f" lse {lse_err:.1e}"
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

    dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    B, S, H, D = 1, 8192, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=dt, generator=g) for _ in range(4))
    fwd_flops = 4.0 * B * S * S * H * D
    scale = D ** -0.5

    def sdpa_fwd():
        return _sdpa(q, k, v, False, scale)

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_fb():
        _sdpa(qs, ks, vs, False, scale).backward(do)

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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, use_cuda: bool, modes, results) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    try:
        import spattn
        from spattn.backends.reference import attention_ref

        if use_cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=120))
        dev = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        out_rows = []
        for u, r, causal, layout in modes:
            mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
            g = torch.Generator().manual_seed(7)
            S, H, Hkv, D = 8 * world * 3 + 1, 4, 2, 16  # odd length: padded shards
            q = torch.randn(1, S, H, D, generator=g)
            k, v = (torch.randn(1, S, Hkv, D, generator=g) for _ in range(2))
            dout = torch.randn(1, S, H, D, generator=g)
            kw = dict(seq_len=S, layout=layout)
            ql, kl, vl = (spattn.shard(t.to(dev), mesh, **kw).requires_grad_() for t in (q, k, v))
            o = spattn.attention(ql, kl, vl, mesh, causal=causal, **kw)
            o.backward(spattn.shard(dout.to(dev), mesh, **kw))
            got = [spattn.gather(t.detach(), mesh, **kw).cpu() for t in (o, ql.grad, kl.grad, vl.grad)]
            if rank == 0:
                ref = [t.double().requires_grad_() for t in (q, k, v)]
                ro, _ = attention_ref(*ref, causal=causal)
                ro.backward(dout.double())
                errs = [_rel(a, b) for a, b in zip(got, [ro.detach()] + [t.grad for t in ref])]
                out_rows.append((u, r, causal, layout, errs))
        results.put((rank, "ok", out_rows))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report it to the parent, whatever it is
        results.put((rank, "error", traceback.format_exc()))


def check_distributed(res: Results, world: int, use_cuda: bool, timeout: float) -> None:
    modes = [(world, 1), (1, world)] + ([(2, world // 2)] if world == 4 else [])
    cases = [(u, r, c, lay) for u, r in modes for c, lay in ((False, "contiguous"), (True, "zigzag"))]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(i, world, port, use_cuda, cases, q), daemon=True)
             for i in range(world)]
    for p in procs:
        p.start()
    got: Dict[int, object] = {}
    errors: Dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(got) + len(errors) < world and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=max(0.1, min(5.0 if errors else 1e9, deadline - time.monotonic())))
        except queue.Empty:
            break
        (errors if status == "error" else got)[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    kind = f"{world} {'NCCL GPU' if use_cuda else 'gloo CPU'} ranks"
    if errors or 0 not in got:
        why = next(iter(errors.values()), f"no answer within {timeout:.0f}s")
        res.line(False, f"sequence parallel on {kind}", why.strip().splitlines()[-1])
        if errors:
            print(next(iter(errors.values())), file=sys.stderr)
        return
    tol = 1e-5 if not use_cuda else 1e-4  # fp32 (GPU fp32 attention: efficient-attention kernel)
    for u, r, causal, layout, errs in got[0]:
        mode = f"ulysses {u}" if r == 1 else f"ring {r}" if u == 1 else f"hybrid {u}x{r}"
        ok = max(errs) <= tol
        res.line(ok, f"{mode:<11} {kind}, fp32 {'causal ' + layout if causal else 'full'} S={8 * world * 3 + 1} GQA 4/2",
                 f"out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} (tol {tol:.0e} vs fp64)")


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


def run(args: argparse.Namespace) -> int:
    report()
    if args.selftest:
        print()
        return selftest(args)
    return 0
