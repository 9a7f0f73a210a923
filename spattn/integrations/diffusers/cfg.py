"""CFG parallel for diffusers pipelines: ``parallelize_pipeline(pipe, mesh)`` runs the conditional and
unconditional transformer calls of classifier-free guidance at the same time on the two CFG halves.

    mesh = spattn.init_mesh(ulysses_degree=2, cfg_degree=2)       # 4 ranks: 2 branches x Ulysses 2
    handle = parallelize_pipeline(pipe, mesh)                      # every rank, same pipeline
    image = pipe(prompt, negative_prompt="blurry", true_cfg_scale=4.0).images[0]   # unchanged call
    handle.remove()

The pipeline is not modified: per denoising step it still calls the transformer twice, conditional
then unconditional (Qwen-Image and Flux true CFG, Wan ``guidance_scale``), and combines the two
outputs only after the second call returns. The two calls of a step form a pair:

    CFG rank 0 (first half):  call 1: compute (sequence-parallel over its half) -> return it
                              call 2: no compute; swap outputs over cfg_group -> return branch 1's
    CFG rank 1 (second half): call 1: no compute -> return an empty buffer
                              call 2: compute; swap outputs; fill call 1's buffer in place -> return its own

so each rank runs the transformer once per step, and both halves run at the same time. The buffer is
filled before the pipeline reads it (every supported pipeline reads the first output only to combine
it with the second). Whether a pipeline call uses CFG is decided from its arguments, with the
pipeline's own rule (``CFG_RULES``), before the denoising loop starts; a call without CFG on a CFG mesh
runs every transformer call on both halves (correct, no speedup) and says so: a warning and
``handle.last_run.idle_fraction == 0.5``. When the pipeline names its calls (``cache_context("cond")``
/ ``"uncond"``), the pairing is checked against those names.

The exchange is one all-gather over ``mesh.cfg_group`` of the transformer's (full) output per step:
``batch x latent tokens x channels`` elements, small next to the attention traffic.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import spattn

from .transformer import SPHandle, parallelize
from .vae import VAEHandle, parallelize_vae, vae_supported

Tensor = torch.Tensor

__all__ = ["parallelize_pipeline", "PipelineHandle", "RunInfo", "CFG_RULES"]

_HOOK_NAME = "spattn_cfg"


# ---------------------------------------------------------------------------------------------------
# When does a pipeline call use CFG: each pipeline's own rule, on its bound arguments
# ---------------------------------------------------------------------------------------------------

def _true_cfg(a: Dict[str, Any]) -> bool:
    # QwenImagePipeline: true_cfg_scale > 1 and a negative prompt (text or embeddings).
    has_neg = a.get("negative_prompt") is not None or a.get("negative_prompt_embeds") is not None
    return (a.get("true_cfg_scale") or 0) > 1 and has_neg


def _flux_true_cfg(a: Dict[str, Any]) -> bool:
    # FluxPipeline: as Qwen, but negative embeddings count only with their pooled twin.
    has_neg = a.get("negative_prompt") is not None or (
        a.get("negative_prompt_embeds") is not None and a.get("negative_pooled_prompt_embeds") is not None)
    return (a.get("true_cfg_scale") or 0) > 1 and has_neg


def _wan_cfg(a: Dict[str, Any]) -> bool:
    # WanPipeline.do_classifier_free_guidance: guidance_scale > 1.
    return (a.get("guidance_scale") or 0) > 1


# Pipeline class name prefix -> rule (first match along the MRO).
CFG_RULES: Dict[str, Callable[[Dict[str, Any]], bool]] = {
    "QwenImage": _true_cfg,
    "Flux": _flux_true_cfg,
    "Wan": _wan_cfg,
}


def _rule_for(pipe) -> Callable[[Dict[str, Any]], bool]:
    for cls in type(pipe).__mro__:
        for prefix, rule in CFG_RULES.items():
            if cls.__name__.startswith(prefix) and cls.__name__.endswith("Pipeline"):
                return rule
    raise TypeError(f"spattn parallelize_pipeline: {type(pipe).__name__} is not supported for CFG parallel; "
                    f"supported: {', '.join(p + '*Pipeline' for p in CFG_RULES)} "
                    f"(or parallelize(pipe.transformer, mesh) on a mesh without cfg_degree)")


# The full output of a transformer call, from its full ``hidden_states`` input: branch-1 ranks allocate
# it on the first call of a pair without running the model.
def _tokens_out(model, hs: Tensor) -> Tuple[int, ...]:
    return (*hs.shape[:-1], model.proj_out.out_features)        # (batch, tokens, p*p*out_channels)


def _video_out(model, hs: Tensor) -> Tuple[int, ...]:
    return (hs.shape[0], model.config.out_channels, *hs.shape[2:])  # (batch, C_out, frames, h, w)


_OUT_SHAPE: Dict[str, Callable[[Any, Tensor], Tuple[int, ...]]] = {
    "QwenImageTransformer2DModel": _tokens_out,
    "FluxTransformer2DModel": _tokens_out,
    "WanTransformer3DModel": _video_out,
}


# ---------------------------------------------------------------------------------------------------
# Per pipeline call bookkeeping
# ---------------------------------------------------------------------------------------------------

@dataclass
class RunInfo:
    """What one pipeline call did on this rank.

    Attributes:
        cfg: the call used classifier-free guidance (two transformer calls per step).
        calls: transformer calls the pipeline made.
        executions: transformer forward passes this rank ran (``calls / 2`` with CFG parallel).
        idle_fraction: share of the ranks that did no useful work (0.5 for a call without CFG on a
            ``cfg_degree=2`` mesh: the second half repeated the first half's work).
    """

    cfg: bool
    calls: int = 0
    executions: int = 0
    idle_fraction: float = 0.0


@dataclass
class _Pending:
    """First call of a pair: the tensor the pipeline holds (and, on CFG rank 0, what it computed)."""

    out: Tensor
    name: Optional[str]
    model: torch.nn.Module


def _context_name(hook) -> Optional[str]:
    ctx = getattr(getattr(hook, "_ctx", None), "_context", None)
    return getattr(ctx, "name", ctx) if ctx is not None else None


def _sample(output: Any) -> Tensor:
    """The denoiser output tensor from ``(out,)`` or ``Transformer2DModelOutput(sample=out)``."""
    return output[0] if isinstance(output, tuple) else output.sample


def _wrap(t: Tensor, return_dict: bool) -> Any:
    if not return_dict:
        return (t,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=t)


class PipelineHandle:
    """What ``parallelize_pipeline`` did to one pipeline; ``remove()`` undoes it.

    Attributes:
        mesh: the mesh; ``sp_handles``: the ``SPHandle`` of each parallelized transformer;
        executions: transformer forward passes this rank ran since ``parallelize_pipeline``;
        last_run: ``RunInfo`` of the latest pipeline call (``None`` before the first);
        vae: the ``VAEHandle`` when the VAE decodes patch-parallel (``vae=True``), else None.
    """

    def __init__(self, pipe, mesh: spattn.SPMesh, sp_handles: List[SPHandle]):
        self.pipe, self.mesh, self.sp_handles = pipe, mesh, sp_handles
        self.executions = 0
        self.last_run: Optional[RunInfo] = None
        self._run: Optional[RunInfo] = None
        self._pending: Optional[_Pending] = None
        self._undo: List[Callable[[], None]] = []
        self.vae: Optional[VAEHandle] = None

    # -- the pipeline call ------------------------------------------------------------------------
    def _begin(self, cfg: bool, device: Optional[torch.device]) -> None:
        if self.mesh.cfg_degree > 1:
            self._agree(cfg, device)
        self._run, self._pending = RunInfo(cfg=cfg), None

    def _agree(self, cfg: bool, device: Optional[torch.device]) -> None:
        """Both CFG halves must take the same decision, or they would wait on each other forever."""
        flags = torch.tensor([int(cfg), -int(cfg)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.mesh.cfg_group)
        if int(flags[0]) != -int(flags[1]):
            raise ValueError("spattn CFG parallel: the CFG halves disagree on whether this pipeline call uses "
                             "guidance (negative_prompt / true_cfg_scale / guidance_scale differ between ranks); "
                             "call the pipeline with the same arguments on every rank")

    def _end(self, ok: bool) -> None:
        run, pending = self._run, self._pending
        self._run, self._pending = None, None
        if run is None:
            return
        self.last_run = run
        if ok and pending is not None:
            raise RuntimeError("spattn CFG parallel: the pipeline made an odd number of transformer calls "
                               f"({run.calls}) in a call with classifier-free guidance; the last output of "
                               "the second CFG half was never filled. This pipeline does not call the "
                               "transformer as (conditional, unconditional) pairs; use a mesh without cfg_degree")
        if not run.cfg and self.mesh.cfg_degree > 1 and run.calls:
            run.idle_fraction = 1.0 - 1.0 / self.mesh.cfg_degree
            warnings.warn(f"spattn CFG parallel: this pipeline call used no classifier-free guidance, so the "
                          f"{self.mesh.cfg_degree} CFG halves repeated the same work: "
                          f"{run.idle_fraction:.0%} of the ranks were idle (pass a negative prompt with "
                          f"true_cfg_scale > 1 / guidance_scale > 1, or use a mesh without cfg_degree)",
                          stacklevel=3)

    # -- one transformer call ----------------------------------------------------------------------
    def _forward(self, hook, model, original, args, kwargs) -> Any:
        run = self._run
        if run is not None:
            run.calls += 1
        if run is None or not run.cfg or self.mesh.cfg_degree == 1:
            return self._execute(original, args, kwargs)
        name = _context_name(hook)
        return_dict = kwargs.get("return_dict", True)
        branch = self.mesh.cfg_rank
        pending = self._pending
        if pending is None:                                   # first call of a pair
            if name is not None and name != "cond":
                raise RuntimeError(f"spattn CFG parallel: expected the conditional call (cache_context 'cond') "
                                   f"to open a step, got {name!r}")
            if branch == 0:
                output = self._execute(original, args, kwargs)
                self._pending = _Pending(_sample(output), name, model)
                return output
            shape, dtype, device = hook.full_out
            buf = torch.empty(shape, dtype=dtype, device=device)   # filled at the second call
            self._pending = _Pending(buf, name, model)
            return _wrap(buf, return_dict)
        # second call of the pair
        self._pending = None
        if pending.model is not model or (name is not None and name == pending.name):
            raise RuntimeError("spattn CFG parallel: the second call of a CFG pair went to another model or "
                               f"the same cache_context ({name!r}); this pipeline's call order is not supported")
        if branch == 0:
            mine, output = pending.out, None
        else:
            output = self._execute(original, args, kwargs)
            mine = _sample(output)
        both = [torch.empty_like(mine) for _ in range(self.mesh.cfg_degree)]
        dist.all_gather(both, mine.contiguous(), group=self.mesh.cfg_group)
        if branch == 0:
            return _wrap(both[1], return_dict)
        if both[0].shape != pending.out.shape or both[0].dtype != pending.out.dtype:
            raise RuntimeError(f"spattn CFG parallel: {type(model).__name__} returned {tuple(both[0].shape)} "
                               f"{both[0].dtype}, expected {tuple(pending.out.shape)} {pending.out.dtype}; "
                               f"its output shape rule (_OUT_SHAPE) is wrong for this model")
        pending.out.copy_(both[0])        # the first call's output, which the pipeline still holds
        return output

    def _execute(self, original, args, kwargs) -> Any:
        self.executions += 1
        if self._run is not None:
            self._run.executions += 1
        return original(*args, **kwargs)

    # -- undo ---------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the pipeline and its transformers exactly. Idempotent."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        for h in self.sp_handles:
            h.remove()
        self.sp_handles = []
        if self.vae is not None:
            self.vae.remove()
            self.vae = None

    def __enter__(self) -> "PipelineHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _cfg_hook(handle: PipelineHandle):
    """A diffusers ModelHook around the transformer's forward (it composes with diffusers' cache hooks);
    stateful only so that ``cache_context`` hands it the call's name."""
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _CFGHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self._ctx = StateManager(BaseState)
            self.full_out: Optional[Tuple[Tuple[int, ...], torch.dtype, torch.device]] = None

        def new_forward(self, module, *args, **kwargs):
            return handle._forward(self, module, self.fn_ref.original_forward, args, kwargs)

        def reset_state(self, module):
            self._ctx.reset()
            return module

    return _CFGHook()


