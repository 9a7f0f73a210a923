"""Plain-torch reference attention: explicit scores, fp32 (or fp64) math. What the tests trust.

Materializes the (seqlen_q, seqlen_k) score matrix, so it is for tests and small shapes only.
Positions: query i of a block is at global position ``q_offset + i``, key j at ``k_offset + j`` (both 0
by default); ``causal`` keeps key j iff kpos <= qpos, a sliding ``window=(left, right)`` (-1 = unbounded)
iff ``-right <= qpos - kpos <= left``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _expand_kv(x: Tensor, heads_q: int) -> Tensor:
    """(B, S, Hkv, D) -> (B, S, Hq, D) by repeating each kv head for its query group."""
    return x.repeat_interleave(heads_q // x.shape[2], dim=2) if x.shape[2] != heads_q else x


def key_mask_from_lens(k_lens: Tensor, seqlen_k: int) -> Tensor:
    """int (B,) valid key counts -> bool (B, Sk) key mask (True = key visible)."""
    return torch.arange(seqlen_k, device=k_lens.device)[None, :] < k_lens.to(torch.int64)[:, None]


def visible(sq: int, sk: int, causal: bool, window: Optional[Tuple[int, int]] = None, q_offset: int = 0,
            k_offset: int = 0, device=None) -> Optional[Tensor]:
    """bool (Sq, Sk): key j visible to query i by position (causal and window over global positions),
    or None when every pair is (no causal, no window)."""
    left, right = (-1, -1) if window is None else window
    if not causal and left < 0 and right < 0:
        return None
    dist = (torch.arange(sq, device=device)[:, None] + q_offset
            - torch.arange(sk, device=device)[None, :] - k_offset)  # qpos - kpos
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep &= dist >= 0
    if left >= 0:
        keep &= dist <= left
    if right >= 0:
        keep &= dist >= -right
    return keep


def _mask_keys(s: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Scores (B, H, Sq, Sk) with the keys where ``key_mask`` (B, Sk) is False set to -inf."""
    if key_mask is None:
        return s
    return s.masked_fill(~key_mask.to(s.device)[:, None, None, :], float("-inf"))


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                  compute_dtype: Optional[torch.dtype] = None,
                  key_mask: Optional[Tensor] = None, *, window: Optional[Tuple[int, int]] = None,
                  q_offset: int = 0, k_offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Differentiable reference. q: (B, Sq, Hq, D), k/v: (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) in
    q's dtype, lse (B, Hq, Sq) fp32 (natural log, -inf for rows that see no key).

    ``compute_dtype`` defaults to fp64 for fp64 inputs and fp32 otherwise. ``key_mask``: optional bool
    (B, Sk), False = key invisible to every query (any pattern, holes included). ``causal``, ``window``
    (left, right; -1 = unbounded), ``q_offset``, ``k_offset``: positional masks, as in the module doc
    (with offsets 0, causal is top-left aligned).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    qf = q.to(cd).transpose(1, 2)                                # (B, Hq, Sq, D)
    kf = _expand_kv(k, q.shape[2]).to(cd).transpose(1, 2)        # (B, Hq, Sk, D)
    vf = _expand_kv(v, q.shape[2]).to(cd).transpose(1, 2)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale          # (B, Hq, Sq, Sk)
    keep = visible(s.shape[-2], s.shape[-1], causal, window, q_offset, k_offset, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    s = _mask_keys(s, key_mask)
    lse = torch.logsumexp(s, dim=-1)                             # (B, Hq, Sq)
    # Rows with no visible key: weights 0 (not NaN), out 0, lse -inf.
    p = torch.exp(s - lse.unsqueeze(-1).nan_to_num(neginf=0.0)).nan_to_num(nan=0.0)
    out = torch.matmul(p, vf).transpose(1, 2)                    # (B, Sq, Hq, D)
    return out.to(q.dtype), lse.float()


class ReferenceBackend:
    """The reference as a backend (any device); backward by autograd through the reference."""

    name = "reference"
    supports_window = True  # window=(left, right) with q_offset / k_offset, as in the module doc

    def available(self, device: torch.device) -> bool:
        return True

    def forward(self, q, k, v, causal, scale, k_lens=None, window=None, q_offset=0, k_offset=0):
        km = None if k_lens is None else key_mask_from_lens(k_lens, k.shape[1])
        with torch.no_grad():
            return attention_ref(q, k, v, causal, scale, key_mask=km, window=window, q_offset=q_offset,
                                 k_offset=k_offset)

    def backward(self, dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None, k_lens=None,
                 window=None, q_offset=0, k_offset=0):
        # Block gradient from the *final* row statistics: P = exp(S - lse), D = rowsum(dout * out).
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        hq = q.shape[2]
        qf = q.to(cd).transpose(1, 2)
        kf = _expand_kv(k, hq).to(cd).transpose(1, 2)
        vf = _expand_kv(v, hq).to(cd).transpose(1, 2)
        do = dout.to(cd).transpose(1, 2)
        s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        keep = visible(s.shape[-2], s.shape[-1], causal, window, q_offset, k_offset, q.device)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        if k_lens is not None:
            s = _mask_keys(s, key_mask_from_lens(k_lens, k.shape[1]))
        p = torch.exp(s - lse.to(cd).unsqueeze(-1)).nan_to_num(nan=0.0)
        delta = (do * out.to(cd).transpose(1, 2)).sum(-1, keepdim=True)
        dvf = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta) * scale
        dqf = torch.matmul(ds, kf)
        dkf = torch.matmul(ds.transpose(-1, -2), qf)
        groups = hq // k.shape[2]
        b, _, sk, d = dkf.shape
        dkf = dkf.view(b, k.shape[2], groups, sk, d).sum(2)
        dvf = dvf.view(b, k.shape[2], groups, sk, d).sum(2)
        return _accumulate((dqf.transpose(1, 2), dkf.transpose(1, 2), dvf.transpose(1, 2)),
                           (dq, dk, dv), (q, k, v))


def _accumulate(grads, accs, like):
    """Add block grads into accumulators in place, or return them in their inputs' dtypes."""
    res = []
    for g, acc, x in zip(grads, accs, like):
        if acc is None:
            res.append(g.to(x.dtype))
        else:
            acc.add_(g)
            res.append(acc)
    return tuple(res)
