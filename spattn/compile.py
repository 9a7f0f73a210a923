"""torch.compile support: ``spattn.attention`` as opaque custom ops, so a model using it compiles with
``fullgraph=True`` (no graph break at the attention) and runs the very same eager code.

Why opaque ops: the eager path is an ``autograd.Function`` driving torch.distributed async
collectives with Python-side plans, which dynamo cannot trace. Under ``torch.compiler.is_compiling()``
``attention()`` hands over to ``traced_attention`` here, which calls two ``torch.library.custom_op``s:

- ``spattn::attention_fwd(q, k, v, mesh_id, ...) -> [out, (lse), *saved]`` runs the eager
  ``attention()`` and returns, besides the output, what its backward needs (the tensors the autograd
  Function saved: the head-sharded q/k/v/out/LSE of each Ulysses pipeline chunk, or just the LSE for a
  ring). Shapes for tracing come from ``register_fake`` (the same head plan the eager path uses).
- ``spattn::attention_bwd(dout, q, k, v, out, saved, ...) -> [dq, dk, dv]`` runs the eager backward
  from those saved tensors: attention is never recomputed and nothing is re-exchanged. Cost over eager:
  the saved tensors are graph values instead of autograd-held ones (the same memory), plus a copy of
  any two that shared storage (the packed q/k/v of one all-to-all), since op outputs may not alias.

A mesh cannot be an op argument, so meshes get an integer id (a weak registry; the id is resolved
eagerly at trace time and guarded on, so another mesh recompiles). Other options are ints, floats,
bools and strings. ``spattn.shard`` is plain slicing and traces as is; ``spattn.gather`` (an
all-gather) stays outside the compiled region. Joint (text) tensors are not supported under compile.
"""
from __future__ import annotations

import itertools
import weakref
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch

from .mesh import SPMesh
from .ulysses import head_plan, pipeline_plans

Tensor = torch.Tensor

__all__ = ["traced_attention"]

_MESHES: "weakref.WeakValueDictionary[int, SPMesh]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)
# Chunk plans of forward calls, for their backward: (mesh_id, call signature) -> chunks.
_PLANS: Dict[Tuple, list] = {}


@torch.compiler.assume_constant_result
def _register_mesh(mesh: SPMesh) -> int:
    i = mesh.__dict__.get("_spattn_op_id")
    if i is None:
        i = mesh._spattn_op_id = next(_IDS)
        _MESHES[i] = mesh
    return i


def _mesh(mesh_id: int) -> SPMesh:
    mesh = _MESHES.get(mesh_id)
    if mesh is None:
        raise RuntimeError(f"spattn: mesh {mesh_id} of a compiled attention call no longer exists; keep the "
                           f"SPMesh alive while a compiled model uses it")
    return mesh


def _kwargs(causal, scale, backend, seq_len, layout, ring_engine) -> dict:
    return dict(causal=causal, softmax_scale=scale, backend=backend, seq_len=seq_len, layout=layout,
                ring_engine=ring_engine)


def _saved_meta(q: Tensor, k: Tensor, mesh: SPMesh) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """Shapes/dtypes of the tensors the eager autograd Function saves that are not op inputs or the
    output: the LSE (batch, heads, seq) for a ring of one chunk; per Ulysses chunk the head-sharded
    q, k, v (batch, U*s, h, D), its out and its LSE (batch, h, U*s), fp32."""
    b, s, hq, d = q.shape
    hkv, U = k.shape[2], mesh.ulysses_degree
    if U == 1:
        return [((b, hq, s), torch.float32)]
    from .attention import ulysses_chunks

    u, T, meta = mesh.ulysses_rank, U * s, []
    for p in pipeline_plans(head_plan(hq, hkv, U), ulysses_chunks()):
        nq = p.q_ranges[u][1] - p.q_ranges[u][0]
        nkv = p.kv_ranges[u][1] - p.kv_ranges[u][0]
        meta += [((b, T, nq, d), q.dtype), ((b, T, nkv, d), k.dtype), ((b, T, nkv, d), k.dtype),
                 ((b, T, nq, d), q.dtype), ((b, nq, T), torch.float32)]
    return meta


