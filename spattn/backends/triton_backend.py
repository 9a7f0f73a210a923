"""Triton backend: flash attention with LSE and the fused merge, exposed as torch custom ops.

The kernels live in ``spattn.kernels`` (leaf code). Here they are wrapped as ``torch.library``
custom ops so they trace under ``torch.compile`` (the fake implementations give output shapes
without running anything):

* ``spattn::flash_fwd(q, k, v, causal, scale, q_offset, k_offset, k_lens, q_doc, k_doc, window_left,
  window_right) -> (out, lse)``
* ``spattn::flash_bwd(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, k_lens, q_doc, k_doc,
  window_left, window_right) -> (dq, dk, dv)``
* ``spattn::flash_bwd_acc_(dout, q, k, v, out, lse, dq, dk, dv, causal, scale, q_offset, k_offset, k_lens,
  q_doc, k_doc, window_left, window_right)`` adds the block's gradients into dq/dk/dv in place (ring
  accumulators).

``k_lens`` is an optional int32 (B,) tensor of valid key counts (the joint text mask); ``q_doc`` (Sq,) /
``k_doc`` (Sk,) optional non-decreasing int32 document ids (packed documents: query i sees key j only if
``q_doc[i] == k_doc[j]``); ``window_left`` / ``window_right`` a sliding window over global positions
(-1 = unbounded; both -1 = none).
* ``spattn::merge_(out, lse, blk_out, blk_lse)`` folds a block result into (out, lse) in place.

Importing this module registers the fused merge with :func:`spattn.backends.register_merge` for CUDA tensors.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..kernels import flash_attn as _fa
from ..kernels import merge as _merge
from .merges import register_merge

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# custom ops (+ fake implementations for torch.compile / FakeTensor tracing)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("spattn::flash_fwd", mutates_args=())
def flash_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, q_offset: int,
              k_offset: int, k_lens: Optional[Tensor] = None, q_doc: Optional[Tensor] = None,
              k_doc: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1) -> Tuple[Tensor, Tensor]:
    return _fa.flash_attn_fwd(q, k, v, causal, scale, q_offset, k_offset, k_lens=k_lens, q_doc=q_doc, k_doc=k_doc,
                              window=(window_left, window_right))


@flash_fwd.register_fake
def _(q, k, v, causal, scale, q_offset, k_offset, k_lens=None, q_doc=None, k_doc=None, window_left=-1,
      window_right=-1):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("spattn::flash_bwd", mutates_args=())
def flash_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
              scale: float, q_offset: int, k_offset: int, k_lens: Optional[Tensor] = None,
              q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None, window_left: int = -1,
              window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    return _fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, k_lens=k_lens,
                              q_doc=q_doc, k_doc=k_doc, window=(window_left, window_right))


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, k_lens=None, q_doc=None, k_doc=None,
      window_left=-1, window_right=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("spattn::flash_bwd_acc_", mutates_args=("dq", "dk", "dv"))
def flash_bwd_acc_(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor,
                   dk: Tensor, dv: Tensor, causal: bool, scale: float, q_offset: int, k_offset: int,
                   k_lens: Optional[Tensor] = None, q_doc: Optional[Tensor] = None,
                   k_doc: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1) -> None:
    _fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale, q_offset, k_offset, dq=dq, dk=dk, dv=dv,
                       k_lens=k_lens, q_doc=q_doc, k_doc=k_doc, window=(window_left, window_right))


@flash_bwd_acc_.register_fake
def _(dout, q, k, v, out, lse, dq, dk, dv, causal, scale, q_offset, k_offset, k_lens=None, q_doc=None,
      k_doc=None, window_left=-1, window_right=-1):
    return None


@torch.library.custom_op("spattn::merge_", mutates_args=("out", "lse"))
def merge_op_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    _merge.merge_(out, lse, blk_out, blk_lse)


@merge_op_.register_fake
def _(out, lse, blk_out, blk_lse):
    return None


def fused_merge_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    """The ``spattn.ops.merge_`` implementation: in place, through the custom op."""
    torch.ops.spattn.merge_(out, lse, blk_out, blk_lse)


register_merge("triton", fused_merge_, accepts=lambda t: t.is_cuda)


# ----------------------------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------------------------
class TritonBackend:
    """Backend contract of :mod:`spattn.backends` on the Triton kernels.

    ``q_offset`` / ``k_offset`` (global positions of element 0 of q and k) are an extension beyond the
    contract: with them a causal block whose queries and keys come from different ranks is masked
    correctly (key j visible to query i iff ``k_offset + j <= q_offset + i``).
    ``q_doc`` / ``k_doc`` (packed documents, int32 (Sq,) / (Sk,) non-decreasing ids, shared by the batch)
    are another: query i sees key j only if ``q_doc[i] == k_doc[j]``; ``supports_docs`` tells the ring so.
    ``window=(left, right)`` (-1 = unbounded; ``supports_window``) keeps key j for query i only if
    ``-right <= (q_offset + i) - (k_offset + j) <= left``; tiles outside it are skipped.
    """

    name = "triton"
    supports_docs = True
    supports_window = True

    def available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available()
        # CPU tensors run only in Triton's interpreter (tests, no GPU).
        return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                q_offset: int = 0, k_offset: int = 0, k_lens: Optional[Tensor] = None,
                q_doc: Optional[Tensor] = None, k_doc: Optional[Tensor] = None,
                window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
        """q: (B, Sq, Hq, D), k/v: (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32.
        k_lens: optional int32 (B,) valid keys per batch element (the kernel skips the rest).
        q_doc (Sq,), k_doc (Sk,): optional document ids (tiles sharing no document are skipped).
        window: optional (left, right) over global positions, -1 = unbounded."""
        wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
        return torch.ops.spattn.flash_fwd(q, k, v, bool(causal), float(scale), int(q_offset), int(k_offset),
                                          k_lens, q_doc, k_doc, wl, wr)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 scale: float, dq: Optional[Tensor] = None, dk: Optional[Tensor] = None,
                 dv: Optional[Tensor] = None, q_offset: int = 0,
                 k_offset: int = 0, k_lens: Optional[Tensor] = None, q_doc: Optional[Tensor] = None,
                 k_doc: Optional[Tensor] = None,
                 window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Block gradients from the rows' final (out, lse); added into dq/dk/dv in place when given."""
        wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
        args = (bool(causal), float(scale), int(q_offset), int(k_offset), k_lens, q_doc, k_doc, wl, wr)
        if dq is None and dk is None and dv is None:
            return torch.ops.spattn.flash_bwd(dout, q, k, v, out, lse, *args)
        # Missing accumulators start at zero in the input dtype: adding into zero is a plain store.
        dq = torch.zeros_like(q) if dq is None else dq
        dk = torch.zeros_like(k) if dk is None else dk
        dv = torch.zeros_like(v) if dv is None else dv
        torch.ops.spattn.flash_bwd_acc_(dout, q, k, v, out, lse, dq, dk, dv, *args)
        return dq, dk, dv
