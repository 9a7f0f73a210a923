"""Hugging Face transformers LLMs, sequence-parallel on spattn (public API only).

    mesh = spattn.init_mesh(ulysses_degree=2, ring_degree=2)          # after init_process_group
    register(mesh)                                                    # attn_implementation="spattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="spattn")
    inputs = shard_inputs(input_ids, mesh, labels=input_ids)          # this rank's tokens + global positions
    out = model(**inputs)                                             # out.loss: this rank's share
    out.loss.backward(); reduce_gradients(model, mesh)                # = single-process gradients

How the pieces fit:

- ``register`` puts an attention function into transformers' ``AttentionInterface`` under ``name``
  (bound to ``mesh``) and a mask function into ``AttentionMaskInterface`` that builds no (S, S) mask:
  causal masking over the *global* order is done inside ``spattn.attention``.
- ``shard_inputs`` gives each rank its tokens in the chosen layout (zigzag by default: balanced causal
  work), their *global* ``position_ids`` (so RoPE sees true positions), labels shifted on the full
  sequence before sharding (no label crosses a shard boundary unseen), and the layout facts the
  attention function needs, as two extra model kwargs (``spattn_seq_len``, ``spattn_layout``):
  transformers forwards unknown kwargs from ``model(**inputs)`` down to every attention call, so the
  information travels with the batch (no state to go stale between batches of different lengths).
  Engines that shard by hand pass those two kwargs themselves.
- Loss and gradients follow the data-parallel convention (what DDP, FSDP, accelerate and
  ``Trainer`` assume): the *mean* over the ranks of their losses is the global loss and the mean of
  their gradients the single-process gradient. The dict carries ``num_items_in_batch`` = the number of
  valid labels in the *whole* sequence / the mesh size, so transformers' causal-LM loss on each rank
  is ``world_size x sum(local token CE) / global count``. Averaging gradients over every rank that
  holds a replica (the mesh, or DP x SP ranks) is then right: DDP / ``fully_shard`` / accelerate do
  it, a plain loop calls ``reduce_gradients``; ``global_loss`` is the mean of the losses.
  ``Trainer`` computes its own ``num_items_in_batch`` from the (sharded) labels across all ranks and
  scales the loss by the process count, which is the same convention. ``sp_loss(logits, labels,
  mesh)`` computes this rank's loss from logits, for training loops that compute their own loss.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

import spattn

from .hf_window import WindowNotSupported, hf_layer_window

Tensor = torch.Tensor
IGNORE_INDEX = -100

__all__ = ["register", "shard_inputs", "pack_padded", "cu_seqlens_from_position_ids", "sp_loss", "global_loss",
           "reduce_gradients"]


def _refuse_score_mods(where: str, kwargs: dict) -> None:
    """What a model's attention module may pass that changes the softmax itself: refused with the reason."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"{where}: attention logit softcapping (softcap={kwargs['softcap']}, config.attn_logit_softcapping) "
            "applies tanh to the scores inside the softmax; spattn computes plain softmax attention")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"{where}: attention sinks (s_aux, e.g. GPT-OSS) add a learned logit to every softmax denominator; "
            "spattn does not support them")


