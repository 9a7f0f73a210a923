"""torch.compile support: ``spattn.attention`` as opaque custom ops, so a model using it compiles with
``fullgraph=True`` (no graph break at the attention) and runs the very same eager code.

Why opaque ops: the eager path is an ``autograd.Function`` driving torch.distributed async
collectives with Python-side plans, which dynamo cannot trace. Under ``torch.compiler.is_compiling()``
``attention()`` hands over to ``traced_attention`` here, which calls two ``torch.library.custom_op``s:

- ``spattn::attention_fwd(q, k, v, jq?, jk?, jv?, jlens?, mesh_id, ...) -> [out, (joint_out), (lse,
  (joint_lse)), *saved]`` runs the eager
  ``attention()`` and returns, besides the output, what its backward needs (the tensors the autograd
  Function saved: the head-sharded q/k/v/out/LSE of each Ulysses pipeline chunk, or just the LSE for a
  ring). Shapes for tracing come from ``register_fake`` (the same head plan the eager path uses).
- ``spattn::attention_bwd(dout, djout?, q, k, v, jq?, jk?, jv?, jlens?, out, jout?, saved, ...) -> [dq, dk,
  dv, (djq, djk, djv)]`` runs the eager backward
  from those saved tensors: attention is never recomputed and nothing is re-exchanged. Cost over eager:
  the saved tensors are graph values instead of autograd-held ones (the same memory), plus a copy of
  any two that shared storage (the packed q/k/v of one all-to-all), since op outputs may not alias.

A mesh cannot be an op argument, so meshes get an integer id (a weak registry; the id is resolved
eagerly at trace time and guarded on, so another mesh recompiles). Other options are ints, floats,
bools and strings. Joint (text) tensors are op inputs too; their replicated-gradient all-reduce runs
inside the backward op. A text mask (``joint_mask``) is compacted in the traced graph by plain torch
ops without a host read (``attention._compact_joint`` under tracing: real keys gathered first, all
``text_len`` keys kept, so every shape is static) and reaches the ops as ``jlens``, int32 (batch,) key
counts; the gather's backward (scatter) is part of the graph. ``spattn.shard`` is plain slicing and
traces as is; ``spattn.gather`` (an all-gather) stays outside the compiled region.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch

from .attention import _check_joint_mask, _compact_joint
from .mesh import SPMesh
from .ulysses import head_plan, pipeline_plans

Tensor = torch.Tensor

__all__ = ["traced_attention"]

_MESHES: "weakref.WeakValueDictionary[int, SPMesh]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


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


def _plans(mesh: SPMesh) -> Dict[Tuple, list]:
    """The chunk plans of this mesh's compiled forward calls, by call signature, for their backward.
    Kept on the mesh (plans hold its process groups), so they go when the mesh goes."""
    return mesh.__dict__.setdefault("_spattn_compiled_plans", {})


def _slots(mesh: SPMesh, n_chunks: int, joint: bool) -> List[Optional[str]]:
    """Where each tensor the eager autograd Function saves (chunk-major, ``_SAVED_PER_CHUNK`` per
    chunk: q, k, v, out, lse, jq, jk, jv, t_out, t_lse) comes from in the custom ops: an op input
    ("q", "k", "v", "jq", "jk", "jv"), an op output ("out", "jout"), an extra op output ("new") or
    nothing (None). Ulysses saves head-sharded copies (all new); a ring of one saves its inputs."""
    if mesh.ulysses_degree == 1:
        return ["q", "k", "v", "out", "new"] + (["jq", "jk", "jv", "jout", "new"] if joint else [None] * 5)
    return (["new"] * 5 + (["new"] * 5 if joint else [None] * 5)) * n_chunks


def _saved_meta(q: Tensor, k: Tensor, jq: Optional[Tensor], mesh: SPMesh):
    """(slots, shape/dtype of each "new" slot): LSEs are fp32 (batch, heads, len); head-sharded
    tensors (batch, len, heads, head_dim) in the input's dtype, len = U * s (image) or T (text)."""
    b, s, hq, d = q.shape
    hkv, U = k.shape[2], mesh.ulysses_degree
    t = 0 if jq is None else jq.shape[1]
    f32 = torch.float32
    if U == 1:
        return _slots(mesh, 1, jq is not None), [((b, hq, s), f32)] + ([((b, hq, t), f32)] if jq is not None else [])
    from .attention import ulysses_chunks

    u, T, meta = mesh.ulysses_rank, U * s, []
    plans = pipeline_plans(head_plan(hq, hkv, U), ulysses_chunks())
    for p in plans:
        nq = p.q_ranges[u][1] - p.q_ranges[u][0]
        nkv = p.kv_ranges[u][1] - p.kv_ranges[u][0]
        meta += [((b, T, nq, d), q.dtype), ((b, T, nkv, d), k.dtype), ((b, T, nkv, d), k.dtype),
                 ((b, T, nq, d), q.dtype), ((b, nq, T), f32)]
        if jq is not None:
            meta += [((b, t, nq, d), q.dtype), ((b, t, nkv, d), k.dtype), ((b, t, nkv, d), k.dtype),
                     ((b, t, nq, d), q.dtype), ((b, nq, t), f32)]
    return _slots(mesh, len(plans), jq is not None), meta


