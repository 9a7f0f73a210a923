"""Fused in-place LSE merge: fold a block result (blk_out, blk_lse) into a running (out, lse).

    new_lse = log(exp(lse) + exp(blk_lse))
    out     = out * exp(lse - new_lse) + blk_out * exp(blk_lse - new_lse)

One pass over out/blk_out instead of the ~6 elementwise kernels of the torch version. Layout:
out/blk_out (B, S, H, D) any strides (out fp32 in the ring, blk_out any float dtype); lse/blk_lse
(B, H, S) fp32, natural log, -inf for a row that has seen no key. Both sides -inf -> out 0, lse -inf.

Leaf code: imports nothing from spattn.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _merge_kernel(
    Out, LSE, BlkOut, BlkLSE,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_bob, stride_bos, stride_boh, stride_bod,
    stride_blb, stride_blh, stride_bls,
    heads, seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_S), B * H): BLOCK_S rows of one head, the whole (padded) head_dim."""
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads head_dim to a power of two")
    start_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_s = start_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_s < seqlen
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_s * stride_ls
    lse_a = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(BlkLSE + b * stride_blb + h * stride_blh + offs_s * stride_bls, mask=row_ok,
                    other=float("-inf"))
    # Subtract the max so exp never overflows; when both sides are -inf use 0 so no (-inf) - (-inf) NaN.
    mx = tl.maximum(lse_a, lse_b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w_a = tl.exp(lse_a - mx_safe)
    w_b = tl.exp(lse_b - mx_safe)
    tot = w_a + w_b
    seen = tot > 0.0
    tot_safe = tl.where(seen, tot, 1.0)
    new_lse = tl.where(seen, mx_safe + tl.log(tot_safe), float("-inf"))
    w_a = w_a / tot_safe
    w_b = w_b / tot_safe

    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od
    o_a = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_b = tl.load(BlkOut + b * stride_bob + h * stride_boh + offs_s[:, None] * stride_bos
                  + offs_d[None, :] * stride_bod, mask=mask, other=0.0).to(tl.float32)
    # A side with weight 0 must not leak garbage (e.g. an uninitialised running out): select, don't multiply.
    new_o = (tl.where(w_a[:, None] > 0.0, o_a * w_a[:, None], 0.0)
             + tl.where(w_b[:, None] > 0.0, o_b * w_b[:, None], 0.0))
    tl.store(o_ptrs, new_o.to(Out.dtype.element_ty), mask=mask)
    tl.store(lse_ptrs, new_lse, mask=row_ok)


MERGE_NUM_WARPS = 4


def merge_block_s(block_d: int) -> int:
    """Rows per program: 32, fewer at wide heads so each operand tile stays ~4K fp32 values."""
    return min(32, 4096 // block_d)


def merge_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """In place: fold (blk_out, blk_lse) into (out, lse) and return them.

    out, blk_out: (B, S, H, D), any strides, any float dtype (fp32 out recommended: it is the running sum).
    lse, blk_lse: (B, H, S) fp32, any strides.
    """
    if out.dim() != 4:
        raise ValueError(f"merge_: out must be (batch, seq, heads, head_dim), got shape {tuple(out.shape)}")
    B, S, H, D = out.shape
    if out.shape != blk_out.shape or lse.shape != blk_lse.shape or lse.shape != (B, H, S):
        raise ValueError(f"merge_: shapes out {tuple(out.shape)}, lse {tuple(lse.shape)}, blk_out "
                         f"{tuple(blk_out.shape)}, blk_lse {tuple(blk_lse.shape)} do not match (B,S,H,D)/(B,H,S)")
    if lse.dtype != torch.float32 or blk_lse.dtype != torch.float32:
        raise ValueError(f"merge_: lse and blk_lse must be fp32, got {lse.dtype}, {blk_lse.dtype}")
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if B * H > 65535:  # CUDA limit of grid dim 1
        raise ValueError(f"merge_: batch * heads = {B * H} exceeds the CUDA grid limit 65535; merge batch chunks")
    bd = max(16, triton.next_power_of_2(D))
    bs = merge_block_s(bd)
    _merge_kernel[(triton.cdiv(S, bs), B * H)](
        out, lse, blk_out, blk_lse, *out.stride(), *lse.stride(), *blk_out.stride(), *blk_lse.stride(),
        H, S, HEAD_DIM=D, BLOCK_D=bd, BLOCK_S=bs, num_warps=MERGE_NUM_WARPS)
    return out, lse


def merge_ref(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Out-of-place plain-torch merge in fp32: returns (new_out fp32, new_lse fp32)."""
    new_lse = torch.logaddexp(lse, blk_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_a = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1); 0 where lse is -inf
    w_b = torch.exp(blk_lse - safe).transpose(1, 2).unsqueeze(-1)
    return out.float() * w_a + blk_out.float() * w_b, new_lse
