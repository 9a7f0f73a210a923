"""Backend on torch's own fused kernels that return the LSE.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32/bf16/fp16, LSE in fp32).
CUDA: ``aten._scaled_dot_product_flash_attention`` for fp16/bf16 and
``aten._scaled_dot_product_efficient_attention`` for fp32. The aten kernels take (B, H, S, D); our
(B, S, H, D) tensors are passed as transposed views, so no copy is made on the way in.

Per-batch key lengths (``k_lens``, the joint text mask) become an additive key bias of shape
(B, 1, 1, Sk): 0 for keys < k_lens[b], -inf after. It is O(B * Sk), broadcast by the kernel, never an
(Sq, Sk) mask; and it needs no host sync (no .tolist()), so nothing stalls a GPU stream. On CUDA
these calls go to the efficient kernel for every dtype (the flash kernel takes no bias).
"""
from __future__ import annotations

import torch

from .reference import _accumulate

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


class TorchBackend:
    name = "torch"

    def available(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def forward(self, q, k, v, causal, scale, k_lens=None):
        hq = q.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
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

    def backward(self, dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None, k_lens=None):
        hq, hkv = q.shape[2], k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
        dot, ot = _bhsd(dout.to(q.dtype)), _bhsd(out.to(q.dtype))
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
