"""Single-device building blocks: block attention that returns the LSE, and the LSE merge.

These are the only two operations the parallel strategies use, so a new backend (Triton, C++)
plugs in here and every strategy gets it.

LSE convention everywhere in spattn: natural log, fp32, shape (batch, heads, seqlen); ``-inf`` marks
a row that has seen no key yet (its output row is 0).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .backends import MERGE_ORDER, MERGES, get_backend, merge_torch_, register_merge

Tensor = torch.Tensor

__all__ = ["attention_with_lse", "block_forward", "block_backward", "merge", "merge_", "merge_ref", "merge_impls", "register_merge", "check_qkv"]


# ----------------------------------------------------------------------------------------------
# Input checks (local, cheap, and done before any collective so a bad call fails instead of hangs)
# ----------------------------------------------------------------------------------------------
def check_qkv(q: Tensor, k: Tensor, v: Tensor, where: str = "attention") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"spattn.{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"spattn.{where}: {name} must be 4-D (batch, seq, heads, head_dim), got shape "
                             f"{tuple(t.shape)}; add a batch dim with {name}.unsqueeze(0) if needed")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"spattn.{where}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
                         f"cast them to one dtype")
    if not q.dtype.is_floating_point:
        raise ValueError(f"spattn.{where}: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"spattn.{where}: q, k, v are on different devices ({q.device}, {k.device}, "
                         f"{v.device}); move them to one device")
    if k.shape != v.shape:
        raise ValueError(f"spattn.{where}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"spattn.{where}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch "
                         f"(dim 0) and head_dim (dim 3)")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"spattn.{where}: q heads ({q.shape[2]}) must be a multiple of k/v heads "
                         f"({k.shape[2]}) for grouped-query attention")


# ----------------------------------------------------------------------------------------------
# attention_with_lse
# ----------------------------------------------------------------------------------------------
def block_forward(backend, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  k_lens: Optional[Tensor] = None, **docs: Tensor) -> Tuple[Tensor, Tensor]:
    """Backend forward that also handles an empty key block (out 0, lse -inf). ``k_lens``: optional
    int32 (batch,) valid key counts (keys >= k_lens[b] are invisible), passed only when given so
    backends without key lengths keep working for unmasked calls. ``docs``: optional ``q_doc`` /
    ``k_doc`` document ids, only for a backend with ``supports_docs``."""
    if k.shape[1] == 0:
        b, sq, hq, _ = q.shape
        return (q.new_zeros(q.shape[:3] + v.shape[3:]),
                torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device))
    if k_lens is not None:
        docs["k_lens"] = k_lens
    out, lse = backend.forward(q, k, v, causal, scale, **docs)
    if q.device.type == "cpu":
        out, lse = _poison_nan_rows(q, out, lse)
    return out, lse


def block_backward(backend, rows: Tuple[Tensor, Tensor, Tensor, Tensor], kv: Tuple[Tensor, Tensor], causal: bool,
                   scale: float, acc: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
                   **kw: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend backward of one block. rows = (dout, q, out, lse) of the query rows (out/lse: the
    *final*, merged ones); kv = (k, v). With ``acc`` = (dq, dk, dv) the gradients are added into them
    in place (any float dtype) and returned. ``kw``: ``k_lens`` / ``q_doc`` / ``k_doc`` as for forward."""
    dout, q, out, lse = rows
    if acc is None:
        return backend.backward(dout, q, kv[0], kv[1], out, lse, causal, scale, **kw)
    return backend.backward(dout, q, kv[0], kv[1], out, lse, causal, scale, dq=acc[0], dk=acc[1], dv=acc[2], **kw)