def _fresh(outs: List[Tensor], inputs) -> List[Tensor]:
    """Contiguous op outputs that alias no input and no other output (the custom-op contract), copying
    only those that would (e.g. q, k, v received in one all-to-all buffer)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outs:
        t = t.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def _plan_key(q, k, jq, causal, scale, backend, seq_len, layout, strategy, ring_engine) -> Tuple:
    return (tuple(q.shape), tuple(k.shape), None if jq is None else tuple(jq.shape), q.dtype, q.device,
            causal, scale, backend, seq_len, layout, strategy, ring_engine)


@torch.library.custom_op("spattn::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, jq: Optional[Tensor], jk: Optional[Tensor],
                   jv: Optional[Tensor], jlens: Optional[Tensor], mesh_id: int, causal: bool,
                   scale: Optional[float], return_lse: bool, backend: str, seq_len: Optional[int], layout: str,
                   joint_strategy: str, ring_engine: Optional[str], save: bool) -> List[Tensor]:
    """[out, (joint_out), (lse, (joint_lse)), *saved]: spattn.attention's results, then (``save``)
    the tensors its backward needs that are neither inputs nor results. ``jlens``: the text mask as
    int32 (batch,) key counts, jk/jv already compacted (real keys first, full text length)."""
    from .attention import _attention

    mesh = _mesh(mesh_id)
    joint = jq is not None
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(save) for t in (q, k, v))
        js = [t.detach().requires_grad_(save) for t in (jq, jk, jv)] if joint else [None] * 3
        res = _attention(qd, kd, vd, mesh, causal=causal, softmax_scale=scale, return_lse=return_lse,
                         backend=backend, seq_len=seq_len, layout=layout, joint_q=js[0], joint_k=js[1],
                         joint_v=js[2], joint_strategy=joint_strategy, ring_engine=ring_engine,
                         joint_lens=jlens)
    outs = list(res) if isinstance(res, tuple) else [res]
    inputs = (q, k, v, jq, jk, jv, jlens)
    if not save:
        return _fresh(outs, inputs)
    # The eager autograd Function's context (out's grad_fn): its saved tensors and chunk plan.
    node = outs[0].grad_fn
    slots, meta = _saved_meta(q, k, jq, mesh)
    flat = node.saved_tensors
    if len(flat) != len(slots):
        raise RuntimeError(f"spattn.compile: the eager attention saved {len(flat)} tensors, expected {len(slots)}; "
                           "_slots is out of date with spattn.attention")
    new = [t for t, slot in zip(flat, slots) if slot == "new"]
    if [(tuple(t.shape), t.dtype) for t in new] != meta:
        raise RuntimeError("spattn.compile: the eager attention saved "
                           f"{[(tuple(t.shape), t.dtype) for t in new]}, expected {meta}; "
                           "_saved_meta is out of date with spattn.attention")
    _plans(mesh)[_plan_key(q, k, jq, causal, scale, backend, seq_len, layout, joint_strategy,
                     ring_engine)] = node.chunks
    return _fresh(outs + new, inputs)


@_attention_fwd.register_fake
def _(q, k, v, jq, jk, jv, jlens, mesh_id, causal, scale, return_lse, backend, seq_len, layout,
      joint_strategy, ring_engine, save):
    from .attention import _validate

    mesh = _mesh(mesh_id)
    joint = None if jq is None else (jq, jk, jv)
    seq_len = None if seq_len is None else int(seq_len)  # dynamic-int tracing: specialize (it sets the plan)
    _validate(q, k, v, mesh, causal, seq_len, layout, joint, joint_strategy)  # clear errors at compile time
    if jlens is not None and (joint is None or tuple(jlens.shape) != (q.shape[0],) or jlens.dtype != torch.int32):
        raise ValueError("spattn.compile: jlens must be int32 (batch,) and come with joint tensors")
    b, s, hq, _ = q.shape
    outs = [torch.empty_like(q)] + ([torch.empty_like(jq)] if joint else [])
    if return_lse:
        outs += [q.new_empty((b, hq, s), dtype=torch.float32)]
        outs += [q.new_empty((b, hq, jq.shape[1]), dtype=torch.float32)] if joint else []
    if save:
        outs += [q.new_empty(shape, dtype=dtype) for shape, dtype in _saved_meta(q, k, jq, mesh)[1]]
    return outs


@torch.library.custom_op("spattn::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, djout: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, jq: Optional[Tensor],
                   jk: Optional[Tensor], jv: Optional[Tensor], jlens: Optional[Tensor], out: Tensor,
                   jout: Optional[Tensor], saved: List[Tensor], mesh_id: int, causal: bool, scale: Optional[float],
                   backend: str, seq_len: Optional[int], layout: str, joint_strategy: str,
                   ring_engine: Optional[str]) -> List[Tensor]:
    """[dq, dk, dv, (djq, djk, djv)]: the eager backward from the saved tensors (no recomputation).
    djk/djv are for the compacted jk/jv (the traced gather scatters them home)."""
    from .attention import _Replicated, _SPAttention

    mesh = _mesh(mesh_id)
    joint = jq is not None
    chunks = _plans(mesh).get(_plan_key(q, k, jq, causal, scale, backend, seq_len, layout, joint_strategy,
                                  ring_engine))
    if chunks is None:
        raise RuntimeError("spattn.compile: backward of a compiled attention call whose forward was not run "
                           "in this process")
    # The text lengths come from this call's own saved input, not from the cached plan: two calls with
    # the same shapes share the plan key but may have different masks.
    chunks = [dataclasses.replace(ch, setup=dataclasses.replace(ch.setup, joint_lens=jlens)) for ch in chunks]
    slots = _slots(mesh, len(chunks), joint)
    named = dict(q=q, k=k, v=v, jq=jq, jk=jk, jv=jv, out=out, jout=jout)
    it = iter(saved)
    flat = tuple(None if slot is None else next(it) if slot == "new" else named[slot] for slot in slots)
    ctx = SimpleNamespace(chunks=chunks, saved_tensors=flat, shapes=(q.shape, k.shape), joint=joint)
    dt = None
    if joint:
        dt = djout.contiguous() if djout is not None else torch.zeros_like(jout)
        if mesh.ulysses_degree > 1:  # joint_out gathers heads from the Ulysses group: keep this rank's
            dt = dt[:, :, chunks[0].q_heads[0]:chunks[-1].q_heads[1]]
    grads = _SPAttention.backward(ctx, dout.contiguous(), None, dt, None)[1:]
    if not joint:
        return _fresh(list(grads[:3]), (dout, q, k, v, out, *saved))
    dj = grads[3:]
    if mesh.world_size > 1:  # joint tensors are replicated: the eager all-reduce of every rank's share
        dj = _Replicated.backward(SimpleNamespace(mesh=mesh), *dj)[1:]
    return _fresh(list(grads[:3]) + list(dj), (dout, djout, q, k, v, jq, jk, jv, jlens, out, jout, *saved))


@_attention_bwd.register_fake
def _(dout, djout, q, k, v, jq, jk, jv, jlens, out, jout, saved, mesh_id, causal, scale, backend, seq_len,
      layout, joint_strategy, ring_engine):
    return [torch.empty_like(t) for t in ((q, k, v) if jq is None else (q, k, v, jq, jk, jv))]


def _setup_context(ctx, inputs, output):
    q, k, v, jq, jk, jv, jlens, mesh_id, causal, scale, return_lse, backend, seq_len, layout, strategy, engine, _ = \
        inputs
    ctx.opts = (mesh_id, causal, scale, backend, seq_len, layout, strategy, engine)
    ctx.joint, ctx.masked = jq is not None, jlens is not None
    n_res = (2 if ctx.joint else 1) * (2 if return_lse else 1)
    ctx.n_res = n_res
    ctx.save_for_backward(*((jlens,) if ctx.masked else ()), q, k, v, *((jq, jk, jv) if ctx.joint else ()),
                          *output[:1 + ctx.joint], *output[n_res:])


def _backward(ctx, grads):
    t = list(ctx.saved_tensors)
    jlens = t.pop(0) if ctx.masked else None
    q, k, v = t[:3]
    jq, jk, jv = t[3:6] if ctx.joint else (None,) * 3
    rest = t[6:] if ctx.joint else t[3:]
    out, jout = (rest[0], rest[1]) if ctx.joint else (rest[0], None)
    saved = rest[1 + ctx.joint:]
    dout = grads[0] if grads[0] is not None else torch.zeros_like(out)
    djout = grads[1] if ctx.joint else None
    g = torch.ops.spattn.attention_bwd(dout, djout, q, k, v, jq, jk, jv, jlens, out, jout, saved, *ctx.opts)
    dj = tuple(g[3:]) if ctx.joint else (None,) * 3
    return (*g[:3], *dj) + (None,) * 11  # no gradient for jlens and the options


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def traced_attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                     seq_len: Optional[int] = None, layout: str = "contiguous",
                     joint_q: Optional[Tensor] = None, joint_k: Optional[Tensor] = None,
                     joint_v: Optional[Tensor] = None, joint_strategy: str = "front",
                     ring_engine: Optional[str] = None, joint_mask: Optional[Tensor] = None,
                     cu_seqlens: Optional[Tensor] = None, ring_impl: str = "auto", **newer):
    """``spattn.attention`` while dynamo traces (same arguments and results, see its docstring)."""
    if cu_seqlens is not None:  # not yet: the plan is built from the boundaries' values on the host
        newer = dict(newer, cu_seqlens=cu_seqlens)
    if ring_impl != "auto":  # not yet carried by the custom op; "auto" is resolved inside it
        newer = dict(newer, ring_impl=ring_impl)
    if any(x is not None for x in newer.values()):
        raise NotImplementedError(f"spattn.attention under torch.compile: {sorted(newer)} not supported yet; "
                                  "call attention outside the compiled region (torch.compiler.disable)")
    if not isinstance(mesh, SPMesh):
        raise TypeError(f"spattn.attention: mesh must be an SPMesh (from spattn.init_mesh), got {type(mesh).__name__}")
    if any(t is not None for t in (joint_q, joint_k, joint_v)) and any(t is None for t in (joint_q, joint_k, joint_v)):
        raise ValueError("spattn.attention: pass all of joint_q, joint_k, joint_v, or none of them")
    joint = None if joint_q is None else (joint_q, joint_k, joint_v)
    _check_joint_mask(joint_mask, joint, q)
    jlens = None
    if joint_mask is not None:  # traced: compacted K/V keep all T keys, the lengths do the masking
        joint_k, joint_v, jlens = _compact_joint(joint_mask, joint_k, joint_v)
    mesh_id = _register_mesh(mesh)  # a constant at trace time, not a (possibly dynamic) input
    if mesh._spattn_op_id != mesh_id:  # reading the attribute makes dynamo guard on it: another mesh recompiles
        raise RuntimeError("spattn: mesh id changed during tracing")
    tensors = (q, k, v, joint_q, joint_k, joint_v)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    scale = None if softmax_scale is None else float(softmax_scale)
    res = _attention_fwd(*tensors, jlens, mesh_id, bool(causal), scale, bool(return_lse), backend, seq_len,
                         layout, joint_strategy, ring_engine, save)
    n = (2 if joint_q is not None else 1) * (2 if return_lse else 1)
    return res[0] if n == 1 else tuple(res[:n])
