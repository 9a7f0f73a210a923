"""Flash attention that returns the log-sum-exp: forward, backward (preprocess, dK/dV, dQ), launchers.

Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), any strides; query head h reads kv head h // (Hq // Hkv)
(GQA/MQA without repeating K/V). LSE: (B, Hq, Sq) fp32, natural log, -inf for a row that sees no key
(its output row is 0). Causal mask with global positions: key j is visible to query i iff
``k_offset + j <= q_offset + i``, so a ring can hand over blocks that come from different ranks.
Optional per-batch key lengths ``k_lens`` (int32 (B,), a right-padded text mask): keys j >= k_lens[b]
are masked inside the tile, whole key tiles past it are skipped, and their dK/dV are exactly 0.
Optional packed documents ``q_doc`` (Sq,) / ``k_doc`` (Sk,) int32 ids, non-decreasing (documents are
contiguous), shared by every batch element: query i sees key j only if ``q_doc[i] == k_doc[j]`` (and the
causal rule). A tile's documents are [doc[first], doc[last]], so a (query tile, key tile) pair whose ranges
do not overlap is skipped without loading K/V; inside a tile the ids are compared per pair.
Optional sliding window ``window=(left, right)`` (flash-attn's convention, -1 = unbounded) over the same
global positions: key j is visible to query i only if ``qpos - kpos <= left`` and ``kpos - qpos <= right``
(qpos = q_offset + i, kpos = k_offset + j). Key tiles wholly outside a query tile's window are never
loaded (and query tiles outside a key tile's window in dK/dV); tiles it cuts are masked per pair.

Inside the kernels scores are kept in base 2 (exp2 is one instruction); the LSE is converted to the
natural log at the kernel boundary. Accumulation is fp32 for every input dtype.

Leaf code: imports nothing from spattn.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log scores -> base 2
LN2 = tl.constexpr(0.6931471805599453)    # ln(2): base-2 LSE -> natural log


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks only what can be out of range (padded head_dim, tail rows)."""
    if EVEN_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, val, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Store (or add into, for ring accumulators) a (rows, BLOCK_D) fp32 tile in the buffer's dtype."""
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    if ACCUMULATE:
        val += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _load_lse2(LSE, rows, n_rows, stride_ls, EVEN_ROWS: tl.constexpr):
    """Row LSE in base 2. A row that saw no key (-inf) becomes +inf so its probabilities are 0, not NaN;
    rows past the end read +inf for the same reason."""
    if EVEN_ROWS:
        lse = tl.load(LSE + rows * stride_ls)
    else:
        lse = tl.load(LSE + rows * stride_ls, mask=rows < n_rows, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _key_range(start_m, seqlen_k, causal_shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr):
    """Key range of query tile ``start_m``: keys [0, full_hi) need no mask (whole BLOCK_N tiles every row
    sees), [full_hi, hi) need the bounds/causal mask, keys >= hi are invisible to every row.
    Key j is visible to query i iff j <= i + causal_shift (global positions k_offset + j <= q_offset + i)."""
    if IS_CAUSAL:
        # Past the last row's diagonal nothing is visible; up to the first row's diagonal everything is.
        hi = tl.minimum(seqlen_k, tl.maximum(start_m * BLOCK_M + BLOCK_M + causal_shift, 0))
        full_hi = tl.minimum(hi, tl.maximum(start_m * BLOCK_M + causal_shift + 1, 0)) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _lower_bound(DOC, n, target):
    """First index i in [0, n] with DOC[i] >= target (DOC non-decreasing): a scalar binary search."""
    lo = tl.full([], 0, tl.int32)
    hi = lo + n  # a tensor even when n is specialized to a constant
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(DOC + mid) < target
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _doc_span(DOC, n, OTHER, start, end):
    """Rows [lo, hi) of DOC (length n) whose documents overlap those of OTHER's rows [start, end),
    start < end. Ids are non-decreasing, so OTHER's first and last rows bound its documents and the
    overlapping rows are one contiguous range: tiles outside it share no document and are skipped."""
    return _lower_bound(DOC, n, tl.load(OTHER + start)), _lower_bound(DOC, n, tl.load(OTHER + end - 1) + 1)


@triton.jit
def _query_docs(Q_DOC, K_DOC, start_m, offs_m, seqlen_q, seqlen_k, full_hi, hi,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Per-row documents of a query tile (-1 past the end; 0 without docs) and its key loops narrowed
    to the keys sharing a document with it: unmasked [lo, full_hi), masked [full_hi, hi)."""
    lo = 0
    if HAS_DOCS:
        q_doc = tl.load(Q_DOC + offs_m, mask=offs_m < seqlen_q, other=-1)
        k_lo, k_hi = _doc_span(K_DOC, seqlen_k, Q_DOC, start_m * BLOCK_M,
                               tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q))
        lo = k_lo // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, k_hi)
        # Unmasked tiles stay inside the original [0, full_hi) (in bounds, causally visible to every row).
        full_hi = tl.maximum(lo, tl.minimum(full_hi, (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N))
    else:
        q_doc = 0
    return q_doc, lo, full_hi, hi


@triton.jit
def _window_keys(start_m, lo, full_hi, hi, causal_shift, win_left, win_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """A query tile's key loops narrowed to its window: masked [lo, mid), unmasked [mid, full_hi),
    masked [full_hi, hi). Without a window mid = lo (the first masked range is empty)."""
    mid = lo
    if HAS_WINDOW:
        first = start_m * BLOCK_M + causal_shift  # key index at the first row's own position
        last = first + BLOCK_M - 1
        # Keys [first - left, last + right] are seen by some row; [last - left, first + right] by every row.
        hi = tl.minimum(hi, tl.maximum(last + win_right + 1, 0))
        lo = tl.maximum(lo, tl.maximum(first - win_left, 0) // BLOCK_N * BLOCK_N)
        hi = tl.maximum(hi, lo)  # a window past the block: every loop empty
        full_lo = (tl.maximum(last - win_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_end = tl.maximum(first + win_right + 1, 0) // BLOCK_N * BLOCK_N
        mid = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.maximum(tl.minimum(full_hi, full_end), mid)
    return lo, mid, full_hi, hi


@triton.jit
def _window_keep(keep, offs_m, offs_n, causal_shift, win_left, win_right):
    """keep & (query offs_m[i] sees key offs_n[j] under the window); positions differ by causal_shift."""
    dist = offs_m[:, None] + causal_shift - offs_n[None, :]  # qpos - kpos
    return keep & (dist <= win_left) & (dist >= -win_right)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
               offs_m, offs_d, lo, hi, seqlen_k, causal_shift, qk_scale, K_DOC, q_doc, win_left, win_right,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
               HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED=False is the fast path for blocks every row of
    the query tile fully sees (no bounds, causal or window mask); MASKED=True handles the diagonal, the
    window's edges and the tail. HAS_DOCS: pairs whose documents (q_doc per row, K_DOC per key) differ
    are masked in both paths."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, offs_n, seqlen_k,
                       offs_d, HEAD_DIM, BLOCK_D, EVEN_N or not MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < seqlen_k
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_WINDOW:
                keep = _window_keep(keep, offs_m, offs_n, causal_shift, win_left, win_right)
            s = tl.where(keep, s, float("-inf"))
        if HAS_DOCS:
            k_doc = tl.load(K_DOC + offs_n, mask=offs_n < seqlen_k, other=-2)
            s = tl.where(q_doc[:, None] == k_doc[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, offs_n, seqlen_k,
                       offs_d, HEAD_DIM, BLOCK_D, EVEN_N or not MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    heads_q, group, seqlen_q, seqlen_k, q_offset, k_offset, sm_scale, K_LENS, Q_DOC, K_DOC, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KLENS: tl.constexpr = False, HAS_DOCS: tl.constexpr = False, HAS_WINDOW: tl.constexpr = False,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq): one query tile of one head, all its visible keys."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads head_dim to a power of two")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles >= 16")
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_q).to(tl.int64)  # int64: batch strides times batch index can pass 2**31
    h = bh % heads_q
    kvh = h // group
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    Out += b * stride_ob + h * stride_oh
    LSE += b * stride_lb + h * stride_lh
    if HAS_KLENS:  # keys past this batch element's length are padding: as if the block ended there
        seqlen_k = tl.minimum(seqlen_k, tl.load(K_LENS + b))

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    causal_shift = q_offset - k_offset
    full_hi, hi = _key_range(start_m, seqlen_k, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)
    # (Before the tile loads: the document search then holds no tile registers.)
    q_doc, lo, full_hi, hi = _query_docs(Q_DOC, K_DOC, start_m, offs_m, seqlen_q, seqlen_k, full_hi, hi,
                                         BLOCK_M, BLOCK_N, HAS_DOCS)
    lo, mid, full_hi, hi = _window_keys(start_m, lo, full_hi, hi, causal_shift, win_left, win_right,
                                        BLOCK_M, BLOCK_N, HAS_WINDOW)
    q = _load_rows(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, offs_m, seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_WINDOW:  # the window's left edge: keys some rows of the tile no longer see
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                                   offs_m, offs_d, lo, mid, seqlen_k, causal_shift, qk_scale,
                                   K_DOC, q_doc, win_left, win_right,
                                   HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS,
                                   HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, mid, full_hi, seqlen_k, causal_shift, qk_scale,
                               K_DOC, q_doc, win_left, win_right,
                               HEAD_DIM, BLOCK_N, BLOCK_D, False, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS,
                               HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, full_hi, hi, seqlen_k, causal_shift, qk_scale,
                               K_DOC, q_doc, win_left, win_right,
                               HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS,
                               HAS_WINDOW)

    # Rows that saw no key: l = 0, acc = 0 -> out 0, lse -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    _store_rows(Out + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out, offs_m, seqlen_q,
                offs_d, HEAD_DIM, False)
    tl.store(LSE + offs_m * stride_ls, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------
# backward preprocess: delta = rowsum(dout * out)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    heads_q, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). Delta is contiguous (B, Hq, Sq) fp32."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_q).to(tl.int64)
    h = bh % heads_q
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                   offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, False)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :] * stride_dod, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------
# backward dK/dV: one key tile of one kv head, looping over its query group and all query tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_qs, stride_qd, stride_dos, stride_dod, stride_ls,
                    offs_n, offs_d, lo, hi, seqlen_q, causal_shift, qk_scale, k_len,
                    Q_DOC, K_DOC, seqlen_k, win_left, win_right,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    MASKED: tl.constexpr, EVEN_M: tl.constexpr, DOT_PREC: tl.constexpr,
                    HAS_KLENS: tl.constexpr, HAS_DOCS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key tile over query tiles [lo, hi). Works on the
    transposed scores (keys x queries) so the key tile stays in registers. MASKED: apply the causal
    and window masks. HAS_DOCS: pairs whose documents (Q_DOC per query, K_DOC per key) differ are masked."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, offs_m, seqlen_q,
                       offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
        do = _load_rows(DO + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, offs_m, seqlen_q,
                        offs_d, HEAD_DIM, BLOCK_D, EVEN_M).to(k.dtype)
        lse2 = _load_lse2(LSE, offs_m, seqlen_q, stride_ls, EVEN_M)
        # P^T from the saved (final, merged) LSE: no running max, no attention matrix in memory.
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
        if MASKED:
            if IS_CAUSAL:
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_shift, pT, 0.0)
            if HAS_WINDOW:  # keys x queries: qpos - kpos per pair
                dist = offs_m[None, :] + causal_shift - offs_n[:, None]
                pT = tl.where((dist <= win_left) & (dist >= -win_right), pT, 0.0)
        if HAS_KLENS:  # the tile straddles this batch element's key length
            pT = tl.where(offs_n[:, None] < k_len, pT, 0.0)
        if HAS_DOCS:  # ids reloaded per tile (cached) rather than held: dK/dV own the registers
            q_doc = tl.load(Q_DOC + offs_m, mask=offs_m < seqlen_q, other=-1)
            k_doc = tl.load(K_DOC + offs_n, mask=offs_n < seqlen_k, other=-2)  # -2: the tail matches nothing
            pT = tl.where(k_doc[:, None] == q_doc[None, :], pT, 0.0)
        dv = tl.dot(pT.to(k.dtype), do, dv, input_precision=DOT_PREC)
        if EVEN_M:
            delta = tl.load(Delta + offs_m)
        else:
            delta = tl.load(Delta + offs_m, mask=offs_m < seqlen_q, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(k.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    heads_q, heads_kv, group, seqlen_q, seqlen_k, q_offset, k_offset, sm_scale, K_LENS, Q_DOC, K_DOC,
    win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_KLENS: tl.constexpr = False, HAS_DOCS: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False,
):
    """Grid (cdiv(Sk, BLOCK_N), B * Hkv). GQA: the program loops over the query heads of its group and
    keeps dK/dV in registers, so each kv-head gradient is written once: no atomics, deterministic, and
    the add into a ring accumulator is a plain read-modify-write."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads head_dim to a power of two")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles >= 16")
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_kv).to(tl.int64)
    kvh = bh % heads_kv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_DOCS:  # queries sharing a document with this key tile (searched before the tile loads)
        m_lo, m_hi = _doc_span(Q_DOC, seqlen_q, K_DOC, start_n * BLOCK_N,
                               tl.minimum(start_n * BLOCK_N + BLOCK_N, seqlen_k))
    k = _load_rows(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                   offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, EVEN_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E

    # Query i sees key j iff j <= i + causal_shift.
    causal_shift = q_offset - k_offset
    if IS_CAUSAL:
        # First tile holding a row that sees the tile's first key; from full_lo on rows see every key.
        lo = tl.minimum(tl.maximum(start_n * BLOCK_N - causal_shift, 0), seqlen_q) // BLOCK_M * BLOCK_M
        full_lo = tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - causal_shift, lo)
        full_lo = tl.minimum((full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seqlen_q)
    else:
        lo = 0
        full_lo = 0
    q_hi = seqlen_q
    k_len = seqlen_k
    if HAS_KLENS:
        k_len = tl.load(K_LENS + b)
        # A key tile wholly past the length loops over no query tile: its dK/dV stay exactly 0.
        q_hi = tl.where(start_n * BLOCK_N < k_len, seqlen_q, 0)
        lo = tl.minimum(lo, q_hi)
        full_lo = tl.minimum(full_lo, q_hi)
    if HAS_DOCS:  # only query tiles sharing a document with this key tile are visited
        q_hi = tl.minimum(q_hi, m_hi)
        lo = tl.minimum(tl.maximum(lo, m_lo // BLOCK_M * BLOCK_M), q_hi)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), q_hi)
    # Query loops: masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, q_hi) (the window's
    # far edge; empty without a window).
    full_hi = q_hi
    if HAS_WINDOW:
        first = start_n * BLOCK_N - causal_shift  # query index at the first key's own position
        last = first + BLOCK_N - 1
        # Queries [first - right, last + left] see some key of the tile; [last - right, first + left] all.
        q_hi = tl.minimum(q_hi, tl.maximum(last + win_left + 1, 0))
        lo = tl.minimum(tl.maximum(lo, tl.maximum(first - win_right, 0) // BLOCK_M * BLOCK_M), q_hi)
        w_full_lo = (tl.maximum(last - win_right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.maximum(tl.maximum(full_lo, w_full_lo), lo), q_hi)
        full_hi = tl.maximum(tl.minimum(tl.maximum(first + win_left + 1, 0) // BLOCK_M * BLOCK_M, q_hi), full_lo)
    # Out-of-range keys (tail tile) load as zeros and are never stored, so only the causal/window masks are needed.
    for g in range(0, group):
        h = kvh * group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        LSEh = LSE + b * stride_lb + h * stride_lh
        Dh = Delta + (b * heads_q + h) * seqlen_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qs, stride_qd, stride_dos, stride_dod,
                                 stride_ls, offs_n, offs_d, lo, full_lo, seqlen_q, causal_shift, qk_scale, k_len,
                                 Q_DOC, K_DOC, seqlen_k, win_left, win_right,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, True, EVEN_M, DOT_PREC, HAS_KLENS, HAS_DOCS,
                                 IS_CAUSAL, HAS_WINDOW)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qs, stride_qd, stride_dos, stride_dod,
                                 stride_ls, offs_n, offs_d, full_lo, full_hi, seqlen_q, causal_shift, qk_scale,
                                 k_len, Q_DOC, K_DOC, seqlen_k, win_left, win_right,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, False, EVEN_M, DOT_PREC, HAS_KLENS, HAS_DOCS,
                                 IS_CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, Dh, stride_qs, stride_qd, stride_dos,
                                     stride_dod, stride_ls, offs_n, offs_d, full_hi, q_hi, seqlen_q, causal_shift,
                                     qk_scale, k_len, Q_DOC, K_DOC, seqlen_k, win_left, win_right,
                                     HEAD_DIM, BLOCK_M, BLOCK_D, True, EVEN_M, DOT_PREC, HAS_KLENS, HAS_DOCS,
                                     IS_CAUSAL, HAS_WINDOW)
    _store_rows(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dks
                + offs_d[None, :] * stride_dkd,
                dk * sm_scale, offs_n, seqlen_k, offs_d, HEAD_DIM, ACCUMULATE)
    _store_rows(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvs
                + offs_d[None, :] * stride_dvd,
                dv, offs_n, seqlen_k, offs_d, HEAD_DIM, ACCUMULATE)


# ----------------------------------------------------------------------------------------------
# backward dQ: one query tile of one head, looping over its visible key tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                  offs_m, offs_d, lo, hi, seqlen_k, causal_shift, qk_scale, K_DOC, q_doc, win_left, win_right,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, offs_n, seqlen_k,
                       offs_d, HEAD_DIM, BLOCK_D, EVEN_N or not MASKED)
        v = _load_rows(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, offs_n, seqlen_k,
                       offs_d, HEAD_DIM, BLOCK_D, EVEN_N or not MASKED)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < seqlen_k
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_WINDOW:
                keep = _window_keep(keep, offs_m, offs_n, causal_shift, win_left, win_right)
            p = tl.where(keep, p, 0.0)
        if HAS_DOCS:
            k_doc = tl.load(K_DOC + offs_n, mask=offs_n < seqlen_k, other=-2)
            p = tl.where(q_doc[:, None] == k_doc[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    heads_q, group, seqlen_q, seqlen_k, q_offset, k_offset, sm_scale, K_LENS, Q_DOC, K_DOC, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_KLENS: tl.constexpr = False, HAS_DOCS: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). A separate kernel (rather than atomics from the dK/dV program)
    keeps dQ deterministic and lets both kernels hold their accumulator in registers."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads head_dim to a power of two")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles >= 16")
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads_q).to(tl.int64)
    h = bh % heads_q
    kvh = h // group
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    DO += b * stride_dob + h * stride_doh
    if HAS_KLENS:  # as in the forward: the key block ends at this batch element's length
        seqlen_k = tl.minimum(seqlen_k, tl.load(K_LENS + b))
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, offs_m, seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, EVEN_M)
    do = _load_rows(DO + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, offs_m, seqlen_q,
                    offs_d, HEAD_DIM, BLOCK_D, EVEN_M).to(q.dtype)
    lse2 = _load_lse2(LSE + b * stride_lb + h * stride_lh, offs_m, seqlen_q, stride_ls, EVEN_M)
    delta = tl.load(Delta + bh.to(tl.int64) * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2E

    causal_shift = q_offset - k_offset
    full_hi, hi = _key_range(start_m, seqlen_k, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)
    q_doc, lo, full_hi, hi = _query_docs(Q_DOC, K_DOC, start_m, offs_m, seqlen_q, seqlen_k, full_hi, hi,
                                         BLOCK_M, BLOCK_N, HAS_DOCS)
    lo, mid, full_hi, hi = _window_keys(start_m, lo, full_hi, hi, causal_shift, win_left, win_right,
                                        BLOCK_M, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                           offs_m, offs_d, lo, mid, seqlen_k, causal_shift, qk_scale, K_DOC, q_doc,
                           win_left, win_right,
                           HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS, HAS_WINDOW)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                       offs_m, offs_d, mid, full_hi, seqlen_k, causal_shift, qk_scale, K_DOC, q_doc,
                       win_left, win_right,
                       HEAD_DIM, BLOCK_N, BLOCK_D, False, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS, HAS_WINDOW)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                       offs_m, offs_d, full_hi, hi, seqlen_k, causal_shift, qk_scale, K_DOC, q_doc,
                       win_left, win_right,
                       HEAD_DIM, BLOCK_N, BLOCK_D, True, IS_CAUSAL, EVEN_N, DOT_PREC, HAS_DOCS, HAS_WINDOW)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
                dq * sm_scale, offs_m, seqlen_q, offs_d, HEAD_DIM, ACCUMULATE)


# ----------------------------------------------------------------------------------------------
# tile configs (no autotune: it needs a GPU; these were checked ahead of time by bench/kernel_report.py
# for zero spills and shared memory within the arch limit)
# ----------------------------------------------------------------------------------------------
class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


T = TileConfig
ARCHS = (80, 90)  # table columns: sm_80 (A100 and other pre-Hopper), sm_90 (H100)
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)  # BLOCK_D: head_dim padded to a power of two
# kind -> BLOCK_D -> (sm_80 config, sm_90 config); every entry compiles with zero spills at <= 255
# registers and fits shared memory (bench/kernel_report.py, tests/test_kernel_report.py).
# fp16/bf16: sm_90 tiles put >= 64 rows per warpgroup on the dot's M side so Triton lowers tl.dot to
# wgmma (forward at every head_dim, dK/dV and dQ up to 128).
_CONFIGS: Dict[str, Dict[int, Tuple[TileConfig, TileConfig]]] = {
    "fwd": {16: (T(128, 64, 4, 3), T(128, 64, 4, 3)), 32: (T(128, 64, 4, 3), T(128, 64, 4, 3)),
            64: (T(128, 64, 4, 3), T(128, 128, 8, 3)), 128: (T(128, 64, 8, 3), T(128, 64, 8, 3)),
            256: (T(64, 64, 8, 2), T(128, 32, 8, 2))},
    # block_m: query tile looped over, block_n: owned key tile (dK/dV accumulators stay in registers).
    "dkdv": {16: (T(32, 64, 4, 3), T(32, 64, 4, 3)), 32: (T(32, 64, 4, 3), T(32, 64, 4, 3)),
             64: (T(32, 128, 8, 3), T(32, 128, 8, 3)), 128: (T(32, 64, 8, 2), T(16, 64, 8, 2)),
             256: (T(16, 32, 8, 2), T(16, 32, 8, 2))},
    # block_m: owned query tile, block_n: key tile looped over.
    "dq": {16: (T(64, 32, 4, 3), T(64, 32, 4, 3)), 32: (T(64, 32, 4, 3), T(64, 32, 4, 3)),
           64: (T(128, 32, 8, 3), T(128, 32, 8, 3)), 128: (T(64, 32, 4, 2), T(64, 64, 8, 2)),
           256: (T(32, 16, 4, 2), T(32, 16, 4, 2))},
}
# fp32: "ieee" dots run on the FMA units with both operands in registers, so tiles are much smaller.
_FP32_CONFIGS: Dict[str, Dict[int, Tuple[TileConfig, TileConfig]]] = {
    "fwd": {16: (T(64, 32, 8, 2),) * 2, 32: (T(64, 32, 8, 2),) * 2, 64: (T(64, 32, 8, 2),) * 2,
            128: (T(32, 16, 8, 2),) * 2, 256: (T(32, 16, 8, 1),) * 2},
    "dkdv": {16: (T(16, 32, 8, 2), T(16, 32, 4, 2)), 32: (T(16, 32, 8, 2), T(16, 32, 4, 2)),
             64: (T(16, 32, 8, 2),) * 2, 128: (T(32, 32, 8, 2), T(16, 16, 4, 1)),
             256: (T(16, 16, 4, 1), T(16, 32, 8, 2))},
    "dq": {bd: (T(32, 16, 8, 2),) * 2 for bd in HEAD_DIM_BUCKETS},
}
# Packed-document specializations (HAS_DOCS) use the tables above except where the document mask's extra
# registers made the shipped config spill: (kind, arch, BLOCK_D, fp32) -> config (bench/kernel_report.py).
_DOCS_CONFIGS: Dict[Tuple[str, int, int, bool], TileConfig] = {
    ("fwd", 80, 128, False): T(128, 32, 8, 3),
    ("dkdv", 80, 64, False): T(16, 128, 8, 3),
    ("dkdv", 80, 128, False): T(16, 64, 8, 2),
    ("dkdv", 80, 128, True): T(16, 32, 8, 2),
    ("dkdv", 90, 128, True): T(16, 16, 4, 2),
    ("dkdv", 90, 256, True): T(16, 32, 8, 1),
    ("dq", 80, 64, True): T(32, 16, 8, 1),
    ("dq", 90, 64, True): T(32, 16, 8, 1),
}
# Sliding-window specializations (HAS_WINDOW) likewise, where the window's masks made the shipped config spill
# (bench/kernel_report.py --kinds fwd_window dkdv_window dq_window; checked: head_dim 64/128, fp16/fp32).
_WINDOW_CONFIGS: Dict[Tuple[str, int, int, bool], TileConfig] = {
    ("fwd", 80, 128, False): T(128, 32, 8, 3),
    ("fwd", 90, 128, False): T(128, 32, 8, 3),
    ("dkdv", 80, 64, False): T(16, 128, 8, 3),
    ("dkdv", 90, 128, True): T(16, 32, 8, 1),
}
del T


