"""The one op: ``spattn::attention`` (+ its backward op), a ``torch.library.custom_op`` with its fake
and its autograd, called by eager ``spattn.attention`` and by compiled graphs alike (flash-attn's model).

    spattn::attention_fwd(q, k, v, joint=[jq, jk, jv] or [], jlens?, cu_seqlens?, ids=[mesh, options, grads, seq_len])
        -> [out, (joint_out), (lse, (joint_lse)), *saved]
    spattn::attention_bwd(dout, djout?, inputs=[q, k, v, jq?, jk?, jv?, out, jout?, *saved],
        jlens?, cu_seqlens?, ids) -> [dq, dk, dv, (djq, djk, djv)]

Inside, the forward validates into an ``AttnCall`` (``call.build_call``), runs the cross-rank check,
takes the plan from the mesh's cache and runs ``hybrid.forward``; the backward runs
``hybrid.backward`` from the saved tensors: attention is never recomputed and nothing but gradients
is exchanged. ``saved`` holds only what is neither an input nor a result (``hybrid.saved_slots``);
the fake kernel returns their shapes from the same call (``hybrid.new_saved_meta``), so eager and
compiled runs share every line.

A mesh and the options cannot be op arguments: they are interned to ints (``ids``), resolved at
trace time (``torch.compiler.assume_constant_result``) so another mesh or other options recompile.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import check
from ..call import AttnCall, Inputs, Options, build_call, grad_bits
from ..mesh import SPMesh
from . import hybrid

Tensor = torch.Tensor

__all__ = ["run", "options_id", "mesh_id"]

_MESHES: "weakref.WeakValueDictionary[int, SPMesh]" = weakref.WeakValueDictionary()
_OPTIONS: Dict[int, Options] = {}
_OPTION_IDS: Dict[Options, int] = {}


def _constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)``: dynamo calls ``fn`` at trace time and bakes the
    result in. Marked the way that decorator marks it, because calling it imports torch._dynamo (and
    triton), which ``import spattn`` must not (test_compile fails if the mark ever stops working)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def mesh_id(mesh: SPMesh) -> int:
    """The mesh's op id (a weak registry: the op never keeps a mesh alive)."""
    if not isinstance(mesh, SPMesh):
        raise TypeError(f"spattn.attention: mesh must be an SPMesh (from spattn.init_mesh), got {type(mesh).__name__}")
    _MESHES.setdefault(mesh.op_id, mesh)
    return mesh.op_id


@_constant_result
def options_id(**kw) -> int:
    """The id of ``Options(**kw)`` (interned: equal options, one id, kept for the process)."""
    opts = Options(**kw)
    try:
        i = _OPTION_IDS.get(opts)
    except TypeError:  # an unhashable value (a list where a number belongs): name it
        bad = {k: v for k, v in kw.items() if getattr(type(v), "__hash__", None) is None}
        raise TypeError(f"spattn.attention: options must be numbers, strings, bools or None, got {bad}") from None
    if i is None:
        i = _OPTION_IDS[opts] = len(_OPTION_IDS) + 1
        _OPTIONS[i] = opts
    return i


def _resolve(ids: Sequence[int]) -> Tuple[SPMesh, Options, int]:
    """ids = [mesh id, options id, grad mask, seq_len (-1: None)(, joint: backward only)]. seq_len
    travels apart from the options: under torch.compile it may be a dynamic int (then it specializes
    here, where the plan is made from it)."""
    mesh = _MESHES.get(ids[0])
    if mesh is None:
        raise RuntimeError(f"spattn: mesh {ids[0]} of a compiled attention call no longer exists; keep the "
                           f"SPMesh alive while a compiled model uses it")
    opts = _OPTIONS[ids[1]]
    seq_len = int(ids[3])
    if seq_len >= 0:
        opts = _with(opts, seq_len=seq_len)
    return mesh, opts, ids[2]


def _with(obj, **kw):
    from dataclasses import replace
    return replace(obj, **kw)


