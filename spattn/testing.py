"""The test utilities that tests/ and ``spattn doctor --selftest`` share: one tolerance rule per dtype,
the references it is measured against, and the padded-row check of sharded results.

The rule (flash-attention's): a result's max error against an fp64 reference may be at most twice the
error of torch's own SDPA in the same dtype, plus a rounding floor relative to the reference's
magnitude; fp32 must match to ~1e-5. LSE is fp32 in every dtype, so it has a fixed relative bound.

Not imported by ``import spattn``; uses only the public API and the reference backend.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from spattn.backends.reference import attention_ref

Tensor = torch.Tensor
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Rounding floor, relative to max(|reference|, 1), added to 2x SDPA's error (plus 1e-6 absolute).
FLOOR: Dict[str, float] = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
# LSE bound, relative to max(|reference LSE|, 1): LSE is accumulated in fp32 for every input dtype.
LSE_FLOOR: Dict[str, float] = {"fp32": 2e-5, "fp16": 2e-2, "bf16": 2e-2}

# name -> (max error vs the fp64 reference, SDPA's own max error, max |reference|)
ErrorTable = Dict[str, Tuple[float, float, float]]


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "fp16" or "bf16" for a torch dtype (fp64 counts as fp32: the tightest rule)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    if dtype == torch.float64:
        return "fp32"
    raise ValueError(f"no tolerance rule for {dtype}; use one of {sorted(DTYPES)}")


def tolerance(dtype: str, sdpa_err: float, ref_max: float, lse: bool = False) -> float:
    """The largest max-abs error allowed for a result whose reference has magnitude ``ref_max`` and on
    which SDPA in ``dtype`` errs by ``sdpa_err`` (both against fp64)."""
    scale = max(ref_max, 1.0)
    if lse:
        return LSE_FLOOR[dtype] * scale
    return 2 * sdpa_err + FLOOR[dtype] * scale + 1e-6


def max_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| in fp64 over the finite entries of ``ref``; where ``ref`` is +-inf (an LSE row
    that sees no key) ``a`` must equal it, else the error is infinite. NaN in ``a`` is infinite too."""
    a, ref = a.detach().double(), ref.detach().double().to(a.device)
    fin = torch.isfinite(ref)
    if torch.isnan(a).any() or not torch.equal(a[~fin], ref[~fin]):
        return float("inf")
    return (a[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def rel_err(a: Tensor, ref: Tensor) -> float:
    """``max_err`` relative to max |ref| (for whole-model outputs whose scale varies)."""
    ref_fin = ref.detach().double()
    ref_fin = ref_fin[torch.isfinite(ref_fin)]
    return max_err(a, ref) / max(ref_fin.abs().max().item() if ref_fin.numel() else 0.0, 1e-30)


def error_table(got: Mapping[str, Tensor], ref: Mapping[str, Tensor],
                base: Mapping[str, Optional[Tensor]]) -> ErrorTable:
    """Per result name: (our error, SDPA's error, max |reference|), against the fp64 ``ref``. ``base``
    holds SDPA's results in the tested dtype (None for LSE, which SDPA does not return)."""
    out: ErrorTable = {}
    for name, t in got.items():
        r = ref[name].detach().double()
        b = base.get(name)
        fin = r[torch.isfinite(r)]
        out[name] = (max_err(t, r), 0.0 if b is None else max_err(b, r),
                     fin.abs().max().item() if fin.numel() else 0.0)
    return out


def tolerance_misses(res: Mapping[str, Tuple[float, float, float]], dtype: str) -> List[str]:
    """One line per result outside ``tolerance`` (empty: all within)."""
    bad = []
    for name, (err, base, scale) in res.items():
        tol = tolerance(dtype, base, scale, lse=name.startswith("lse"))
        if not err <= tol:
            bad.append(f"{name}: err {err:.3g} > tol {tol:.3g} (sdpa err {base:.3g}, |ref| {scale:.3g})")
    return bad


def assert_within_tolerance(res: Mapping[str, Tuple[float, float, float]], dtype: str, label) -> None:
    """``res``: name -> (error vs fp64, SDPA's error, max |reference|); fail listing every miss."""
    bad = tolerance_misses(res, dtype)
    assert not bad, f"{label}:\n" + "\n".join(bad)


def sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
         key_mask: Optional[Tensor] = None) -> Tensor:
    """torch's SDPA in the inputs' dtype, in spattn's layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D),
    ``key_mask`` bool (B, Sk) (True = visible) -> out (B, Sq, Hq, D). GQA by repeating K/V heads
    (older torch versions lack ``enable_gqa``)."""
    hq, hkv = q.shape[2], k.shape[2]
    if hq != hkv:
        k, v = (x.repeat_interleave(hq // hkv, dim=2) for x in (k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal, scale=scale)
    return o.transpose(1, 2)


def references(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool = False,
               scale: Optional[float] = None) -> Tuple[Dict[str, Tensor], Dict[str, Optional[Tensor]]]:
    """(fp64 reference, SDPA in the inputs' dtype) of out, lse, dq, dk, dv for ``loss = (out * dout).sum()``,
    both from the same (already rounded) inputs. Shapes as in ``sdpa``; lse (B, Hq, Sq)."""
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = attention_ref(*r, causal=causal, scale=scale)
    ro.backward(dout.double())
    ref = {"out": ro.detach(), "lse": rlse.detach(), "dq": r[0].grad, "dk": r[1].grad, "dv": r[2].grad}
    s = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    so = sdpa(*s, causal=causal, scale=scale)
    so.backward(dout)
    base = {"out": so.detach(), "lse": None, "dq": s[0].grad, "dk": s[1].grad, "dv": s[2].grad}
    return ref, base


def padded_rows(mesh, seq: int, kw: dict) -> Optional[Tensor]:
    """bool (local_len,): this rank's padded positions when ``seq`` tokens are sharded with ``kw``
    (seq_len, layout, ...), or None when the shards hold no padding."""
    import spattn

    if spattn.local_seq_len(seq, mesh, kw.get("layout", "contiguous")) * mesh.world_size <= seq:
        return None
    return spattn.shard(torch.ones(1, seq), mesh, **kw)[0] == 0


def gather_checked(mesh, seq: int, kw: dict, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                   dv: Tensor) -> Dict[str, Tensor]:
    """Assert this rank's padded positions are zero output, -inf lse and zero gradient, then gather
    out, dq, dk, dv (B, S_local, H, D) and lse (B, H, S_local) to full tensors."""
    import spattn

    named: Sequence[Tuple[str, Tensor]] = (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))
    mask = padded_rows(mesh, seq, kw)
    if mask is not None:
        mask = mask.to(out.device)
        for name, t in named:
            assert (t[:, mask] == 0).all(), f"padded rows of {name} are not zero"
        assert torch.isneginf(lse[:, :, mask]).all(), "padded rows of lse are not -inf"
    got = {n: spattn.gather(t.detach(), mesh, **kw) for n, t in named}
    got["lse"] = spattn.gather(lse, mesh, dim=2, **kw)
    return got