def preprocess_block_m(block_d: int) -> int:
    """Rows per delta program: 64, fewer at wide heads so out/dout tiles stay ~8K values."""
    return min(64, 8192 // block_d)


INTERPRET_CONFIG = TileConfig(32, 32, 4, 1)  # small tiles: several tiles (and tails) even at seq ~100


def block_d_for(head_dim: int) -> int:
    """head_dim padded to the tile width: next power of two, at least 16 (tl.dot's minimum)."""
    if not 1 <= head_dim <= 256:
        raise ValueError(f"flash_attn: head_dim must be in [1, 256], got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def arch_key(capability: Tuple[int, int]) -> int:
    """Config table key for a CUDA capability: Hopper (sm_90+) or Ampere-class (everything else)."""
    return 90 if capability[0] >= 9 else 80


def tile_config(kind: str, arch: int, head_dim: int, dtype: torch.dtype, docs: bool = False,
                window: bool = False) -> TileConfig:
    """The shipped config of kernel ``kind`` ("fwd", "dkdv", "dq") for ``arch`` (80 or 90); ``docs``: of
    its packed-document specialization; ``window``: of its sliding-window one (documents win a tie)."""
    bd, fp32 = block_d_for(head_dim), dtype == torch.float32
    if docs and (kind, arch, bd, fp32) in _DOCS_CONFIGS:
        return _DOCS_CONFIGS[(kind, arch, bd, fp32)]
    if window and (kind, arch, bd, fp32) in _WINDOW_CONFIGS:
        return _WINDOW_CONFIGS[(kind, arch, bd, fp32)]
    return (_FP32_CONFIGS if fp32 else _CONFIGS)[kind][bd][ARCHS.index(arch)]


def _config(kind: str, t: Tensor, head_dim: int, docs: bool = False, window: bool = False) -> TileConfig:
    if t.device.type != "cuda":  # CPU tensors only run under TRITON_INTERPRET=1
        return INTERPRET_CONFIG
    return tile_config(kind, arch_key(torch.cuda.get_device_capability(t.device)), head_dim, t.dtype, docs, window)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 dots (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attn: q, k, v must be (batch, seq, heads, head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attn: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attn: heads_q ({q.shape[2]}) must be a multiple of heads_kv ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attn: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


MAX_GRID_Y = 65535  # CUDA limit of grid dim 1, where the kernels put batch * heads


def _check_grid(batch: int, heads: int) -> None:
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"flash_attn: batch * heads = {batch * heads} exceeds the CUDA grid limit {MAX_GRID_Y}; "
                         f"call it on batch chunks")


def _check_int32_offsets(**tensors: Tensor) -> None:
    """Kernels index within one batch element in int32 (only the batch offset is int64)."""
    for name, t in tensors.items():
        if t is not None and sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31:
            raise ValueError(f"flash_attn: {name} spans >= 2**31 elements within one batch element "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}); split it along the sequence")


def _check_k_lens(k_lens: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """Optional valid key counts -> contiguous int32 (B,) on q's device."""
    if k_lens is None:
        return None
    if k_lens.shape != (q.shape[0],) or k_lens.dtype.is_floating_point or k_lens.device != q.device:
        raise ValueError(f"flash_attn: k_lens must be an integer ({q.shape[0]},) tensor on {q.device} (valid keys "
                         f"per batch element), got {tuple(k_lens.shape)} {k_lens.dtype} on {k_lens.device}")
    return k_lens.to(torch.int32).contiguous()


def _check_docs(q_doc: Optional[Tensor], k_doc: Optional[Tensor], q: Tensor,
                k: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Optional per-token document ids -> contiguous int32 (Sq,), (Sk,) on q's device (both or neither).
    Not checked for being non-decreasing (that would sync); the tile skip relies on it."""
    if q_doc is None and k_doc is None:
        return None, None
    for name, d, n in (("q_doc", q_doc, q.shape[1]), ("k_doc", k_doc, k.shape[1])):
        if d is None or d.shape != (n,) or d.dtype.is_floating_point or d.device != q.device:
            raise ValueError(f"flash_attn: q_doc and k_doc must both be given as integer (seqlen,) tensors on "
                             f"{q.device} (non-decreasing document ids per position); {name} is "
                             f"{None if d is None else (tuple(d.shape), d.dtype, str(d.device))}, want ({n},)")
    return q_doc.to(torch.int32).contiguous(), k_doc.to(torch.int32).contiguous()


def _window_args(window: Optional[Tuple[int, int]], sq: int, sk: int, shift: int) -> Tuple[bool, int, int]:
    """(has_window, left, right) kernel arguments for ``window=(left, right)`` (-1 or any negative side:
    unbounded). An unbounded side becomes a distance no pair of this block reaches, so the kernels need
    one code path; (-1, -1) and None are no window at all (HAS_WINDOW=False: not even compiled in)."""
    if window is None:
        return False, 0, 0
    if len(window) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in window):
        raise ValueError(f"flash_attn: window must be a pair of ints (left, right), -1 = unbounded; got {window!r}")
    left, right = window
    if left < 0 and right < 0:
        return False, 0, 0
    far = sq + sk + abs(shift) + 1  # > |qpos - kpos| for every pair of this block
    return True, (left if left >= 0 else far), (right if right >= 0 else far)


def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                   q_offset: int = 0, k_offset: int = 0,
                   config: Optional[TileConfig] = None, k_lens: Optional[Tensor] = None,
                   q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None,
                   window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """Attention forward with LSE.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D), Hq % Hkv == 0, any strides, fp16/bf16/fp32, D <= 256.
    causal: key j visible to query i iff ``k_offset + j <= q_offset + i`` (global positions).
    k_lens: optional int32 (B,): keys j >= k_lens[b] are invisible to batch element b.
    q_doc (Sq,), k_doc (Sk,): optional non-decreasing int32 document ids shared by every batch element:
    key j is visible to query i only if q_doc[i] == k_doc[j].
    window: optional (left, right), -1 = unbounded: key j is visible to query i only if
    ``-right <= (q_offset + i) - (k_offset + j) <= left`` (and the rules above).
    Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) fp32 natural log (-inf: row saw no key).
    """
    _check(q, k, v)
    k_lens = _check_k_lens(k_lens, q)
    q_doc, k_doc = _check_docs(q_doc, k_doc, q, k)
    _check_int32_offsets(q=q, k=k, v=v)
    _check_grid(q.shape[0], q.shape[2])
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if B * Sq * Hq == 0:
        return out, lse
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    has_win, win_left, win_right = _window_args(window, Sq, Sk, int(q_offset) - int(k_offset))
    cfg = config or _config("fwd", q, D, q_doc is not None, has_win)
    grid = (triton.cdiv(Sq, cfg.block_m), B * Hq)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Hq, Hq // Hkv, Sq, Sk, int(q_offset), int(k_offset), scale, lse if k_lens is None else k_lens,
        lse if q_doc is None else q_doc, lse if k_doc is None else k_doc,  # any pointer when unused
        win_left, win_right,
        HEAD_DIM=D, BLOCK_D=block_d_for(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=bool(causal),
        EVEN_M=Sq % cfg.block_m == 0, EVEN_N=Sk % cfg.block_n == 0, DOT_PREC=dot_precision(q.dtype),
        HAS_KLENS=k_lens is not None, HAS_DOCS=q_doc is not None, HAS_WINDOW=has_win, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out, lse


def flash_attn_bwd_preprocess(out: Tensor, dout: Tensor) -> Tensor:
    """delta = rowsum(dout * out) in fp32. out, dout: (B, Sq, H, D), any float dtypes and strides ->
    delta (B, H, Sq) fp32, contiguous (the layout the dK/dV and dQ kernels index)."""
    B, Sq, H, D = out.shape
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    bd = block_d_for(D)
    pre_m = preprocess_block_m(bd)
    _bwd_preprocess_kernel[(triton.cdiv(Sq, pre_m), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Sq, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=pre_m)
    return delta


def flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool = False, scale: Optional[float] = None, q_offset: int = 0, k_offset: int = 0,
                   dq: Optional[Tensor] = None, dk: Optional[Tensor] = None, dv: Optional[Tensor] = None,
                   config: Optional[Tuple[TileConfig, TileConfig]] = None,
                   k_lens: Optional[Tensor] = None, q_doc: Optional[Tensor] = None,
                   k_doc: Optional[Tensor] = None,
                   window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Attention backward of one (query block, key block) pair from the rows' final out and lse.

    dout, out: (B, Sq, Hq, D), any float dtype; lse: (B, Hq, Sq) fp32 natural log. q/k/v as in
    :func:`flash_attn_fwd`. If dq / dk, dv are given (any float dtype, any strides; fp32 in a ring) the
    block's gradients are added into them in place; otherwise new tensors in q/k/v's dtype are returned.
    ``config``: optional (dkdv, dq) tile configs. ``k_lens``: as in :func:`flash_attn_fwd`; keys past it get
    dk = dv = 0 (added as nothing into accumulators). ``q_doc`` / ``k_doc``, ``window``: as in
    :func:`flash_attn_fwd` (query tiles outside a key tile's window are skipped).
    """
    _check(q, k, v)
    k_lens = _check_k_lens(k_lens, q)
    q_doc, k_doc = _check_docs(q_doc, k_doc, q, k)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (B, Hq, Sq) or lse.dtype != torch.float32:
        raise ValueError(f"flash_attn_bwd: out {tuple(out.shape)} and dout {tuple(dout.shape)} must match q "
                         f"{tuple(q.shape)}; lse {tuple(lse.shape)} {lse.dtype} must be ({B}, {Hq}, {Sq}) fp32")
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is not None and g.shape != like.shape:
            raise ValueError(f"flash_attn_bwd: accumulator {name} {tuple(g.shape)} must be {tuple(like.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    _check_int32_offsets(q=q, k=k, v=v, dout=dout, out=out, dq=dq, dk=dk, dv=dv)
    _check_grid(B, Hq)
    acc_q = dq is not None
    acc_kv = dk is not None or dv is not None
    dq = torch.empty_like(q) if dq is None else dq
    # A lone dk (or dv) accumulator: the kernel writes both in one pass, so give the other one zeros.
    dk = (torch.zeros_like(k) if acc_kv else torch.empty_like(k)) if dk is None else dk
    dv = (torch.zeros_like(v) if acc_kv else torch.empty_like(v)) if dv is None else dv
    if B * Hq * D == 0 or Sq == 0 or Sk == 0:
        for g, acc in ((dq, acc_q), (dk, acc_kv), (dv, acc_kv)):
            if not acc:
                g.zero_()
        return dq, dk, dv
    bd = block_d_for(D)
    delta = flash_attn_bwd_preprocess(out, dout)
    docs = q_doc is not None
    has_win, win_left, win_right = _window_args(window, Sq, Sk, int(q_offset) - int(k_offset))
    cfg_kv, cfg_q = config or (_config("dkdv", q, D, docs, has_win), _config("dq", q, D, docs, has_win))
    common = dict(HEAD_DIM=D, BLOCK_D=bd, IS_CAUSAL=bool(causal), DOT_PREC=dot_precision(q.dtype),
                  HAS_KLENS=k_lens is not None, HAS_DOCS=q_doc is not None, HAS_WINDOW=has_win)
    lens_arg = delta if k_lens is None else k_lens  # any pointer when unused
    doc_args = (delta, delta) if q_doc is None else (q_doc, k_doc)
    _flash_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg_kv.block_n), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), Hq, Hkv, Hq // Hkv, Sq, Sk, int(q_offset), int(k_offset), scale, lens_arg,
        *doc_args, win_left, win_right,
        BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, EVEN_M=Sq % cfg_kv.block_m == 0,
        EVEN_N=Sk % cfg_kv.block_n == 0, ACCUMULATE=acc_kv, num_warps=cfg_kv.num_warps,
        num_stages=cfg_kv.num_stages, **common)
    _flash_bwd_dq_kernel[(triton.cdiv(Sq, cfg_q.block_m), B * Hq)](
        q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        *dq.stride(), Hq, Hq // Hkv, Sq, Sk, int(q_offset), int(k_offset), scale, lens_arg, *doc_args,
        win_left, win_right,
        BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, EVEN_M=Sq % cfg_q.block_m == 0,
        EVEN_N=Sk % cfg_q.block_n == 0, ACCUMULATE=acc_q, num_warps=cfg_q.num_warps,
        num_stages=cfg_q.num_stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# plain-torch references (what the kernels are tested against)
# ----------------------------------------------------------------------------------------------
def _scores_ref(q: Tensor, k: Tensor, causal: bool, scale: float, q_offset: int, k_offset: int,
                cd: torch.dtype, k_lens: Optional[Tensor] = None, q_doc: Optional[Tensor] = None,
                k_doc: Optional[Tensor] = None, window: Optional[Tuple[int, int]] = None) -> Tensor:
    """Masked scaled scores (B, Hq, Sq, Sk) in dtype ``cd``; kv heads indexed h // group; keys
    j >= k_lens[b] masked when k_lens (B,) is given; pairs with q_doc[i] != k_doc[j] masked when the
    document ids (Sq,), (Sk,) are given; pairs outside ``window=(left, right)`` (global positions) masked."""
    group = q.shape[2] // k.shape[2]
    qf = q.to(cd).transpose(1, 2)
    kf = k.to(cd).repeat_interleave(group, dim=2).transpose(1, 2)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[1], device=q.device)[:, None] + q_offset
        j = torch.arange(k.shape[1], device=q.device)[None, :] + k_offset
        s = s.masked_fill(j > i, float("-inf"))
    if k_lens is not None:
        j = torch.arange(k.shape[1], device=q.device)
        s = s.masked_fill(j[None, None, None, :] >= k_lens.to(q.device, torch.int64)[:, None, None, None],
                          float("-inf"))
    if q_doc is not None:
        s = s.masked_fill(q_doc.to(q.device)[:, None] != k_doc.to(q.device)[None, :], float("-inf"))
    if window is not None:
        dist = (torch.arange(q.shape[1], device=q.device)[:, None] + q_offset
                - torch.arange(k.shape[1], device=q.device)[None, :] - k_offset)  # qpos - kpos
        if window[0] >= 0:
            s = s.masked_fill(dist > window[0], float("-inf"))
        if window[1] >= 0:
            s = s.masked_fill(-dist > window[1], float("-inf"))
    return s