def _mask_fn(name: str):
    def spattn_mask(batch_size: int = 1, q_length: int = 0, kv_length: int = 0, q_offset=0, kv_offset=0,
                    mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> None:
        """No mask is materialized: the causal mask over global positions is spattn's job. A 2-D
        padding mask is honoured only when it keeps every token (a data check skipped under compile)."""
        if kwargs.get("use_vmap") and not getattr(kwargs.get("config"), "use_bidirectional_attention", False):
            # An or/and mask function on top of the causal one (e.g. image tokens attending bidirectionally).
            raise NotImplementedError(f"attn_implementation={name!r}: this model overlays its own mask function on "
                                      "the causal mask; spattn cannot express it")
        if attention_mask is not None and not torch.compiler.is_compiling() and not bool(attention_mask.all()):
            raise NotImplementedError(
                f"attn_implementation={name!r}: got a padded attention_mask; give it to shard_inputs instead: "
                "model(**shard_inputs(input_ids, mesh, attention_mask=attention_mask, labels=labels)) packs the "
                "rows' real tokens as documents (exact for right and left padding; out.logits is then the packed row)")
        return None

    return spattn_mask


def register(mesh: "spattn.SPMesh", name: str = "spattn") -> str:
    """Register the attention implementation ``name`` bound to ``mesh`` with transformers.

    Afterwards ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``) computes every attention layer with
    ``spattn.attention(..., causal=True)`` over the mesh. Feed the model ``shard_inputs(...)``.
    Registering the same name again rebinds it. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(mesh, spattn.SPMesh):
        raise TypeError(f"spattn.integrations.transformers.register: mesh must be an SPMesh, got {type(mesh).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"spattn.integrations.transformers.register: name must be a non-empty str, got {name!r}")

    def spattn_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Optional[Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                 spattn_seq_len: Optional[int] = None, spattn_layout: Optional[str] = None,
                                 spattn_cu_seqlens: Optional[Tensor] = None, **kwargs):
        """transformers' attention signature: query (batch, heads, seq_local, head_dim), key/value
        (batch, kv_heads, seq_local, head_dim) -> ((batch, seq_local, heads, head_dim), None)."""
        where = f"attn_implementation={name!r}"
        if spattn_seq_len is None or spattn_layout is None:
            gen = (f"{where} shards one whole sequence over the mesh; model.generate() and KV-cache decoding "
                   "(use_cache=True) extend a sequence token by token and are not supported. To generate, switch "
                   "this model to single-device attention first: model.set_attn_implementation('sdpa'), "
                   "model.generate(...), then model.set_attn_implementation("
                   f"{name!r}) to train on. ")
            call = ("To run a sequence-parallel forward, call model(**spattn.integrations.transformers.shard_inputs("
                    "input_ids, mesh, ...)) (or pass spattn_seq_len and spattn_layout yourself).")
            raise ValueError(f"{where}: the model was called without spattn_seq_len / spattn_layout. "
                             + (gen + call if kwargs.get("use_cache") else call + " " + gen))
        if attention_mask is not None:
            raise NotImplementedError(f"{where}: got a materialized attention mask; only plain causal attention "
                                      "over the global sequence is supported (no padding or custom 4-D masks)")
        _refuse_score_mods(where, kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        try:  # each layer's own window, read the way the model builds its mask (never ignored)
            window = hf_layer_window(getattr(module, "config", None), getattr(module, "layer_idx", None),
                                     causal=bool(causal), sliding_window=kwargs.get("sliding_window"))
        except WindowNotSupported as e:
            raise NotImplementedError(f"{where}: {e}") from None
        if dropout and module.training:
            raise NotImplementedError(f"{where}: attention dropout is not supported; set config.attention_dropout=0")
        if key.shape[2] != query.shape[2]:
            raise NotImplementedError(f"{where}: {key.shape[2]} keys for {query.shape[2]} queries: decoding with "
                                      "a KV cache (model.generate) is not supported; call the model with "
                                      "use_cache=False, or generate after model.set_attn_implementation('sdpa')")
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # -> (B, s, H, D)
        out = spattn.attention(q, k, v, mesh, causal=bool(causal), softmax_scale=scaling,
                               seq_len=int(spattn_seq_len), layout=spattn_layout, cu_seqlens=spattn_cu_seqlens,
                               window_size=window)
        return out, None

    mask_fn = _mask_fn(name)
    AttentionInterface.register(name, spattn_attention_forward)
    AttentionMaskInterface.register(name, mask_fn)

    def unregister() -> None:   # only if still ours: the name may have been registered again since
        for registry, fn in ((AttentionInterface, spattn_attention_forward), (AttentionMaskInterface, mask_fn)):
            mapping = getattr(registry, "_global_mapping", None)
            if isinstance(mapping, dict) and mapping.get(name) is fn:
                del mapping[name]

    from ._exit import release_at_exit
    release_at_exit(mesh, unregister)   # a clean process exit (see _exit.py)
    return name


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """Document boundaries int32 (n_docs + 1,) of a packed batch given the Hugging Face way:
    position_ids (1, seq) restarting at 0 at each document and counting up by 1 inside it."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"shard_inputs: packed position_ids must be (1, seq) (all documents in one row), got "
                         f"shape {tuple(position_ids.shape)}")
    p = position_ids[0]
    starts = p == 0
    if p.numel() == 0 or not bool(starts[0]):
        raise ValueError("shard_inputs: packed position_ids must start at 0 (each document counts 0, 1, 2, ...)")
    if not bool(((p[1:] == p[:-1] + 1) | starts[1:]).all()):
        raise ValueError("shard_inputs: packed position_ids must count up by 1 inside a document and restart at 0 "
                         "at the next one; got another pattern")
    n = torch.tensor([p.numel()], device=p.device)
    return torch.cat([starts.nonzero().flatten(), n]).to(torch.int32)