def _fresh(outs: List[Tensor], inputs) -> List[Tensor]:
    """Contiguous op outputs that alias no input and no other output (the custom-op contract), copying
    only those that would (e.g. q, k, v received in one all-to-all buffer)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    result = []
    for t in outs:
        t = t.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def _plan_key(mesh_id, q, k, causal, scale, backend, seq_len, layout, ring_engine) -> Tuple:
    return (mesh_id, tuple(q.shape), tuple(k.shape), q.dtype, q.device, causal, scale, backend, seq_len, layout,
            ring_engine)


@torch.library.custom_op("spattn::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mesh_id: int, causal: bool, scale: Optional[float],
                   return_lse: bool, backend: str, seq_len: Optional[int], layout: str,
                   ring_engine: Optional[str], save: bool) -> List[Tensor]:
    from .attention import attention

    mesh = _mesh(mesh_id)
    kw = _kwargs(causal, scale, backend, seq_len, layout, ring_engine)
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(save) for t in (q, k, v))
        res = attention(qd, kd, vd, mesh, return_lse=return_lse, **kw)
    out, lse = (res if return_lse else (res, None))
    outs = [out.detach()] + ([lse.detach()] if return_lse else [])
    if not save:
        return [t.contiguous() for t in outs]
    node = out.grad_fn  # the eager autograd Function's context: its saved tensors and chunk plan
    saved = [t for t in node.saved_tensors if t is not None]
    if mesh.ulysses_degree == 1:
        saved = saved[4:5]  # q, k, v are the op inputs, out is output 0: only the LSE is new
    meta = _saved_meta(q, k, mesh)
    if [(tuple(t.shape), t.dtype) for t in saved] != meta:
        raise RuntimeError("spattn.compile: the eager attention saved "
                           f"{[(tuple(t.shape), t.dtype) for t in saved]}, expected {meta}; "
                           "_saved_meta is out of date with spattn.attention")
    _PLANS[_plan_key(mesh_id, q, k, causal, scale, backend, seq_len, layout, ring_engine)] = node.chunks
    return _fresh(outs + saved, (q, k, v))


@_attention_fwd.register_fake
def _(q, k, v, mesh_id, causal, scale, return_lse, backend, seq_len, layout, ring_engine, save):
    from .attention import _validate

    mesh = _mesh(mesh_id)
    _validate(q, k, v, mesh, causal, seq_len, layout, None, "front")  # clear errors at compile time
    b, s, hq, _ = q.shape
    outs = [torch.empty_like(q)] + ([q.new_empty((b, hq, s), dtype=torch.float32)] if return_lse else [])
    if save:
        outs += [q.new_empty(shape, dtype=dtype) for shape, dtype in _saved_meta(q, k, mesh)]
    return outs


@torch.library.custom_op("spattn::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, saved: List[Tensor], mesh_id: int,
                   causal: bool, scale: Optional[float], backend: str, seq_len: Optional[int], layout: str,
                   ring_engine: Optional[str]) -> List[Tensor]:
    from .attention import _SAVED_PER_CHUNK, _SPAttention

    mesh = _mesh(mesh_id)
    chunks = _PLANS.get(_plan_key(mesh_id, q, k, causal, scale, backend, seq_len, layout, ring_engine))
    if chunks is None:
        raise RuntimeError("spattn.compile: backward of a compiled attention call whose forward was not run "
                           "in this process")
    pad = (None,) * (_SAVED_PER_CHUNK - 5)  # the joint slots: unused (no joint tensors under compile)
    if mesh.ulysses_degree == 1:
        flat = (q, k, v, out, saved[0]) + pad
    else:
        flat = tuple(x for c in range(0, len(saved), 5) for x in tuple(saved[c:c + 5]) + pad)
    ctx = SimpleNamespace(chunks=chunks, saved_tensors=flat, shapes=(q.shape, k.shape), joint=False)
    grads = _SPAttention.backward(ctx, dout.contiguous(), None, None, None)
    return _fresh(grads[1:4], (dout, q, k, v, out, *saved))


@_attention_bwd.register_fake
def _(dout, q, k, v, out, saved, mesh_id, causal, scale, backend, seq_len, layout, ring_engine):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup_context(ctx, inputs, output):
    q, k, v, mesh_id, causal, scale, return_lse, backend, seq_len, layout, ring_engine, save = inputs
    ctx.opts = (mesh_id, causal, scale, backend, seq_len, layout, ring_engine)
    ctx.n_lse = int(return_lse)
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grads):
    q, k, v, out, *rest = ctx.saved_tensors
    saved = rest[ctx.n_lse:]
    dout = grads[0] if grads[0] is not None else torch.zeros_like(out)
    dq, dk, dv = torch.ops.spattn.attention_bwd(dout, q, k, v, out, saved, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def traced_attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                     seq_len: Optional[int] = None, layout: str = "contiguous",
                     joint_q: Optional[Tensor] = None, joint_k: Optional[Tensor] = None,
                     joint_v: Optional[Tensor] = None, joint_strategy: str = "front",
                     ring_engine: Optional[str] = None, **unsupported):
    """``spattn.attention`` while dynamo traces (same arguments and results, see its docstring)."""
    if joint_q is not None or joint_k is not None or joint_v is not None or \
            any(x is not None for x in unsupported.values()):
        raise NotImplementedError("spattn.attention under torch.compile: joint (text) tensors and joint_mask are "
                                  "not supported yet; call it outside the compiled region "
                                  "(torch.compiler.disable) or run eagerly")
    if not isinstance(mesh, SPMesh):
        raise TypeError(f"spattn.attention: mesh must be an SPMesh (from spattn.init_mesh), got {type(mesh).__name__}")
    _register_mesh(mesh)
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    scale = None if softmax_scale is None else float(softmax_scale)
    res = _attention_fwd(q, k, v, mesh._spattn_op_id, bool(causal), scale, bool(return_lse), backend, seq_len,
                         layout, ring_engine, save)
    return (res[0], res[1]) if return_lse else res[0]