def flash_attn_fwd_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                       q_offset: int = 0, k_offset: int = 0,
                       compute_dtype: torch.dtype = torch.float32, k_lens: Optional[Tensor] = None,
                       q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None,
                       window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """Reference of :func:`flash_attn_fwd` (materializes the scores). Returns out in q's dtype, lse fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores_ref(q, k, causal, scale, q_offset, k_offset, compute_dtype, k_lens, q_doc, k_doc, window)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # -inf rows: p = 0
    vf = v.to(compute_dtype).repeat_interleave(q.shape[2] // k.shape[2], dim=2).transpose(1, 2)
    return torch.matmul(p, vf).transpose(1, 2).to(q.dtype), lse.float()


def flash_attn_bwd_preprocess_ref(out: Tensor, dout: Tensor) -> Tensor:
    """Reference of :func:`flash_attn_bwd_preprocess`: (B, Sq, H, D) x2 -> (B, H, Sq) fp32."""
    return (out.double() * dout.double()).sum(-1).transpose(1, 2).float()


def flash_attn_bwd_ref(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool = False, scale: Optional[float] = None, q_offset: int = 0, k_offset: int = 0,
                       compute_dtype: torch.dtype = torch.float32, k_lens: Optional[Tensor] = None,
                       q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None,
                       window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`flash_attn_bwd` from the given lse (not recomputed). Returns fp grads in
    ``compute_dtype``: dq (B, Sq, Hq, D), dk/dv (B, Sk, Hkv, D) summed over each query group."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype
    hkv, group = k.shape[2], q.shape[2] // k.shape[2]
    s = _scores_ref(q, k, causal, scale, q_offset, k_offset, cd, k_lens, q_doc, k_doc, window)
    lse_c = lse.to(cd).unsqueeze(-1)
    p = torch.exp(s - torch.where(torch.isinf(lse_c), torch.full_like(lse_c, math.inf), lse_c))
    do = dout.to(cd).transpose(1, 2)
    kf = k.to(cd).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(cd).repeat_interleave(group, dim=2).transpose(1, 2)
    delta = (do * out.to(cd).transpose(1, 2)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cd).transpose(1, 2)) * scale
    dv = torch.matmul(p.transpose(-1, -2), do)
    b, _, sk, d = dk.shape
    dk = dk.view(b, hkv, group, sk, d).sum(2)
    dv = dv.view(b, hkv, group, sk, d).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
