"""Sequence-parallel diffusers transformers on spattn: ``parallelize(transformer, mesh)``.

    mesh = spattn.init_mesh(ulysses_degree=2, ring_degree=2)       # after init_process_group
    handle = parallelize(pipe.transformer, mesh)                   # every rank, same model and inputs
    image = pipe(prompt).images[0]                                 # the pipeline is unchanged
    handle.remove()                                                # the model is exactly as before

Every rank calls the model with the same full inputs; the model returns the full output on every
rank. In between, each rank holds only its shard of the image (video) tokens:

    full inputs --split hooks: image tokens, their RoPE table, per-token inputs--> local tokens
      --every self/joint attention: spattn.attention(local q/k/v, joint=text, joint_mask)-->
      --gather hook on the final projection--> full output on every rank

Per model this is a small declarative ``ModelPlan`` (in the spirit of diffusers' ``_cp_plan``): which
forward inputs and outputs hold image tokens (and along which dim), which module's output to gather,
which attention modules get a spattn processor. One generic mechanism applies a plan with torch
forward hooks and ``set_processor`` and undoes it in ``remove()``; weights and model code are never
touched. Text is not sharded: in MMDiT models (Qwen-Image, Flux) it enters ``spattn.attention`` as
joint tokens, so its attention work is done once, not per rank; Wan's cross-attention to text
needs nothing (its queries are already local, its keys are the full text).

Image token counts that the mesh does not divide (Qwen-Image at 1328x1328: 6889 tokens) are padded
by ``spattn.shard``; ``seq_len`` tells ``spattn.attention`` which keys are padding (they get zero
weight) and ``spattn.gather`` drops the padded rows.

Gradients (training, e.g. LoRA): one convention, the one data-parallel wrappers assume. The output is
the same on every rank, so is the loss computed from it; every rank's parameter gradients are such
that their *mean* over the ranks is the single-process gradient (the gather's backward scales this
rank's slice by the mesh size: each rank's gradient is ``world_size`` x its share). So averaging over
every rank holding a replica of the parameters gives the right gradient, whether it is DDP, FSDP2's
``fully_shard``, accelerate, or ``handle.all_reduce_grads(params)`` in a plain loop, and with data
parallelism around the mesh too (DP x SP ranks: the average over all of them is the mean over the DP
batches of the single-process gradients). Trainable modules *outside* the transformer obey the same
rule: one feeding it (a text-embedding adapter, ControlNet residuals) holds world_size x its share,
one after it (a head on the output) the full gradient; both average right. ``all_reduce_grads()``
without ``params`` reduces only the transformer's parameters and refuses to run when the last call's
inputs required grad (trainable modules upstream would stay partial): pass them all.
Tensors replicated on every rank (text, timestep embeddings) carry per-rank shares of their gradient:
the text output of the joint attention sums its incoming shares (one all-reduce, backward only)
before spattn's backward, which wants the full gradient, and the joint q/k/v gradients spattn
returns (full on every rank) are split back into equal shares.

Caches (``transformer.enable_cache(...)``, before or after ``parallelize``): first-block cache
works exactly: its skip/compute decision is taken on the statistic reduced over the mesh (the
sums of |residual change| and |previous residual| over every rank's real image tokens), so every
rank decides the same and the output equals the single-process cached run. The other caches
(PyramidAttentionBroadcast, FasterCache, TaylorSeer, MagCache, SeaCache, TextKVCache) are refused
at ``parallelize`` / ``enable_cache`` time with the cache named.

Supported: diffusers 0.36 - 0.42 (tested with 0.42.1). Fused QKV projections, IP-adapter processors,
attention masks other than Qwen-Image's text mask and diffusers' own context parallelism are
refused with an error naming the fix.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

import spattn

Tensor = torch.Tensor

__all__ = ["parallelize", "SPHandle", "ModelPlan", "Split", "PLANS", "supported_models"]


# ---------------------------------------------------------------------------------------------------
# Plans: model surgery as data
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Shard a tensor's image tokens along ``dim``; tensors with another ``ndim`` pass unchanged
    (an input that only sometimes holds per-token values, like Wan's 2-D timestep)."""

    dim: int
    ndim: Optional[int] = None


