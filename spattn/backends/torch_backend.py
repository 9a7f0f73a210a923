"""Backend on torch's own fused kernels that return the LSE.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32/bf16/fp16, LSE in fp32).
CUDA: ``aten._scaled_dot_product_flash_attention`` for fp16/bf16 and
``aten._scaled_dot_product_efficient_attention`` for fp32. The aten kernels take (B, H, S, D); our
(B, S, H, D) tensors are passed as transposed views, so no copy is made on the way in.

Per-batch key lengths (``k_lens``, the joint text mask) become an additive key bias of shape
(B, 1, 1, Sk): 0 for keys < k_lens[b], -inf after. It is O(B * Sk), broadcast by the kernel, never an
(Sq, Sk) mask; and it needs no host sync (no .tolist()), so nothing stalls a GPU stream. On CUDA
these calls go to the efficient kernel for every dtype (the flash kernel takes no bias).

Positions (``q_offset``, ``k_offset``: global positions of the block's first query / key) matter for
``causal`` between different positions and for a sliding ``window=(left, right)`` (-1 = unbounded; key j
visible to query i iff ``-right <= qpos - kpos <= left``). Such a block runs as query chunks about as
long as a quarter of the window, each against only the keys its rows can see, with an additive (chunk x
keys) bias: O(Sq * window) work and bias memory, key spans wholly outside the window never touched.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .reference import _accumulate, visible

Tensor = torch.Tensor

aten = torch.ops.aten


def _bhsd(x):
    return x.transpose(1, 2)


def _expand_kv(x, heads_q):
    # aten kernels want equal head counts; repeat kv heads for their query group (local memory only;
    # what travels between ranks stays unexpanded).
    return x if x.shape[2] == heads_q else x.repeat_interleave(heads_q // x.shape[2], dim=2)


def _reduce_kv_grad(g, heads_kv):
    b, s, hq, d = g.shape
    return g if hq == heads_kv else g.view(b, s, heads_kv, hq // heads_kv, d).sum(3)


def _key_bias(k_lens, seqlen_k, dtype, device, align: int = 1):
    """(B, 1, 1, Sk) additive bias, -inf on keys >= k_lens[b]. ``align``: allocate the last dim padded
    to a multiple of it and return a slice (the CUDA efficient kernel wants aligned bias rows)."""
    width = -(-seqlen_k // align) * align
    keys = torch.arange(width, device=device)
    bias = torch.zeros((k_lens.shape[0], 1, 1, width), dtype=dtype, device=device)
    bias.masked_fill_((keys[None, :] >= k_lens.to(device=device, dtype=torch.int64)[:, None])[:, None, None, :],
                      float("-inf"))
    return bias[..., :seqlen_k]


# ----------------------------------------------------------------------------------------------
# Positional masks: causal with global offsets, sliding windows
# ----------------------------------------------------------------------------------------------
_MIN_CHUNK = 64  # query rows per call of the windowed path, at least (fewer calls for small windows)
_CHUNK_DIV = 4   # rows per call: the window width / this (bench/bench_window.py)


def _positional(causal: bool, window, q_offset: int, k_offset: int) -> bool:
    """Whether this block needs the positional path (a window, or causal between different positions)."""
    left, right = (-1, -1) if window is None else window
    return left >= 0 or right >= 0 or (causal and q_offset != k_offset)


def _row_ranges(sq: int, sk: int, causal: bool, window, shift: int):
    """(first, end) functions of query rows (ints or int tensors): the keys row i sees by position are
    [first(i), end(i)) in local key indices, clipped to [0, Sk]; both non-decreasing in i.
    shift = q_offset - k_offset."""
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)

    def first(i):
        return i * 0 if left < 0 else _clip(i + shift - left, sk)

    def end(i):
        return i * 0 + sk if right < 0 else _clip(i + shift + right + 1, sk)

    return first, end


def _clip(x, hi: int):
    return x.clamp(0, hi) if isinstance(x, Tensor) else min(hi, max(0, x))


def _chunks(sq: int, sk: int, causal: bool, window, shift: int) -> List[Tuple[int, int, int, int, bool]]:
    """Calls (q0, q1, k0, k1, masked) covering every visible pair: query rows in chunks, each with the key
    span its rows can see; ``masked`` False when every row of the chunk sees every key of its span.
    A chunk is a quarter of the window's width (at least _MIN_CHUNK rows), so the work and the bias are
    about Sq * 1.25 * window: less than the causal kernel's Sq^2 / 2 once the window is under ~Sq / 3."""
    first, end = _row_ranges(sq, sk, causal, window, shift)
    left, right = (-1, -1) if window is None else window
    span = (left if left >= 0 else sk) + (right if right >= 0 else sk) + 1
    step = min(sq, max(_MIN_CHUNK, span // _CHUNK_DIV)) if sq else 1
    calls = []
    for q0 in range(0, sq, step):
        q1 = min(sq, q0 + step)
        k0, k1 = first(q0), end(q1 - 1)
        if k0 < k1:
            calls.append((q0, q1, k0, k1, not (first(q1 - 1) <= k0 and end(q0) >= k1)))
    return calls


def _row_empty(sq: int, causal: bool, window, shift: int, k_lens: Optional[Tensor], sk: int,
               device) -> Tensor:
    """bool (B or 1, Sq): rows that see no key at all (by position, and past k_lens[b]); no host sync."""
    first, end = _row_ranges(sq, sk, causal, window, shift)
    rows = torch.arange(sq, device=device)
    lo, hi = first(rows), end(rows)[None, :]
    if k_lens is not None:
        hi = torch.minimum(hi, k_lens.to(device=device, dtype=torch.int64)[:, None])
    return hi <= lo[None, :]


def _chunk_bias(q0: int, q1: int, k0: int, k1: int, causal: bool, window, shift: int,
                k_lens: Optional[Tensor], dtype, device, align: int = 1) -> Tensor:
    """Additive bias (B or 1, 1, q1 - q0, k1 - k0) of one chunk: -inf outside the window / causal rule /
    k_lens. ``align``: last dim allocated padded to a multiple of it (the CUDA efficient kernel)."""
    width = -(-(k1 - k0) // align) * align
    keep = visible(q1 - q0, width, causal, window, q0 + shift, k0, device)
    keep = torch.ones(q1 - q0, width, dtype=torch.bool, device=device) if keep is None else keep
    keep = keep[None, None]
    if k_lens is not None:
        keys = torch.arange(k0, k0 + width, device=device)
        keep = keep & (keys[None, :] < k_lens.to(device=device, dtype=torch.int64)[:, None])[:, None, None, :]
    bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
    return bias[..., : k1 - k0]


def _dense_fwd(qt, kt, vt, scale, bias):
    """One aten call, no causal flag: (B, H, S, D) views, optional additive bias -> out (B, H, Sq, D), lse."""
    if qt.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias,
                                                                 scale=scale)[:2]
    if bias is None and qt.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)[:2]
    if bias is not None:
        bias = bias.expand(qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2])
    out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, True, 0.0, False, scale=scale)[:2]
    return out, lse[..., : qt.shape[2]]


