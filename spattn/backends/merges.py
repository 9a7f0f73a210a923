"""The registry of fused in-place merges ``fn(out, lse, blk_out, blk_lse)`` and the plain-torch one."""
from __future__ import annotations

from typing import Callable, Dict

import torch

Tensor = torch.Tensor


# Fused in-place merges that kernels provide (C++, Triton). They are
# registered here, in the backend layer, so a backend never imports ``ops`` (ops sits above it and
# falls back to its plain-torch merge when nothing registered accepts the tensors).
MERGES: Dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], None]] = {}
MERGE_ORDER: list = []  # (name, accepts) in registration order; the first that accepts wins under "auto"


def merge_torch_(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
    """The plain-torch in-place merge: ``ops.merge_ref``'s math, the two passes over the (large) output
    done in place. Here, beside the registry, so a fused merge can fall back to it without ``ops``."""
    new_lse = torch.logaddexp(lse, blk_lse)
    safe = new_lse.masked_fill(torch.isinf(new_lse), 0.0)
    w_a = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)      # (B, S, H, 1)
    w_b = torch.exp(blk_lse - safe).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_a).addcmul_(blk_out, w_b)
    lse.copy_(new_lse)


def register_merge(name: str, fn: Callable[[Tensor, Tensor, Tensor, Tensor], None],
                   accepts: Callable[[Tensor], bool]) -> None:
    """Register a fused in-place merge; ``accepts(out)`` says whether ``auto`` may use it for ``out``."""
    MERGES[name] = fn
    MERGE_ORDER[:] = [(n, a) for n, a in MERGE_ORDER if n != name] + [(name, accepts)]