@dataclass(frozen=True)
class ModelPlan:
    """Where a model's image tokens enter, where they leave, which attention runs on spattn.

    Module paths are dotted names under the transformer ("" is the transformer itself, "*" every child).
    """

    inputs: Dict[str, Dict[str, Split]]      # module path -> forward argument name -> how to shard it
    outputs: Dict[str, Dict[int, Split]]     # module path -> output index -> how to shard it (RoPE tables)
    gather: Tuple[str, int]                  # (module path, dim): its output is the full result
    processors: Dict[str, Tuple[str, Callable[["_State"], Any]]]  # attention path -> (original class, factory)
    text_len: Optional[Tuple[str, int]] = None  # root input whose length along dim is the joint text length


@dataclass
class _State:
    """What the hooks of one parallelized model share during a forward call."""

    mesh: spattn.SPMesh
    backend: str
    seq_len: Optional[int] = None    # global image token count of the current call
    text_len: Optional[int] = None   # joint text length of the current call (Flux single blocks)
    bool_mask: Optional[Tuple[Tensor, Any, Tensor]] = None  # (source mask, its version, bool copy)
    inputs_need_grad: bool = False   # the last call's inputs came from trainable modules upstream

    def as_bool(self, mask: Tensor) -> Tensor:
        """The text mask as bool, converted once per call: every layer then hands spattn the same
        tensor, whose host-side summary spattn caches (one sync per forward, not one per layer)."""
        if mask.dtype == torch.bool or torch.compiler.is_compiling():
            return mask.to(torch.bool)
        try:
            version = mask._version
        except RuntimeError:  # inference-mode tensors have no version counter: identity only
            version = None
        cached = self.bool_mask
        if cached is not None and cached[0] is mask and cached[1] == version:
            return cached[2]
        converted = mask.to(torch.bool)
        self.bool_mask = (mask, version, converted)
        return converted

    def record(self, n: int, where: str) -> None:
        if self.seq_len is None:
            self.seq_len = n
        elif n != self.seq_len:
            raise ValueError(f"spattn.integrations.diffusers: {where} has {n} image tokens but this call's "
                             f"image sequence has {self.seq_len}; the plan's inputs must describe one sequence")


# ---------------------------------------------------------------------------------------------------
# Gradient shares of replicated tensors (see the module docstring)
# ---------------------------------------------------------------------------------------------------

class _SumShares(torch.autograd.Function):
    """Identity; backward sums the per-rank gradient shares over the mesh (full gradient everywhere)."""

    @staticmethod
    def forward(ctx, x: Tensor, mesh: spattn.SPMesh) -> Tensor:
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        for grp in ctx.mesh.groups():
            dist.all_reduce(g, group=grp)
        return g, None