def _dense_bwd(dot, qt, kt, vt, ot, lse, scale, bias):
    """Gradients (dq, dk, dv) in (B, H, S, D) of :func:`_dense_fwd` given the rows' final out and lse
    (rows that see no key must carry lse +inf)."""
    zero = torch.zeros((), dtype=torch.int64, device=qt.device)
    if qt.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dot, qt, kt, vt, ot, lse, 0.0, False,
                                                                          attn_mask=bias, scale=scale)
    sq, sk = qt.shape[2], kt.shape[2]
    if bias is None and qt.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention_backward(dot, qt, kt, vt, ot, lse, None, None, sq, sk, 0.0,
                                                                 False, zero, zero, scale=scale)[:3]
    if bias is not None:
        bias = bias.expand(qt.shape[0], qt.shape[1], sq, sk)
    lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))  # the shape the efficient forward returns
    return aten._scaled_dot_product_efficient_attention_backward(
        dot, qt, kt, vt, bias, ot, lse, zero, zero, 0.0, [True, True, True, False], False, scale=scale)[:3]


class TorchBackend:
    name = "torch"
    supports_window = True  # window=(left, right) with q_offset / k_offset (module doc)

    def available(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def forward(self, q, k, v, causal, scale, k_lens=None, window=None, q_offset=0, k_offset=0):
        hq = q.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
        if _positional(causal, window, q_offset, k_offset):
            return self._forward_positional(qt, kt, vt, causal, scale, k_lens, window, q_offset - k_offset)
        if k_lens is not None:
            return self._forward_masked(qt, kt, vt, causal, scale, k_lens)
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
        elif q.dtype in (torch.float16, torch.bfloat16):
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, causal,
                                                                    scale=scale)[:2]
            lse = lse[..., : q.shape[1]]  # the efficient kernel pads the LSE's seq dim
        return _bhsd(out), lse.float()

    def _forward_masked(self, qt, kt, vt, causal, scale, k_lens):
        empty = (k_lens == 0)[:, None, None]  # batch elements with no visible key: lse -inf, out 0
        if qt.device.type == "cpu":
            bias = _key_bias(k_lens, kt.shape[2], qt.dtype, qt.device)
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, attn_mask=bias,
                                                                        scale=scale)
            # The CPU kernel already returns 0 for rows whose keys are all -inf, but lse 0 instead of -inf.
            return _bhsd(out), lse.float().masked_fill(empty, float("-inf"))
        b, h, sq, sk = qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2]
        bias = _key_bias(k_lens, sk, qt.dtype, qt.device, align=16).expand(b, h, sq, sk)
        out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, True, 0.0, causal,
                                                                scale=scale)[:2]
        lse = lse[..., :sq].float().masked_fill(empty, float("-inf"))
        return _bhsd(out.masked_fill(empty[..., None], 0.0)), lse

    def _forward_positional(self, qt, kt, vt, causal, scale, k_lens, window, shift):
        """Query chunks against the keys their rows see (``_chunks``); rows that see nothing: out 0, lse -inf."""
        b, h, sq, d = qt.shape
        sk = kt.shape[2]
        out = qt.new_zeros((b, h, sq, vt.shape[3]))
        lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=qt.device)
        align = 1 if qt.device.type == "cpu" else 16
        for q0, q1, k0, k1, masked in _chunks(sq, sk, causal, window, shift):
            bias = None
            if masked or k_lens is not None:
                bias = _chunk_bias(q0, q1, k0, k1, causal, window, shift, k_lens, qt.dtype, qt.device, align)
            o, l = _dense_fwd(qt[:, :, q0:q1], kt[:, :, k0:k1], vt[:, :, k0:k1], scale, bias)
            out[:, :, q0:q1] = o
            lse[:, :, q0:q1] = l.float()
        empty = _row_empty(sq, causal, window, shift, k_lens, sk, qt.device)[:, None, :]  # (B|1, 1, Sq)
        return _bhsd(out.masked_fill(empty[..., None], 0.0)), lse.masked_fill(empty, float("-inf"))

    def _backward_positional(self, dot, qt, kt, vt, ot, lse, causal, scale, k_lens, window, shift, grads):
        """Add each chunk's gradients into ``grads`` = (dq, dk, dv), (B, H, S, D) views of fp32 or
        accumulator buffers (kv already expanded to the query heads)."""
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows that saw no key: weights exactly 0
        align = 1 if qt.device.type == "cpu" else 16
        for q0, q1, k0, k1, masked in _chunks(qt.shape[2], kt.shape[2], causal, window, shift):
            bias = None
            if masked or k_lens is not None:
                bias = _chunk_bias(q0, q1, k0, k1, causal, window, shift, k_lens, qt.dtype, qt.device, align)
            g = _dense_bwd(dot[:, :, q0:q1], qt[:, :, q0:q1], kt[:, :, k0:k1], vt[:, :, k0:k1], ot[:, :, q0:q1],
                           lse[:, :, q0:q1].contiguous(), scale, bias)
            grads[0][:, :, q0:q1] += g[0]
            grads[1][:, :, k0:k1] += g[1]
            grads[2][:, :, k0:k1] += g[2]

    def backward(self, dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None, k_lens=None,
                 window=None, q_offset=0, k_offset=0):
        hq, hkv = q.shape[2], k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
        dot, ot = _bhsd(dout.to(q.dtype)), _bhsd(out.to(q.dtype))
        if _positional(causal, window, q_offset, k_offset):
            # Chunks overlap in keys: sum in fp32 (kv gradients per query head, reduced to kv heads after).
            gq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            gk = torch.zeros((k.shape[0], k.shape[1], hq, k.shape[3]), dtype=torch.float32, device=q.device)
            gv = torch.zeros_like(gk)
            self._backward_positional(dot, qt, kt, vt, ot, lse, causal, scale, k_lens, window,
                                      q_offset - k_offset, (_bhsd(gq), _bhsd(gk), _bhsd(gv)))
            return _accumulate((gq, _reduce_kv_grad(gk, hkv), _reduce_kv_grad(gv, hkv)), (dq, dk, dv), (q, k, v))
        if k_lens is not None:
            # A row that saw no key at all (lse -inf) has no gradient: +inf makes its weights exp(-inf) = 0.
            lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        if k_lens is not None and q.device.type == "cpu":
            g = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dot, qt, kt, vt, ot, lse, 0.0, causal, attn_mask=_key_bias(k_lens, k.shape[1], q.dtype, q.device),
                scale=scale)
        elif k_lens is not None:
            b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
            bias = _key_bias(k_lens, sk, q.dtype, q.device, align=16).expand(b, hq, sq, sk)
            zero = torch.zeros((), dtype=torch.int64, device=q.device)
            lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))
            g = aten._scaled_dot_product_efficient_attention_backward(
                dot, qt, kt, vt, bias, ot, lse, zero, zero, 0.0, [True, True, True, False], causal,
                scale=scale)[:3]
        elif q.device.type == "cpu":
            g = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dot, qt, kt, vt, ot, lse, 0.0, causal, scale=scale)
        elif q.dtype in (torch.float16, torch.bfloat16):
            sq, sk = q.shape[1], k.shape[1]
            zero = torch.zeros((), dtype=torch.int64, device=q.device)
            g = aten._scaled_dot_product_flash_attention_backward(
                dot, qt, kt, vt, ot, lse, None, None, sq, sk, 0.0, causal, zero, zero, scale=scale)
        else:
            zero = torch.zeros((), dtype=torch.int64, device=q.device)
            # Give the kernel the LSE in the shape its forward returns (seq padded to 32).
            lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))
            g = aten._scaled_dot_product_efficient_attention_backward(
                dot, qt, kt, vt, None, ot, lse, zero, zero, 0.0, [True, True, True, False], causal,
                scale=scale)[:3]
        gq, gk, gv = (_bhsd(t) for t in g[:3])
        gk, gv = _reduce_kv_grad(gk, hkv), _reduce_kv_grad(gv, hkv)
        return _accumulate((gq, gk, gv), (dq, dk, dv), (q, k, v))
