"""Ahead-of-time compile every spattn Triton kernel at its shipped configs for sm_80 and sm_90 (no GPU
needed) and report registers, shared memory, local memory (spills) and, on sm_90, whether the dots were
lowered to wgmma (PTX) / HGMMA (SASS).

    python bench/kernel_report.py            # all shipped configs, table on stdout
    python bench/kernel_report.py --json     # rows as JSON (used by tests/test_kernel_report.py)
    python bench/kernel_report.py --head-dims 64 128 --dtypes fp16

Launch model compiled: contiguous (B, S, H, D) inputs with H * D % 16 == 0 (what Triton's JIT would
specialize: last-dim strides == 1, 16-byte aligned pointers and strides), causal, sequence lengths not
multiples of the tiles (all masking code present), backward writing into fp32 ring accumulators.

Needs Triton's real compiler, so it must run in a process without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled ahead of time
    del os.environ["TRITON_INTERPRET"]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# kernels/ is leaf code: load it straight from this checkout (no spattn import, no install needed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import flash_attn as fa, merge as mg  # noqa: E402

import torch  # noqa: E402

KINDS = ("fwd", "preprocess", "dkdv", "dq", "merge", "fwd_docs", "dkdv_docs", "dq_docs")
# *_window: the sliding-window specializations (HAS_WINDOW); opt-in (--kinds) until every bucket is checked.
WINDOW_KINDS = ("fwd_window", "dkdv_window", "dq_window")
# *_docs: the packed-document specializations (HAS_DOCS, per-token document ids) at the same tile configs.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SMEM_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes), A100 / H100
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _signature(fn, pointers: Dict[str, str], constexprs: Dict[str, object]):
    """Signature/attrs as Triton's JIT would specialize a contiguous launch."""
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_"):
            is_lse = name[7:].startswith(("l", "bl"))
            if name.endswith("d") and not is_lse or name in ("stride_ls", "stride_bls"):
                sig[name] = "constexpr"  # unit stride of the innermost dim: specialized to 1
                consts[name] = 1
            else:
                sig[name] = "i32"
                if not is_lse:  # H * D % 16 == 0
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, consts, attrs


def _tname(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def kernel_spec(kind: str, arch: int, head_dim: int, dtype: torch.dtype, cfg: Optional[fa.TileConfig] = None):
    """(jit fn, signature, constexprs, attrs, options, config string) of one kernel config: the shipped
    one unless ``cfg`` (fwd/dkdv/dq and their *_docs only) is given."""
    t = "*" + _tname(dtype)
    bd = fa.block_d_for(head_dim)
    prec = fa.dot_precision(dtype)
    docs, window = kind.endswith("_docs"), kind.endswith("_window")
    kind = kind.rsplit("_", 1)[0] if docs or window else kind
    if kind in ("fwd", "dkdv", "dq"):
        cfg = cfg or fa.tile_config(kind, arch, head_dim, dtype, docs, window)
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=True,
                  EVEN_M=False, EVEN_N=False, DOT_PREC=prec, HAS_KLENS=False, HAS_DOCS=docs, HAS_WINDOW=window)
        ids = dict(K_LENS="*i32", Q_DOC="*i32", K_DOC="*i32")
        if kind == "fwd":
            fn, ptrs = fa._flash_fwd_kernel, dict(Q=t, K=t, V=t, Out=t, LSE="*fp32", **ids)
        else:
            ce["ACCUMULATE"] = True
            ptrs = dict(Q=t, K=t, V=t, DO=t, LSE="*fp32", Delta="*fp32", DK="*fp32", DV="*fp32", DQ="*fp32",
                        **ids)
            fn = fa._flash_bwd_dkdv_kernel if kind == "dkdv" else fa._flash_bwd_dq_kernel
            ptrs = {k: v for k, v in ptrs.items() if k in fn.arg_names}
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        desc = f"M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    elif kind == "preprocess":
        fn, ptrs = fa._bwd_preprocess_kernel, dict(Out=t, DO=t, Delta="*fp32")
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=fa.preprocess_block_m(bd))
        opts = dict(num_warps=4, num_stages=1)
        desc = f"M{ce['BLOCK_M']} w4"
    elif kind == "merge":
        fn, ptrs = mg._merge_kernel, dict(Out="*fp32", LSE="*fp32", BlkOut=t, BlkLSE="*fp32")
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_S=mg.merge_block_s(bd))
        opts = dict(num_warps=mg.MERGE_NUM_WARPS, num_stages=1)
        desc = f"S{ce['BLOCK_S']} w{mg.MERGE_NUM_WARPS}"
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; choose from {KINDS}")
    sig, consts, attrs = _signature(fn, ptrs, ce)
    return fn, sig, consts, attrs, opts, desc