class _ScaleGrad(torch.autograd.Function):
    """Identity; backward multiplies the gradient by ``factor`` (the gathered output's convention)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


class _SplitShares(torch.autograd.Function):
    """Identity; backward turns a full gradient (the same on every rank) into equal per-rank shares."""

    @staticmethod
    def forward(ctx, x: Tensor, world: int) -> Tensor:
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g / ctx.world, None


# ---------------------------------------------------------------------------------------------------
# Attention processors: each mirrors the named diffusers processor up to its dispatch call
# ---------------------------------------------------------------------------------------------------

class _Processor:
    """Base of the swapped processors: projections etc. as in the model, attention on spattn."""

    _attention_backend = None   # read by diffusers' backend checks; we never dispatch
    _parallel_config = None

    def __init__(self, state: _State):
        self.state = state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, joint: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
               joint_mask: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """q/k/v: (batch, local image tokens, heads, head_dim); joint: text (batch, text, heads, head_dim),
        in front of the image as in every model here. Returns out (and the text output)."""
        st = self.state
        if st.seq_len is None:
            raise RuntimeError("spattn.integrations.diffusers: attention ran outside a call of the parallelized "
                               "transformer (its image sequence length is unknown); call the transformer itself")
        if joint is None:
            return spattn.attention(q, k, v, st.mesh, seq_len=st.seq_len, backend=st.backend)
        train = torch.is_grad_enabled() and st.mesh.world_size > 1
        if train:
            joint = tuple(_SplitShares.apply(t, st.mesh.world_size) for t in joint)
        if joint_mask is not None:
            joint_mask = st.as_bool(joint_mask)
        out, t_out = spattn.attention(q, k, v, st.mesh, seq_len=st.seq_len, backend=st.backend,
                                      joint_q=joint[0], joint_k=joint[1], joint_v=joint[2],
                                      joint_strategy="front", joint_mask=joint_mask)
        return out, (_SumShares.apply(t_out, st.mesh) if train else t_out)


class _QwenDoubleStream(_Processor):
    """Mirrors diffusers' QwenDoubleStreamAttnProcessor2_0: [text, image] joint attention."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 encoder_hidden_states_mask: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image joint attention takes encoder_hidden_states and no attention_mask "
                             "(pass encoder_hidden_states_mask)")
        d = attn.inner_dim // attn.heads
        q, k, v = (f(hidden_states).unflatten(-1, (-1, d)) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (f(encoder_hidden_states).unflatten(-1, (-1, d))
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q, k = _norm(attn.norm_q, q), _norm(attn.norm_k, k)
        tq, tk = _norm(attn.norm_added_q, tq), _norm(attn.norm_added_k, tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb          # img_freqs: this rank's rows (split hook)
            q, k = (apply_rotary_emb_qwen(t, img_freqs, use_real=False) for t in (q, k))
            tq, tk = (apply_rotary_emb_qwen(t, txt_freqs, use_real=False) for t in (tq, tk))
        out, t_out = self.attend(q, k, v, (tq, tk, tv), encoder_hidden_states_mask)
        out = attn.to_out[0](out.flatten(2, 3))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out, attn.to_add_out(t_out.flatten(2, 3))


class _FluxJointOrSingle(_Processor):
    """Mirrors diffusers' FluxAttnProcessor. Double blocks: image hidden_states + text
    encoder_hidden_states. Single blocks: hidden_states is [text, local image] (the block concatenates)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("spattn.integrations.diffusers: Flux attention_mask is not supported")
        d = attn.head_dim
        q, k, v = (f(hidden_states).unflatten(-1, (-1, d)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            tq, tk, tv = (f(encoder_hidden_states).unflatten(-1, (-1, d))
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = (torch.cat(p, dim=1) for p in ((tq, q), (tk, k), (tv, v)))
            n_text = encoder_hidden_states.shape[1]
        else:
            n_text = self.state.text_len
        if image_rotary_emb is not None:   # the table covers [text, this rank's image tokens]
            q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
        out, t_out = self.attend(q[:, n_text:], k[:, n_text:], v[:, n_text:],
                                 (q[:, :n_text], k[:, :n_text], v[:, :n_text]))
        out, t_out = out.flatten(2, 3), t_out.flatten(2, 3)
        if encoder_hidden_states is None:
            return torch.cat([t_out, out], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(t_out)


class _WanSelf(_Processor):
    """Mirrors diffusers' WanAttnProcessor for self-attention (attn1: no text, RoPE)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, rotary_emb: Optional[Tuple[Tensor, Tensor]] = None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("spattn.integrations.diffusers: Wan self-attention takes no encoder states or mask")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _wan_rope(q, *rotary_emb), _wan_rope(k, *rotary_emb)
        out = self.attend(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Wan's interleaved rotation (defined inline in WanAttnProcessor.__call__, so not importable).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _norm(norm: Optional[torch.nn.Module], x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


# ---------------------------------------------------------------------------------------------------
# The plans of the supported models
# ---------------------------------------------------------------------------------------------------

_TOKENS = Split(1, ndim=3)   # (batch, image tokens, channels)

PLANS: Dict[str, ModelPlan] = {
    "QwenImageTransformer2DModel": ModelPlan(
        inputs={"": {"hidden_states": _TOKENS, "controlnet_block_samples": _TOKENS},
                "transformer_blocks.*": {"modulate_index": Split(1, ndim=2)}},   # zero_cond_t models
        outputs={"pos_embed": {0: Split(0)}},                 # (vid_freqs (S, d/2), txt_freqs)
        gather=("proj_out", 1),
        processors={"transformer_blocks.*.attn": ("QwenDoubleStreamAttnProcessor2_0", _QwenDoubleStream)},
    ),
    "FluxTransformer2DModel": ModelPlan(
        inputs={"": {"hidden_states": _TOKENS, "img_ids": Split(-2),     # img_ids (S, 3) or legacy (B, S, 3)
                     "controlnet_block_samples": _TOKENS, "controlnet_single_block_samples": _TOKENS}},
        outputs={},                                           # the RoPE table is built from the local img_ids
        gather=("proj_out", 1),
        processors={"transformer_blocks.*.attn": ("FluxAttnProcessor", _FluxJointOrSingle),
                    "single_transformer_blocks.*.attn": ("FluxAttnProcessor", _FluxJointOrSingle)},
        text_len=("encoder_hidden_states", 1),
    ),
    "WanTransformer3DModel": ModelPlan(
        inputs={"": {"timestep": Split(1, ndim=2)},           # Wan 2.2 per-token timesteps (batch, S)
                "blocks.0": {"hidden_states": _TOKENS}},      # after the 3-D patch embedding
        outputs={"rope": {0: Split(1), 1: Split(1)}},         # cos, sin: (1, S, 1, head_dim)
        gather=("proj_out", 1),
        processors={"blocks.*.attn1": ("WanAttnProcessor", _WanSelf)},   # attn2 (cross) stays local
    ),
}


def supported_models() -> List[str]:
    return sorted(PLANS)


# ---------------------------------------------------------------------------------------------------
# The generic mechanism
# ---------------------------------------------------------------------------------------------------

def _modules_at(root: torch.nn.Module, path: str) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) for a dotted path where "*" stands for every child."""
    found = [("", root)]
    for atom in path.split(".") if path else []:
        nxt = []
        for name, m in found:
            kids = list(m.named_children()) if atom == "*" else \
                [(atom, getattr(m, atom))] if isinstance(getattr(m, atom, None), torch.nn.Module) else []
            nxt += [(f"{name}.{k}" if name else k, c) for k, c in kids]
        found = nxt
    if not found:
        raise ValueError(f"spattn.integrations.diffusers: {type(root).__name__} has no module {path!r}; "
                         f"this diffusers version is not supported by the plan")
    return found


def _split_value(x: Any, spec: Split, state: _State, where: str) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_split_value(t, spec, state, where) for t in x)
    if not isinstance(x, Tensor) or (spec.ndim is not None and x.dim() != spec.ndim):
        return x
    state.record(x.shape[spec.dim], where)
    return spattn.shard(x, state.mesh, dim=spec.dim)


def _input_hook(specs: Dict[str, Split], module: torch.nn.Module, state: _State, where: str):
    params = list(inspect.signature(module.forward).parameters)   # bound method: no self

    def hook(mod, args, kwargs):
        args = list(args)
        for name, spec in specs.items():
            if name in kwargs:
                kwargs[name] = _split_value(kwargs[name], spec, state, f"{where}({name})")
            elif name in params and params.index(name) < len(args):
                i = params.index(name)
                args[i] = _split_value(args[i], spec, state, f"{where}({name})")
        return tuple(args), kwargs
    return hook


def _output_hook(specs: Dict[int, Split], state: _State, where: str):
    def hook(mod, args, output):
        out = list(output)
        for i, spec in specs.items():
            out[i] = _split_value(out[i], spec, state, f"{where}[{i}]")
        return type(output)(out)
    return hook


def _gather_hook(dim: int, state: _State):
    def hook(mod, args, output):
        world = state.mesh.world_size
        if world > 1 and torch.is_grad_enabled() and output.requires_grad:
            # The loss on the replicated output counts once per rank; scaling this rank's slice by the
            # mesh size makes the *mean* of the ranks' gradients the single-process one, which is what
            # DDP, FSDP and accelerate compute (see the module docstring).
            output = _ScaleGrad.apply(output, float(world))
        return spattn.gather(output, state.mesh, dim=dim, seq_len=state.seq_len)
    return hook


def _any_requires_grad(values) -> bool:
    for v in values:
        if isinstance(v, Tensor) and v.requires_grad:
            return True
        if isinstance(v, (list, tuple)) and _any_requires_grad(v):
            return True
    return False


_SAME_INPUTS_HINT = ("every rank must call the pipeline with the same prompt, size and seed: pass a generator "
                     "seeded the same on every rank (generator=torch.Generator(device).manual_seed(seed))")


def _begin_hook(plan: ModelPlan, state: _State):
    """First pre-hook on the transformer: a new call, a new image sequence."""
    params = None

    def hook(mod, args, kwargs):
        nonlocal params
        state.seq_len, state.text_len, state.bool_mask = None, None, None
        state.inputs_need_grad = torch.is_grad_enabled() and _any_requires_grad([*args, *kwargs.values()])
        params = params or list(inspect.signature(mod.forward).parameters)
        # Every rank must enter with the same full inputs (a per-rank seed silently mixes images):
        # their digests are compared by the first attention call, an error naming them on every rank.
        named = {**{params[i]: a for i, a in enumerate(args) if i < len(params)}, **kwargs}
        spattn.verify_identical(state.mesh, {n: t for n, t in named.items() if isinstance(t, Tensor)},
                                hint=_SAME_INPUTS_HINT)
        if plan.text_len is not None:
            name, dim = plan.text_len
            x = kwargs.get(name, args[params.index(name)] if params.index(name) < len(args) else None)
            state.text_len = None if x is None else x.shape[dim]
        return None
    return hook


# ---------------------------------------------------------------------------------------------------
# diffusers caches: first-block cache decided on the mesh-wide statistic, the others refused
# ---------------------------------------------------------------------------------------------------

_FBC_HEAD = "fbc_leader_block_hook"
# hook name prefix -> the cache config users know it by (diffusers.hooks)
_REFUSED_CACHES = {"pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
                   "faster_cache": "FasterCacheConfig", "taylorseer_cache": "TaylorSeerCacheConfig",
                   "mag_cache": "MagCacheConfig", "sea_cache": "SeaCacheConfig", "text_kv_cache": "TextKVCacheConfig"}


def _hooks_of(model: torch.nn.Module):
    """(module, hook name, hook) of every diffusers hook under ``model``."""
    for m in model.modules():
        reg = getattr(m, "_diffusers_hook", None)
        for name, hook in (getattr(reg, "hooks", None) or {}).items():
            yield m, name, hook


def _refuse_cache(name: str) -> None:
    raise ValueError(f"spattn.integrations.diffusers: {name} is not supported on a sequence-parallel transformer "
                     f"(its cached values or decisions would differ between the ranks' shards); use "
                     f"FirstBlockCacheConfig, which is exact here, or disable_cache() before parallelize")


def _check_caches(model: torch.nn.Module) -> List[Any]:
    """The first-block-cache head hooks to make mesh-wide; raises for any other cache."""
    heads = []
    for _, name, hook in _hooks_of(model):
        for prefix, config in _REFUSED_CACHES.items():
            if name.startswith(prefix):
                _refuse_cache(config)
        if name == _FBC_HEAD:
            heads.append(hook)
    return heads


def _mesh_wide_decision(hook: Any, state: _State) -> Callable[[Tensor], bool]:
    """first-block cache's decision (relative mean change of the first block's residual > threshold)
    on the statistic over the whole sequence: one all-reduce of two sums, the same result on every rank.
    Rows past the global length (padding of the contiguous shard) are left out."""

    @torch.compiler.disable
    def should_compute(residual: Tensor) -> bool:
        prev = hook.state_manager.get_state().head_block_residual
        if prev is None:
            return True
        mesh, n = state.mesh, residual.shape[1]
        if state.seq_len is not None:   # contiguous shards of ceil(S / W) rows; the tail rows are padding
            n = max(0, min(n, state.seq_len - mesh.sp_rank * n))
        sums = torch.stack([(residual[:, :n] - prev[:, :n]).abs().sum(), prev[:, :n].abs().sum()]).double()
        for g in mesh.groups():
            dist.all_reduce(sums, group=g)
        return bool((sums[0] / sums[1]).item() > hook.threshold)

    return should_compute


class SPHandle:
    """What ``parallelize`` did to one transformer; ``remove()`` undoes it."""

    def __init__(self, model: torch.nn.Module, mesh: spattn.SPMesh, plan: ModelPlan):
        self.model, self.mesh, self.plan = model, mesh, plan
        self._hooks: List[Any] = []
        self._processors: List[Tuple[torch.nn.Module, Any]] = []
        self._state: Optional[_State] = None
        self._fbc_heads: List[Any] = []   # first-block-cache head hooks whose decision we replaced

    def _adopt_caches(self) -> None:
        """Give every first-block-cache head hook the mesh-wide decision (refusing other caches)."""
        for hook in _check_caches(self.model):
            if hook not in self._fbc_heads:
                hook._should_compute_remaining_blocks = _mesh_wide_decision(hook, self._state)
                self._fbc_heads.append(hook)

    def _enable_cache(self, config: Any) -> None:
        """The model's ``enable_cache`` while parallelized: refuse what cannot be exact, then adopt."""
        name = type(config).__name__
        if name != "FirstBlockCacheConfig" and name in _REFUSED_CACHES.values():
            _refuse_cache(name)
        type(self.model).enable_cache(self.model, config)
        self._adopt_caches()

    def remove(self) -> None:
        """Restore the model exactly: hooks removed, original processors back. Idempotent."""
        for h in self._hooks:
            h.remove()
        for m, proc in self._processors:
            m.set_processor(proc)
        for hook in self._fbc_heads:   # back to diffusers' own (per-process) decision
            hook.__dict__.pop("_should_compute_remaining_blocks", None)
        if self.model.__dict__.get("enable_cache") == self._enable_cache:
            del self.model.enable_cache
        self._hooks, self._processors, self._fbc_heads = [], [], []

    def all_reduce_grads(self, params: Optional[Iterable[torch.nn.Parameter]] = None,
                         group: Optional[dist.ProcessGroup] = None) -> None:
        """Average gradients over the ranks (in place) so each holds the single-process gradient.

        Args:
            params: every trainable parameter, including those of modules outside the transformer
                (an adapter feeding it, a head after it). Default: the transformer's own, which is
                refused when the last call's inputs required grad (their modules would stay partial).
            group: the ranks to average over. Default: the mesh. With data parallelism around the
                mesh, pass the group of every DP x SP rank (e.g. ``dist.group.WORLD``).

        What DDP / FSDP do for you; one all-reduce per group and gradient dtype.
        """
        if params is None:
            if self._state is not None and self._state.inputs_need_grad:
                raise ValueError(
                    "SPHandle.all_reduce_grads: the transformer's inputs required grad in the last call, so "
                    "trainable modules outside it hold partial gradients too; pass them all: "
                    "all_reduce_grads(params=[p for m in (transformer, adapter) for p in m.parameters()])")
            params = self.model.parameters()
        groups = [group] if group is not None else self.mesh.groups()
        size = 1
        for g in groups:
            size *= dist.get_world_size(g)
        if size == 1:
            return
        by_dtype: Dict[torch.dtype, List[Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():   # one flat buffer per dtype
            flat = torch.cat([g.reshape(-1) for g in grads])
            for grp in groups:
                dist.all_reduce(flat, group=grp)
            flat /= size
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))

    def __enter__(self) -> "SPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _plan_for(model: torch.nn.Module) -> ModelPlan:
    for cls in type(model).__mro__:
        if cls.__name__ in PLANS:
            return PLANS[cls.__name__]
    raise TypeError(f"spattn.integrations.diffusers.parallelize: {type(model).__name__} is not supported; "
                    f"supported models: {', '.join(supported_models())}")


def parallelize(transformer: torch.nn.Module, mesh: spattn.SPMesh, *, backend: str = "auto") -> SPHandle:
    """Run ``transformer`` sequence-parallel over ``mesh``: call it as usual on every rank with the same
    full inputs; it returns the full output on every rank.

    Args:
        transformer: a diffusers ``QwenImageTransformer2DModel``, ``FluxTransformer2DModel`` or
            ``WanTransformer3DModel`` (possibly inside a pipeline: ``pipe.transformer``), or
            ``torch.compile`` of one (the model inside is parallelized; the compiled one retraces).
        mesh: the ``spattn.SPMesh`` (Ulysses x Ring) of the ranks that share the work.
        backend: single-device attention kernel for ``spattn.attention`` ("auto", "torch", "reference",
            "triton").

    Returns:
        an ``SPHandle``: ``remove()`` restores the model; ``all_reduce_grads(params)`` averages
        gradients over the mesh after a backward pass, for loops without DDP/FSDP (see the module docstring).
    """
    if not isinstance(mesh, spattn.SPMesh):
        raise TypeError(f"parallelize: mesh must be a spattn.SPMesh (spattn.init_mesh), got {type(mesh).__name__}")
    # torch.compile(model) wraps the model; hooks and processors go on the model itself, and the
    # compiled wrapper retraces when they change (its guards see them), so both orders work.
    if type(transformer).__name__ == "OptimizedModule" and isinstance(getattr(transformer, "_orig_mod", None),
                                                                     torch.nn.Module):
        transformer = transformer._orig_mod
    plan = _plan_for(transformer)
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError("parallelize: diffusers' own parallelism is enabled on this model; use one or the other")
    _check_caches(transformer)
    state = _State(mesh, backend)

    # Check everything before changing anything.
    swaps = []
    for path, (orig_cls, factory) in plan.processors.items():
        for name, m in _modules_at(transformer, path):
            proc = m.processor
            if isinstance(proc, _Processor):
                raise ValueError(f"parallelize: {type(transformer).__name__} is already parallelized "
                                 f"(call remove() on its handle first)")
            if type(proc).__name__ != orig_cls:
                raise ValueError(f"parallelize: {name} uses {type(proc).__name__}; spattn replaces {orig_cls} "
                                 f"only (reset it with set_default_attn_processor() or remove the adapter)")
            if getattr(m, "fused_projections", False):
                raise ValueError(f"parallelize: {name} has fused QKV projections; call "
                                 f"transformer.unfuse_qkv_projections() first")
            swaps.append((m, proc, factory))
    targets = [(m, specs, f"{type(transformer).__name__}.{n or 'forward'}")
               for path, specs in plan.inputs.items() for n, m in _modules_at(transformer, path)]
    out_targets = [(m, specs, n) for path, specs in plan.outputs.items() for n, m in _modules_at(transformer, path)]
    ((_, gather_mod),) = _modules_at(transformer, plan.gather[0])

    handle = SPHandle(transformer, mesh, plan)
    handle._state = state
    handle._hooks.append(transformer.register_forward_pre_hook(_begin_hook(plan, state), with_kwargs=True))
    for m, specs, where in targets:
        handle._hooks.append(m.register_forward_pre_hook(_input_hook(specs, m, state, where), with_kwargs=True))
    for m, specs, where in out_targets:
        handle._hooks.append(m.register_forward_hook(_output_hook(specs, state, where)))
    handle._hooks.append(gather_mod.register_forward_hook(_gather_hook(plan.gather[1], state)))
    for m, proc, factory in swaps:
        m.set_processor(factory(state))
        handle._processors.append((m, proc))
    handle._adopt_caches()
    from .._exit import release_at_exit
    release_at_exit(mesh)   # ring engines freed before interpreter teardown (see integrations/_exit.py)
    if hasattr(transformer, "enable_cache"):   # caches enabled later are checked and adopted too
        transformer.enable_cache = handle._enable_cache
    return handle