def _record_full_out(hook, model: torch.nn.Module):
    """Torch pre-hook run before the sequence split: the full output's shape, dtype and device."""
    shape_of = _OUT_SHAPE[next(c.__name__ for c in type(model).__mro__ if c.__name__ in _OUT_SHAPE)]

    def pre(mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, Tensor):
            hook.full_out = (shape_of(mod, hs), mod.proj_out.weight.dtype, hs.device)
        return None
    return pre


def _transformers_of(pipe) -> List[Tuple[str, torch.nn.Module]]:
    """The pipeline's denoisers: ``transformer`` and, for Wan 2.2, ``transformer_2``."""
    found = [(n, getattr(pipe, n, None)) for n in ("transformer", "transformer_2")]
    found = [(n, m) for n, m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise TypeError(f"spattn parallelize_pipeline: {type(pipe).__name__} has no transformer; pass a "
                        f"diffusers pipeline (Qwen-Image, Flux, Wan)")
    return found


def _guided_class(cls: type, handle: PipelineHandle, rule: Callable[[Dict[str, Any]], bool]) -> type:
    """A same-named subclass whose ``__call__`` decides CFG from the call's arguments first."""
    signature = inspect.signature(cls.__call__)

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        device = getattr(self, "_execution_device", None)
        if device is not None and handle.mesh.cfg_group is not None and dist.get_backend(handle.mesh.cfg_group) == "gloo":
            device = torch.device("cpu")
        handle._begin(bool(rule(bound.arguments)), device)
        ok = False
        try:
            result = super(sub, self).__call__(*args, **kwargs)
            ok = True
            return result
        finally:
            handle._end(ok)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return sub


def parallelize_pipeline(pipe, mesh: spattn.SPMesh, *, backend: str = "auto", vae: bool = False) -> PipelineHandle:
    """Parallelize a loaded diffusers pipeline's transformer(s) over ``mesh``, CFG included.

    Every rank calls ``pipe(...)`` as usual with the same arguments and gets the same result. Each
    transformer runs sequence-parallel over this rank's ``ulysses x ring`` part of the mesh
    (``parallelize``); with ``mesh.cfg_degree == 2`` the two calls of each guided denoising step run at
    the same time on the two CFG halves (see the module docstring). With ``cfg_degree == 1`` this is
    ``parallelize`` applied to each transformer of the pipeline.

    Args:
        pipe: a Qwen-Image, Flux or Wan pipeline (Wan 2.2's ``transformer_2`` included).
        mesh: ``spattn.init_mesh(ulysses_degree, ring_degree, cfg_degree=1 or 2)``.
        backend: attention backend for ``spattn.attention`` ("auto", "torch", "reference", "triton").
        vae: also decode with every SP rank (``parallelize_vae`` on ``pipe.vae``; on a CFG mesh each
            branch's ranks) when the VAE is supported and there is more than one SP rank; otherwise
            each rank decodes alone. ``handle.vae`` says which happened (a ``VAEHandle`` or None).

    Returns:
        a ``PipelineHandle``: ``remove()`` (or ``with``) restores everything; ``last_run`` tells whether
        the latest call used CFG, how many transformer passes this rank ran and which share of the
        ranks was idle.
    """
    if not isinstance(mesh, spattn.SPMesh):
        raise TypeError(f"parallelize_pipeline: mesh must be a spattn.SPMesh (spattn.init_mesh), got "
                        f"{type(mesh).__name__}")
    if mesh.cfg_degree > 2:
        raise ValueError(f"parallelize_pipeline: cfg_degree={mesh.cfg_degree}, but classifier-free guidance "
                         f"has two branches; use cfg_degree=2 (and the other ranks for ulysses/ring degrees)")
    models = _transformers_of(pipe)
    rule = _rule_for(pipe) if mesh.cfg_degree > 1 else None
    if getattr(pipe, "_spattn_cfg", False):
        raise ValueError("parallelize_pipeline: this pipeline is already parallelized; call remove() on its "
                         "handle first")
    for name, m in models:
        if mesh.cfg_degree > 1 and not any(c.__name__ in _OUT_SHAPE for c in type(m).__mro__):
            raise TypeError(f"parallelize_pipeline: CFG parallel supports {', '.join(sorted(_OUT_SHAPE))}; "
                            f"pipe.{name} is {type(m).__name__}")
    sp_handles: List[SPHandle] = []
    try:
        for _, m in models:
            sp_handles.append(parallelize(m, mesh, backend=backend))
    except BaseException:
        for h in sp_handles:
            h.remove()
        raise
    handle = PipelineHandle(pipe, mesh, sp_handles)
    pipe_vae = getattr(pipe, "vae", None)
    if vae and mesh.world_size > 1 and vae_supported(pipe_vae):
        try:
            handle.vae = parallelize_vae(pipe_vae, mesh, backend=backend)
        except BaseException:
            handle.remove()
            raise
    if mesh.cfg_degree == 1:
        return handle
    from diffusers.hooks.hooks import HookRegistry

    for _, m in models:
        hook = _cfg_hook(handle)
        registry = HookRegistry.check_if_exists_or_initialize(m)
        registry.register_hook(hook, _HOOK_NAME)
        pre = m.register_forward_pre_hook(_record_full_out(hook, m), prepend=True, with_kwargs=True)

        def undo(registry=registry, pre=pre):
            pre.remove()
            registry.remove_hook(_HOOK_NAME, recurse=False)
        handle._undo.append(undo)
    original_cls = type(pipe)
    pipe.__class__ = _guided_class(original_cls, handle, rule)
    pipe._spattn_cfg = True

    def restore_class():
        pipe.__class__ = original_cls
        del pipe._spattn_cfg
    handle._undo.append(restore_class)
    return handle