def _cache_path(cubin: bytes) -> str:
    """Where the cuobjdump facts of this cubin are kept: disassembling takes ~0.6 s per kernel (192 of
    them), while Triton's own cache makes the compile itself ~10 ms when nothing changed."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(triton.__version__.encode() + b"\0" + cubin).hexdigest()
    return os.path.join(base, "spattn", "kernel_report", key + ".json")


def _res_usage(cubin: bytes) -> Dict[str, int]:
    path = _cache_path(cubin)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    use = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", txt)}
    use["hgmma"] = "HGMMA" in sass
    use["spill_stl"] = len(re.findall(r"\bSTL(\.\w+)*\s", sass))  # stores to local memory: register spills
    try:  # written whole, then renamed: a concurrent reader never sees half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as tmp:
            json.dump(use, tmp)
        os.replace(tmp.name, path)
    except OSError:  # a read-only home: report without caching
        pass
    return use


def compile_one(job: Tuple) -> Dict[str, object]:
    """Compile one (kind, arch, head_dim, dtype[, cfg]) and return its report row (error text on failure)."""
    kind, arch, head_dim, dname = job[:4]
    row: Dict[str, object] = dict(kernel=kind, arch=f"sm_{arch}", head_dim=head_dim, dtype=dname)
    try:
        fn, sig, consts, attrs, opts, desc = kernel_spec(kind, arch, head_dim, DTYPES[dname], *job[4:])
        row["config"] = desc
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        use = _res_usage(k.asm["cubin"])
        row.update(registers=use.get("reg", -1), shared=k.metadata.shared, local=use.get("local", -1),
                   stack=use.get("stack", -1), spills=use["spill_stl"],
                   wgmma=("wgmma" in k.asm["ptx"]) if arch >= 90 else None,
                   hgmma=use["hgmma"] if arch >= 90 else None, fits_smem=k.metadata.shared <= SMEM_LIMIT[arch],
                   error=None)
    except Exception as e:  # reported as a row; the test fails on it
        row.setdefault("config", "?")
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return row


def report_rows(kinds=KINDS, archs=fa.ARCHS, head_dims=fa.HEAD_DIM_BUCKETS, dtypes=tuple(DTYPES),
                workers: Optional[int] = None) -> List[Dict[str, object]]:
    """Compile every requested shipped config; one dict per (kernel, arch, head_dim, dtype).

    bf16 shares the fp16 tile table but is compiled separately (its mma instructions differ).
    """
    if not isinstance(fa._flash_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernel_report: kernels were loaded under TRITON_INTERPRET=1; run it in a "
                           "separate process without that variable")
    jobs = [(k, a, d, t) for k in kinds for a in archs for d in head_dims for t in dtypes]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [compile_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as ex:
        return list(ex.map(compile_one, jobs))


def format_table(rows: List[Dict[str, object]]) -> str:
    cols = ("kernel", "arch", "dtype", "head_dim", "config", "registers", "shared", "local", "stack", "spills",
            "wgmma", "hgmma", "fits_smem", "error")
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(x.ljust(w) for x, w in zip(cell, widths)).rstrip() for cell in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS + WINDOW_KINDS)
    p.add_argument("--archs", nargs="+", type=int, default=list(fa.ARCHS), choices=fa.ARCHS)
    p.add_argument("--head-dims", nargs="+", type=int, default=list(fa.HEAD_DIM_BUCKETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = p.parse_args(argv)
    rows = report_rows(a.kinds, a.archs, a.head_dims, a.dtypes, a.workers)
    print(json.dumps(rows) if a.json else format_table(rows))
    bad = [r for r in rows if r["error"] or r["local"] or r["stack"] or r["spills"] or not r["fits_smem"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