def pack_padded(input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """A padded batch as one packed row of documents (one per batch row), which is how spattn
    expresses key padding: every real token attends exactly the real tokens of its row, as with SDPA
    and the padding mask.

    Args:
        input_ids: (batch, seq); attention_mask: (batch, seq), 1 = real token, each row's real tokens
            one contiguous run (right or left padding); labels: (batch, seq) unshifted, -100 = ignored;
            position_ids: (batch, seq) the positions RoPE sees (default: the column, as transformers'
            forward uses without position_ids).
    Returns (ids (1, T), labels (1, T) or None, position_ids (1, T), cu_seqlens int32 (batch + 1,)),
    T = real tokens. A row's first real token is no target (no real token precedes it in its row):
    its label is -100, so no target crosses rows after the shift. ``packed_logits[0]`` is
    ``logits[attention_mask.bool()]`` of the padded batch.
    """
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"shard_inputs: attention_mask {tuple(attention_mask.shape)} must have the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    m = attention_mask.to(torch.bool)
    lengths = m.sum(1)
    runs = (m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]).sum(1)   # starts of runs of real tokens
    if bool((lengths == 0).any()) or bool((runs != 1).any()):
        raise ValueError("shard_inputs: attention_mask must mark one contiguous run of real tokens per row "
                         "(right or left padding) and at least one per row; other masks are not padding")
    pos = position_ids if position_ids is not None else torch.arange(
        input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    packed_labels = None
    if labels is not None:
        first = m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]
        packed_labels = labels.masked_fill(first, IGNORE_INDEX)[m].unsqueeze(0)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return input_ids[m].unsqueeze(0), packed_labels, pos[m].unsqueeze(0), cu


