"""Triton kernels for spattn (leaf code: imports nothing from spattn).

* ``flash_attn``: flash attention that returns the LSE. ``flash_attn_fwd(q, k, v, causal, scale,
  q_offset, k_offset) -> (out, lse)`` and ``flash_attn_bwd(dout, q, k, v, out, lse, ..., dq, dk, dv)``
  (adds into ring accumulators), tile tables for sm_80 / sm_90, plain-torch ``*_ref`` twins.
* ``merge``: ``merge_(out, lse, blk_out, blk_lse)``, the fused in-place LSE merge, and ``merge_ref``.

Layout (batch, seq, heads, head_dim), any strides; LSE (batch, heads, seq) fp32 natural log, -inf for a
row that sees no key. ``spattn.backends.triton_backend`` wraps them as ``torch.ops.spattn`` custom ops.
"""
