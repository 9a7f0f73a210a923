"""Backend on torch's own fused kernels that return the LSE.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32/bf16/fp16, LSE in fp32).
CUDA: ``aten._scaled_dot_product_flash_attention`` for fp16/bf16 and
``aten._scaled_dot_product_efficient_attention`` for fp32. The aten kernels take (B, H, S, D); our
(B, S, H, D) tensors are passed as transposed views, so no copy is made on the way in.
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


class TorchBackend:
    name = "torch"

    def available(self, device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")

    def forward(self, q, k, v, causal, scale):
        hq = q.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
        elif q.dtype in (torch.float16, torch.bfloat16):
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, causal,
                                                                    scale=scale)[:2]
            lse = lse[..., : q.shape[1]]  # the efficient kernel pads the LSE's seq dim
        return _bhsd(out), lse.float()

    def backward(self, dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None):
        hq, hkv = q.shape[2], k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_expand_kv(k, hq)), _bhsd(_expand_kv(v, hq))
        dot, ot = _bhsd(dout.to(q.dtype)), _bhsd(out.to(q.dtype))
        if q.device.type == "cpu":
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