def shard_inputs(input_ids: Tensor, mesh: "spattn.SPMesh", *, labels: Optional[Tensor] = None,
                 layout: str = "zigzag", position_ids: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None) -> Dict[str, object]:
    """What this rank passes to the model: ``model(**shard_inputs(input_ids, mesh, labels=...))``.

    Args:
        input_ids: (batch, seq) full token ids, identical on every rank; any seq.
        labels: (batch, seq) full labels (usually ``input_ids``; -100 = ignored), NOT shifted.
        layout: "zigzag" (balanced causal work), "contiguous", or "balanced" (packed documents).
        position_ids: (1, seq) for a packed batch, the Hugging Face way (restarting at 0 at each
            document): the document boundaries are derived from them (``spattn_cu_seqlens``), so no
            token attends across a document, and these positions (not global ones) feed RoPE.
        attention_mask: (batch, seq) a padded batch's mask (right or left padding): the rows' real
            tokens are packed into one row of documents (``pack_padded``), so every output is then
            for batch 1 and the packed tokens (``logits[0]`` = the padded logits at the mask); with it,
            ``position_ids`` (batch, seq) are the padded batch's positions (default: the column).

    Returns a dict with ``input_ids`` (batch, s) this rank's tokens (padded with 0 past the end),
    ``position_ids`` (batch, s) their global positions, ``use_cache=False``, ``spattn_seq_len`` and
    ``spattn_layout`` (read by the registered attention; with ``position_ids`` also
    ``spattn_cu_seqlens``, and ``position_ids`` are then the given per-document ones), and with labels: ``labels`` and
    ``shift_labels`` (batch, s), the next-token targets of this rank's positions (shifted on the full
    sequence, -100 on the last and on padded positions), and ``num_items_in_batch``, the global count of
    valid targets / the mesh size, which makes the mean of the ranks' ``model(**inputs).loss`` the
    global mean loss (the data-parallel convention, see the module docstring).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"shard_inputs: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if position_ids is not None and position_ids.shape != input_ids.shape:
        raise ValueError(f"shard_inputs: position_ids {tuple(position_ids.shape)} must have the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"shard_inputs: labels {tuple(labels.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)} (unshifted; shifting happens here)")
    # Every SP rank must shard the same full batch: compared (by digest) at the model's first attention.
    spattn.verify_identical(mesh, {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                                   "attention_mask": attention_mask},
                            hint="give every rank of the mesh the same full batch (the same data order and seed "
                                 "on every SP rank; split data across data-parallel groups only)")
    cu = None
    if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
        input_ids, labels, position_ids, cu = pack_padded(input_ids, attention_mask, labels, position_ids)
    elif position_ids is not None:
        cu = cu_seqlens_from_position_ids(position_ids)
    b, s = input_ids.shape
    padded = spattn.local_seq_len(s, mesh, layout) * mesh.world_size
    # Padded slots (past the end) get their global index as position: their keys get zero weight in
    # spattn and their labels are -100, so the value only has to be finite.
    if position_ids is None:
        pos = torch.arange(padded, device=input_ids.device).expand(b, padded)
    else:
        tail = position_ids[:, -1:] + 1 + torch.arange(padded - s, device=position_ids.device)
        pos = torch.cat([position_ids, tail], dim=1)

    def shard_padded(x: Tensor, fill: int) -> Tensor:
        """Shard a (b, padded) tensor whose tail past s is already filled. The balanced layout's
        geometry depends on the real length, so there the real part is sharded and the padded
        slots filled after."""
        if layout != "balanced":
            return spattn.shard(x, mesh, layout=layout)
        valid = spattn.shard(torch.ones(1, s, dtype=torch.bool, device=x.device), mesh, layout=layout, cu_seqlens=cu)
        return spattn.shard(x[:, :s], mesh, layout=layout, cu_seqlens=cu).masked_fill(~valid, fill)

    out: Dict[str, object] = {
        "input_ids": spattn.shard(input_ids, mesh, layout=layout, cu_seqlens=cu),
        "position_ids": shard_padded(pos, 0),
        "use_cache": False,
        "spattn_seq_len": s,
        "spattn_layout": layout,
    }
    if cu is not None:
        out["spattn_cu_seqlens"] = cu
    if labels is not None:
        # Shift on the full sequence first: the target of a shard's last token lives on another rank.
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
        shifted_padded = torch.cat([shifted, shifted.new_full((b, padded - s), IGNORE_INDEX)], dim=1)
        local = shard_padded(shifted_padded, IGNORE_INDEX)
        out["labels"] = local
        out["shift_labels"] = local  # transformers' loss then uses them as they are (no second shift)
        count = int((shifted != IGNORE_INDEX).sum())
        out["num_items_in_batch"] = count if mesh.world_size == 1 else count / mesh.world_size
    return out


def sp_loss(logits: Tensor, labels: Tensor, mesh: "spattn.SPMesh") -> Tensor:
    """This rank's loss in the data-parallel convention: ``world_size x`` the sum of this rank's token
    cross-entropies over valid labels / the valid count over the whole mesh (one small all-reduce, no
    gradient through it), so the mean over the ranks is the global loss.

    Args:
        logits: (batch, s, vocab) this rank's logits.
        labels: (batch, s) this rank's *shifted* labels (``shard_inputs(...)["labels"]``), -100 = ignored.
    Returns a differentiable scalar; ``global_loss`` of it is the single-process mean loss, and
    backward + ``reduce_gradients`` (or DDP / FSDP) gives the single-process gradients.
    """
    total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(total.dtype)
    for g in mesh.groups():
        dist.all_reduce(count, group=g)
    return total * mesh.world_size / count


def global_loss(local_loss: Tensor, mesh: "spattn.SPMesh") -> Tensor:
    """The global (single-process) loss from the ranks' losses: their mean over the mesh (detached)."""
    total = local_loss.detach().clone()
    for g in mesh.groups():
        dist.all_reduce(total, group=g)
    return total / mesh.world_size


def reduce_gradients(model: torch.nn.Module, mesh: "spattn.SPMesh", *,
                     params: Optional[Iterable[torch.nn.Parameter]] = None,
                     group: Optional[dist.ProcessGroup] = None) -> None:
    """Average parameter gradients over the ranks (one flat all-reduce per group and dtype), so each
    holds the single-process gradient; what DDP / ``fully_shard`` / ``Trainer`` do for you.

    Args:
        params: every trainable parameter (default: ``model.parameters()``); include modules outside
            the model that feed it or use its outputs.
        group: the ranks to average over (default: the mesh). With data parallelism around the mesh,
            the group of every DP x SP rank (e.g. ``dist.group.WORLD``).
    """
    groups = [group] if group is not None else mesh.groups()
    size = 1
    for g in groups:
        size *= dist.get_world_size(g)
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for p in (params if params is not None else model.parameters()):
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    if size == 1:
        return
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        for g in groups:
            dist.all_reduce(flat, group=g)
        flat /= size
        for g, f in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(f.view_as(g))
