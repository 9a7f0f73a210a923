"""Attention backends: the single-device contract every strategy builds on.

A backend computes block attention *with its log-sum-exp* and the matching backward. Contract
(all strategies rely on exactly this, nothing more):

``forward(q, k, v, causal, scale) -> (out, lse)``
    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim) with
    ``heads_q % heads_kv == 0`` (GQA/MQA: query head h reads kv head ``h // (heads_q // heads_kv)``).
    out: like q, same dtype. lse: (batch, heads_q, seqlen_q), fp32, natural log; ``-inf`` for a
    row that sees no key (its out row is 0). ``causal`` is top-left aligned: query i sees key j iff
    j <= i (the ring only issues causal blocks with seqlen_q == seqlen_k).

``backward(dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None) -> (dq, dk, dv)``
    Gradients of one block given the *final* (merged) out and lse of the rows, so a ring can call it
    block by block. dk/dv have the kv head count. If accumulators are passed (any float dtype, fp32 in
    the ring) the block's gradients are added into them in place and they are returned.

Optional key lengths (joint text masks): both take a keyword ``k_lens``, an int32 (batch,) tensor on
q's device, or None. Keys ``j >= k_lens[b]`` of batch element b get exactly zero weight (and exactly
zero dk/dv); a row whose keys are all masked gets out 0, lse -inf, as above. Strategies pass it only
when set, so a third-party backend without it still serves every unmasked call.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol, Tuple

import torch

Tensor = torch.Tensor


class Backend(Protocol):
    name: str

    def available(self, device: torch.device) -> bool: ...

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                k_lens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]: ...

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 causal: bool, scale: float, dq: Optional[Tensor] = None, dk: Optional[Tensor] = None,
                 dv: Optional[Tensor] = None, k_lens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]: ...


_REGISTRY: Dict[str, Callable[[], Backend]] = {}
_INSTANCES: Dict[str, Backend] = {}
# Preference order for backend="auto", per device type. "auto" picks only kernels that have been
# checked on the device kind: on CUDA that is torch's own fused kernels. The Triton kernels are
# opt-in (backend="triton") until they pass `spattn doctor --selftest` on a real GPU (none has run
# them yet); then "triton" goes first here and TRITON_GPU_VERIFIED records the GPU and versions.
_AUTO_ORDER = {"cuda": ("torch", "reference"), "cpu": ("torch", "reference")}
TRITON_GPU_VERIFIED = None  # e.g. "H100 80GB, torch 2.x, triton 3.x: selftest PASS (date)"


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend factory; it is instantiated lazily on first use."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def available_backends() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``name`` ("auto" or a registered name) for tensors on ``device``."""
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch", "reference")):
            if cand not in _REGISTRY:
                continue
            try:
                be = _instance(cand)
            except ImportError:  # optional dependency (e.g. triton) not installed
                continue
            if be.available(device):
                return be
        raise RuntimeError(f"spattn: no attention backend available for device {device}")
    if name not in _REGISTRY:
        raise ValueError(f"spattn: unknown backend {name!r}; choose one of {('auto',) + available_backends()}")
    be = _instance(name)
    if not be.available(device):
        raise RuntimeError(f"spattn: backend {name!r} is not available for device {device}; "
                           f"use backend='auto' or one of {available_backends()}")
    return be


def _instance(name: str) -> Backend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


# Fused in-place merges that kernels provide (C++, Triton) register in .merges (a backend module
# imports that, never this package); re-exported here for ops and callers.
from .merges import MERGE_ORDER, MERGES, merge_torch_, register_merge  # noqa: E402


def _register_builtin() -> None:
    from . import reference, torch_backend

    register_backend("reference", reference.ReferenceBackend)
    register_backend("torch", torch_backend.TorchBackend)

    def _triton():
        from .triton_backend import TritonBackend  # imported lazily: triton is optional
        return TritonBackend()

    register_backend("triton", _triton)


_register_builtin()