def _call(x: Inputs, ids: Sequence[int], memo: bool = True) -> AttnCall:
    """The validated call of these inputs. Validation reads only metadata (and the documents), so a
    call seen before with equal metadata is reused (forward and backward of one call meet twice)."""
    mesh, opts, grad_mask = _resolve(ids)
    if not memo or x.cu_seqlens is not None:  # tracing (shapes may be symbolic); documents are values
        return build_call(x, mesh, opts, grad_mask)
    key = (tuple(ids[:4]),) + tuple(None if t is None else (t.shape, t.dtype, t.device) for t in x[:7])
    # below autograd: the caller's requires_grad bits come in ids
    return mesh.call_for(key, lambda: build_call(x, mesh, opts, grad_mask))


def _saves(grad_mask: int) -> bool:
    return bool(grad_mask >> 6 & 1) and bool(grad_mask & 63)


def _fresh(outs: List[Tensor], inputs: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Contiguous op outputs that alias no input and no other output (the custom-op contract),
    copying only those that would (e.g. an LSE that is both a result and saved)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outs:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def _inputs(q, k, v, joint, jlens, cu_seqlens) -> Inputs:
    jq, jk, jv = joint if joint else (None, None, None)
    return Inputs(q, k, v, jq, jk, jv, jlens, cu_seqlens)


@torch.library.custom_op("spattn::attention_fwd", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, joint: List[Tensor], jlens: Optional[Tensor],
                  cu_seqlens: Optional[Tensor], ids: List[int]) -> List[Tensor]:
    x = _inputs(q, k, v, joint, jlens, cu_seqlens)
    call = _call(x, ids)
    check.check_across_ranks(call, x)
    res, saved, n_chunks = check.run_guarded(call.mesh, "forward", _run_forward, call, x)
    if not _saves(ids[2]):
        return _fresh(res, x)
    slots = hybrid.saved_slots(call, n_chunks)
    new = [t for t, slot in zip(saved, slots) if slot == "new"]
    if len(saved) != len(slots) or len(new) != len(hybrid.new_saved_meta(call)):
        raise RuntimeError(f"spattn: the strategy saved {len(saved)} tensors ({len(new)} new), its slot map says "
                           f"{len(slots)}: hybrid.saved_slots is out of date with hybrid.forward")
    return _fresh(res + new, x)


def _run_forward(call: AttnCall, x: Inputs):
    """The communicating part of the forward (``check.run_guarded`` runs it: its frame, which holds
    the plan and so the groups, is gone when a failure is reported)."""
    plan = call.mesh.plan_for(call, hybrid.build_plan).with_lens(x.jlens)
    res, saved = hybrid.forward(plan, call, x)
    return res, saved, len(plan.chunks)


@_attention_op.register_fake
def _(q, k, v, joint, jlens, cu_seqlens, ids):
    x = _inputs(q, k, v, joint, jlens, None)  # documents are read at run time; shapes do not depend on them
    call = _call(x, ids, memo=False)  # clear errors at compile time
    b, s, hq, _ = q.shape
    outs = [torch.empty_like(q)] + ([torch.empty_like(joint[0])] if joint else [])
    if call.opts.return_lse:
        outs += [q.new_empty((b, hq, s), dtype=torch.float32)]
        outs += [q.new_empty((b, hq, joint[0].shape[1]), dtype=torch.float32)] if joint else []
    if _saves(ids[2]):
        outs += [q.new_empty(shape, dtype=dtype) for shape, dtype in hybrid.new_saved_meta(call)]
    return outs


@torch.library.custom_op("spattn::attention_bwd", mutates_args=())
def _attention_backward_op(dout: Tensor, djout: Optional[Tensor], inputs: List[Tensor], jlens: Optional[Tensor],
                           cu_seqlens: Optional[Tensor], ids: List[int]) -> List[Tensor]:
    """[dq, dk, dv, (djq, djk, djv)]; djk/djv are for the compacted joint K/V (the gather scatters them home)."""
    q, k, v = inputs[:3]
    n_joint = 3 if _joint_of(inputs, ids) else 0
    joint = list(inputs[3:3 + n_joint])
    x = _inputs(q, k, v, joint, jlens, cu_seqlens)
    call = _call(x, ids)
    grads = check.run_guarded(call.mesh, "backward", _run_backward, call, x, inputs[3 + n_joint:], dout, djout)
    return _fresh(grads, (dout, djout, *inputs, jlens))


def _run_backward(call: AttnCall, x: Inputs, rest: Sequence[Tensor], dout: Tensor, djout: Optional[Tensor]):
    """The communicating part of the backward (run by ``check.run_guarded``, as ``_run_forward``)."""
    plan = call.mesh.plan_for(call, hybrid.build_plan).with_lens(x.jlens)
    q, k, v, joint = x.q, x.k, x.v, x.jq is not None
    named = dict(q=q, k=k, v=v, out=rest[0])
    if joint:
        named.update(jq=x.jq, jk=x.jk, jv=x.jv, jout=rest[1])
    saved = _unpack_saved(call, plan, named, iter(rest[1 + bool(joint):]))
    dt = None
    if joint:
        dt = djout.contiguous() if djout is not None else torch.zeros_like(named["jout"])
    return hybrid.backward(plan, call, saved, dout.contiguous(), dt)


def _joint_of(inputs: Sequence[Tensor], ids: Sequence[int]) -> bool:
    """Whether the backward's inputs carry joint tensors (the flag setup_context appends to ids)."""
    return bool(ids[4]) if len(ids) > 4 else False


def _unpack_saved(call: AttnCall, plan: "hybrid.Plan", named: Dict[str, Tensor], new) -> List[Optional[Tensor]]:
    """The strategy's saved list from the op's tensors, by ``hybrid.saved_slots``."""
    flat: List[Optional[Tensor]] = []
    slots = hybrid.saved_slots(call, len(plan.chunks))
    for i, slot in enumerate(slots):
        if slot is None:
            flat.append(None)
        elif slot == "new":
            flat.append(next(new))
        elif slot.endswith("/h"):  # a joint input sliced by this chunk's heads
            ch = plan.chunks[i // hybrid.SAVED_PER_CHUNK]
            lo, hi = ch.q_heads if slot == "jq/h" else ch.kv_heads
            flat.append(named[slot[:2]][:, :, lo:hi])
        else:
            flat.append(named[slot])
    return flat


@_attention_backward_op.register_fake
def _(dout, djout, inputs, jlens, cu_seqlens, ids):
    n = 6 if _joint_of(inputs, ids) else 3
    return [torch.empty_like(t) for t in inputs[:n]]


def _setup_context(ctx, inputs, output):
    q, k, v, joint, jlens, cu_seqlens, ids = inputs
    mesh, opts, grad_mask = _resolve(ids)
    ctx.ids = list(ids) + [1 if joint else 0]
    n_res = (2 if joint else 1) * (2 if opts.return_lse else 1)
    ctx.n_res, ctx.joint = n_res, bool(joint)
    if mesh.ulysses_degree == 1:  # a ring keeps q, k, v themselves (its backward reads them)
        qkv = [q, k, v]
    else:  # Ulysses keeps head-sharded copies: q, k, v are only needed for their shapes
        qkv = [t.new_empty((1,)).expand(t.shape) for t in (q, k, v)]
    saved = qkv + list(joint) + list(output[:1 + bool(joint)]) + list(output[n_res:])
    ctx.save_for_backward(jlens, cu_seqlens, *saved)
    if opts.return_lse:
        ctx.mark_non_differentiable(*output[1 + bool(joint):n_res])


def _autograd_backward(ctx, grads):
    jlens, cu_seqlens, *inputs = ctx.saved_tensors
    dout = grads[0] if grads[0] is not None else torch.zeros_like(inputs[3 + 3 * ctx.joint])
    djout = grads[1] if ctx.joint else None
    g = torch.ops.spattn.attention_bwd(dout, djout, inputs, jlens, cu_seqlens, ctx.ids)
    return g[0], g[1], g[2], (list(g[3:]) if ctx.joint else []), None, None, None


_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def run(x: Inputs, mesh: SPMesh, opts_id: int, seq_len: Optional[int] = None) -> List[Tensor]:
    """The op's results: [out, (joint_out), (lse, (joint_lse))], then what backward needs."""
    grad_mask = grad_bits(x)
    joint = [x.jq, x.jk, x.jv] if x.jq is not None else []
    mid = mesh_id(mesh)  # a constant at trace time, not a (possibly dynamic) input
    if mesh.op_id != mid:  # reading the attribute makes dynamo guard on it: another mesh recompiles
        raise RuntimeError("spattn: mesh id changed during tracing")
    ids = [mid, opts_id, grad_mask, -1 if seq_len is None else seq_len]
    return torch.ops.spattn.attention_fwd(x.q, x.k, x.v, joint, x.jlens, x.cu_seqlens, ids)