def _poison_nan_rows(q: Tensor, out: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
    """torch's CPU flash kernel drops a NaN in a query row for some lengths (returns lse 0 and a
    finite row); SDPA's semantics are a NaN row. Restore them: one pass over q, no sync."""
    bad = torch.isnan(q).any(-1)                                   # (B, S, H)
    lse = lse.masked_fill(bad.transpose(1, 2), float("nan"))
    out = out.masked_fill(bad.unsqueeze(-1), float("nan"))
    return out, lse


class _AttentionWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        out, lse = block_forward(backend, q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                       softmax_scale: Optional[float] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Attention of one block that also returns its log-sum-exp.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k, v: (batch, seqlen_k, heads_kv, head_dim); ``heads_q % heads_kv == 0`` (GQA/MQA).
        causal: top-left aligned causal mask (query i sees key j iff j <= i).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: "auto", "torch", "reference" or "triton".

    Returns:
        out: (batch, seqlen_q, heads_q, head_dim), q's dtype.
        lse: (batch, heads_q, seqlen_q), fp32, natural log; ``-inf`` where a row sees no key.
        ``out`` is differentiable w.r.t. q, k, v; ``lse`` is returned without gradient.
    """
    check_qkv(q, k, v, "ops.attention_with_lse")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    be = get_backend(backend, q.device)
    return _AttentionWithLSE.apply(q, k, v, bool(causal), scale, be)


# ----------------------------------------------------------------------------------------------
# merge: fold a block result into a running result
# ----------------------------------------------------------------------------------------------
def merge_ref(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Plain-torch, out-of-place merge (fp32 math). out/blk_out: (B, S, H, D); lse/blk_lse: (B, H, S).

    new_lse = log(exp(lse) + exp(blk_lse)); new_out = out * exp(lse - new_lse) + blk * exp(blk_lse - new_lse).
    Rows where both sides are -inf stay (0, -inf) instead of turning NaN.
    """
    new_lse = torch.logaddexp(lse, blk_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_a = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)      # (B, S, H, 1)
    w_b = torch.exp(blk_lse - safe).transpose(1, 2).unsqueeze(-1)
    new_out = out.float() * w_a + blk_out.float() * w_b
    return new_out, new_lse


_merge_torch_ = merge_torch_  # the plain-torch in-place merge (lives with the merge registry)


_EXT_MERGES = [False]  # whether the optional C++ extension's fused merges were looked for


def _load_ext_merges() -> None:
    """Register the C++ extension's fused merges on first use (silent no-op when it is not built):
    ``import spattn`` never loads the extension or hashes its sources."""
    _EXT_MERGES[0] = True
    from . import _ext
    _ext.register_merge_if_available()


def merge_impls() -> Dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], None]]:
    """Every merge usable by name: "torch" (always) and the fused ones kernels registered."""
    if not _EXT_MERGES[0]:
        _load_ext_merges()
    return {"torch": _merge_torch_, **MERGES}


def merge_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """In-place merge of a block result into the running ``(out, lse)``; returns them.

    out: (B, S, H, D) running output (fp32 in the ring); lse: (B, H, S) fp32.
    blk_out: same shape as out, any float dtype; blk_lse: (B, H, S) fp32.
    """
    if not _EXT_MERGES[0]:
        _load_ext_merges()
    if impl == "auto":
        fn = next((MERGES[n] for n, acc in MERGE_ORDER if acc(out)), _merge_torch_)
    else:
        impls = merge_impls()
        if impl not in impls:
            raise ValueError(f"spattn.merge_: unknown impl {impl!r}; choose from {('auto',) + tuple(impls)}")
        fn = impls[impl]
    fn(out, lse, blk_out, blk_lse)
    return out, lse


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Numerically stable merge of two partial attention results over disjoint key sets.

    out_a, out_b: (batch, seq, heads, head_dim); lse_a, lse_b: (batch, heads, seq) fp32.
    Returns (out, lse): out in fp32, lse fp32. A side whose lse is -inf contributes nothing.
    """
    out = out_a.float().clone()
    lse = lse_a.float().clone()
    return merge_(out, lse, out_b, lse_b.float())
