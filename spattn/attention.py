"""The public ``spattn.attention``: options packed once, the joint mask compacted, then the one op.

    seq-sharded q/k/v (B, s, H, D) --all-to-all--> head-sharded (B, U*s, h, D)
        --ring over the ring group--> (B, U*s, h, D) --all-to-all back--> (B, s, H, D)

Eager and torch.compile run the same code: ``spattn::attention`` (``spattn.parallel.op``), which
validates into an ``AttnCall`` (``spattn.call``) and runs the hybrid strategy (``spattn.parallel``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from .call import Inputs, check_joint_mask
from .ops import check_qkv
from .mesh import SPMesh
from .parallel import op

Tensor = torch.Tensor


def _mask_summary(mask: Tensor) -> Tuple[bool, int, int]:
    """(right-padded?, longest, shortest) of a bool (B, T) text mask, read on the host. Cached on the
    mask tensor, keyed by its version counter (an in-place change recomputes): a model hands the same
    mask to every layer, so a GPU stream waits for this read once per forward, not once per layer."""
    try:
        version = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter: read it every call
        version = None
    cached = getattr(mask, "_spattn_summary", None)
    if cached is not None and version is not None and cached[0] == version:
        return cached[1]
    lens = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None]
    is_prefix, longest, shortest = torch.stack([(mask == prefix).all().long(), lens.max(), lens.min()]).tolist()
    summary = (bool(is_prefix), longest, shortest)
    if version is not None:
        try:
            mask._spattn_summary = (version, summary)
        except (AttributeError, RuntimeError):  # a tensor type without Python attributes: just no cache
            pass
    return summary


def _compact_joint(mask: Optional[Tensor], jk: Tensor, jv: Tensor):
    """Joint K/V and per-batch key lengths for a text mask (batch, T): returns (jk, jv, k_lens) with
    each batch element's real keys first, so every backend only needs lengths (int32 (B,), or None
    when every batch element keeps all of the returned keys).

    Right-padded masks (what pipelines pass) already are a prefix: no copy, no mask, and the keys past
    the longest prompt are sliced off (a batch of one padded prompt then runs unmasked on fewer keys).
    Any other mask (holes) is compacted: the real keys are gathered to the front, order kept. That is
    exact without any bias, reuses the same length path in every backend (the Triton kernels skip the
    masked tiles), and costs one gather of the text K/V (B*T*Hkv*D, small beside the attention); the
    gather's backward scatters gradients home, so masked keys get exactly 0.

    While dynamo traces, the result keeps the full text length (lengths always returned): see
    ``spattn.parallel.op``, which takes the compacted K/V and the lengths.
    """
    if mask is None:
        return jk, jv, None
    if torch.compiler.is_compiling():
        # Traced (torch.compile): no host read, no data-dependent shape. Always gather (the identity
        # order for a right-padded mask) and keep all T keys; the lengths mask the rest, exactly.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        idx = order[:, :, None, None].expand(-1, -1, *jk.shape[2:])
        return jk.gather(1, idx), jv.gather(1, idx), mask.sum(1, dtype=torch.int32)
    is_prefix, longest, shortest = _mask_summary(mask)
    n = max(1, longest)  # keep one (masked) key when no text token is real: no empty blocks downstream
    if not is_prefix:
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, T): real keys first
        idx = order[:, :, None, None].expand(-1, -1, *jk.shape[2:])
        jk, jv = jk.gather(1, idx), jv.gather(1, idx)
    if shortest == n:  # every batch element keeps its first n keys: nothing left to mask
        return jk[:, :n], jv[:, :n], None
    return jk[:, :n], jv[:, :n], mask.sum(1, dtype=torch.int32)


def _autocast_dtype(q) -> Optional[torch.dtype]:
    """The autocast dtype in force for q's device type, or None (no autocast, or a device without it)."""
    if not isinstance(q, Tensor):
        return None
    try:
        if not torch.is_autocast_enabled(q.device.type):
            return None
        return torch.get_autocast_dtype(q.device.type)
    except RuntimeError:  # a device type autocast does not know
        return None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Autocast's cast for a lower-precision op: floating tensors but fp64 go to ``dtype``."""
    if t is None or not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _check_window_mask(mask: Tensor, window) -> None:
    """A window over joint positions needs each text key at its own position: a right-padded mask
    keeps them there (its keys are a prefix); a mask with holes would move them (compaction)."""
    if window in ((-1, -1), None) or not isinstance(window, tuple):
        return
    if torch.compiler.is_compiling():
        raise ValueError("spattn.attention: window_size with a joint_mask is not supported under torch.compile "
                         "(the mask's shape cannot be read while tracing); run the call eagerly")
    if not _mask_summary(mask)[0]:
        raise ValueError("spattn.attention: window_size with a joint_mask that has holes is not supported (text "
                         "keys are compacted, which moves their positions); use a right-padded mask")


def attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
              seq_len: Optional[int] = None, layout: str = "contiguous",
              joint_q: Optional[Tensor] = None, joint_k: Optional[Tensor] = None,
              joint_v: Optional[Tensor] = None, joint_strategy: str = "front",
              ring_engine: Optional[str] = None,
              joint_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
              ring_impl: str = "auto", ulysses_chunks: Optional[int] = None,
              allgather_bytes: Optional[int] = None, check: Optional[int] = None,
              window_size: Tuple[int, int] = (-1, -1),
              ) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Sequence-parallel attention on this rank's shards; equals attention over the full sequence.

    Args:
        q: (batch, seq_local, heads_q, head_dim), this rank's shard (see ``spattn.shard``).
        k, v: (batch, seq_local, heads_kv, head_dim); ``heads_q % heads_kv == 0`` (GQA/MQA).
        mesh: the ``SPMesh`` (Ulysses x Ring groups).
        causal: causal mask over the *global* sequence order.
        softmax_scale: default ``head_dim ** -0.5``.
        return_lse: also return the LSE of the local queries.
        backend: single-device kernel: "auto", "torch", "reference" or "triton".
        seq_len: global length when it is not ``seq_local * world_size`` (shards are padded; padded
            keys get exactly zero weight, padded output rows are 0 and get no gradient).
        layout: "contiguous", "zigzag" (load-balanced causal) or "balanced" (load-balanced packed
            documents: chunks dealt by their causal work under ``cu_seqlens``); must match how q/k/v
            were sharded (``spattn.shard(..., layout=..., cu_seqlens=...)``).
        joint_q, joint_k, joint_v: text tokens (batch, text_len, heads, head_dim), identical on every
            rank, attending jointly with the image tokens (non-causal only).
        joint_strategy: "front" ([text, image]) or "rear" ([image, text]); for bidirectional attention
            both orders give the same numbers, the flag records the model's convention.
        ring_engine: P2P ring transport: "auto" (C++ engine when built), "python" or "cpp"; default
            ``$SPATTN_RING_ENGINE`` or "auto".
        joint_mask: bool (batch, text_len), True = real text token, identical on every rank (e.g.
            Qwen-Image's ``encoder_hidden_states_mask``); needs joint_q/k/v. Masked text *keys* get
            exactly zero weight for every query and zero gradient; a masked text *row* still gets a
            finite output (it attends to the unmasked keys), exactly as SDPA over the joint sequence
            with ``attn_mask`` (batch, 1, 1, text_len + seq_len). Right-padded masks take a fast path
            (per-batch key lengths); any other pattern is exact too.
        cu_seqlens: packed documents, int32/int64 (n_docs + 1,) boundaries ``0 = b_0 < ... < b_n =
            seq_len`` over the global unpadded sequence, identical on every rank, batch 1. Token i
            attends to token j only within its own document (and j <= i if causal), exactly as SDPA
            with the block-diagonal document mask; (query, key) blocks with no visible pair are skipped.
        ring_impl: "p2p" (K/V blocks travel the ring, overlapped with compute), "allgather" (the ring
            group's K/V gathered in head chunks, one pass; dK/dV reduce-scattered) or "auto" (the
            measured rule in ``spattn.parallel.ring_allgather.choose_ring_impl``, which
            ``$SPATTN_RING_IMPL`` overrides; an explicit ``ring_engine`` means "p2p").
        ulysses_chunks: head chunks the Ulysses pipeline aims for (default ``$SPATTN_ULYSSES_CHUNKS``
            or 4): the all-to-all of chunk c+1 overlaps the attention of chunk c.
        allgather_bytes: all-gather ring: the gathered K/V of one head chunk stays under this many bytes
            (default ``$SPATTN_ALLGATHER_BYTES`` or 256 MiB).
        check: the cross-rank argument check for this call: 0 off, 1 signature, 2 also the joint
            tensors' contents (default: the mesh's, ``init_mesh(check=...)``, else ``$SPATTN_CHECK`` or 1).
        window_size: sliding window ``(left, right)``, flash-attn's convention (-1 = unbounded): the
            token at global position i attends to the one at j only if ``-right <= i - j <= left``
            (with ``causal`` the right side is moot: ``(w - 1, 0)`` is a Mistral-style window of w
            tokens). Positions are in the global sequence order; with joint tokens, in the joint
            order of ``joint_strategy`` ([text, image] or [image, text]). Exact in every mode, layout,
            with documents and joint tokens; (query, key) blocks wholly outside the window are
            skipped. A ``joint_mask`` with holes (not right-padded) cannot be combined with it.

    Mixed precision: under ``torch.autocast`` q/k/v and the joint tensors (fp32/fp16/bf16) are cast
    to the autocast dtype and the outputs are in it, as SDPA does (fp64 is left alone); gradients
    flow back to the inputs in their own dtypes.

    Returns:
        ``out`` (batch, seq_local, heads_q, head_dim), then ``joint_out`` (batch, text_len, heads_q,
        head_dim, full on every rank) if joint tensors are given, then ``lse`` (batch, heads_q,
        seq_local; fp32, natural log, -inf on padded rows) and ``joint_lse`` (batch, heads_q,
        text_len) if ``return_lse``. LSEs carry no gradient.
    """
    window_size = tuple(window_size) if isinstance(window_size, (list, tuple)) else window_size
    opts = op.options_id(causal=causal, softmax_scale=softmax_scale, return_lse=return_lse, backend=backend,
                         layout=layout, joint_strategy=joint_strategy, ring_engine=ring_engine,
                         ring_impl=ring_impl, ulysses_chunks=ulysses_chunks, allgather_bytes=allgather_bytes,
                         check=check, window_size=window_size)  # (1) a new option is passed here
    if seq_len is not None and (not isinstance(seq_len, (int, torch.SymInt)) or isinstance(seq_len, bool) or seq_len < 1):
        raise ValueError(f"spattn.attention: seq_len must be a positive int, got {seq_len!r}")
    # Anything that cannot even be an op argument gets its clear error here (the rest: in the op).
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        check_qkv(q, k, v, "attention")
    for name, t in (("joint_q", joint_q), ("joint_k", joint_k), ("joint_v", joint_v)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"spattn.attention: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if cu_seqlens is not None and not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"spattn.attention: cu_seqlens must be an int32/int64 torch.Tensor of document "
                        f"boundaries, got {type(cu_seqlens).__name__}")
    autocast = _autocast_dtype(q)
    if autocast is not None:  # SDPA's autocast rule: every fp32/fp16/bf16 input in the autocast dtype
        q, k, v, joint_q, joint_k, joint_v = (_cast(t, autocast) for t in (q, k, v, joint_q, joint_k, joint_v))
    joint = (joint_q, joint_k, joint_v)
    jlens = None
    if any(t is not None for t in joint):
        if any(t is None for t in joint):
            raise ValueError("spattn.attention: pass all of joint_q, joint_k, joint_v, or none of them")
        if isinstance(joint_q, Tensor) and isinstance(joint_k, Tensor) and joint_q.dim() == joint_k.dim() == 4 \
                and joint_q.shape[1] != joint_k.shape[1]:
            raise ValueError("spattn.attention: joint_q and joint_k must have the same text length")
        check_joint_mask(joint_mask, True, q, joint_q.shape[1] if isinstance(joint_q, Tensor) and joint_q.dim() else 0)
        if joint_mask is not None:  # real keys first; eager cuts to the longest prompt, tracing keeps them all
            _check_window_mask(joint_mask, window_size)
            joint_k, joint_v, jlens = _compact_joint(joint_mask, joint_k, joint_v)
    else:
        check_joint_mask(joint_mask, False, q, 0)
    # Under autocast, every op inside runs in the dtypes chosen here (no autocast of the kernels' own math).
    with torch.autocast(q.device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
        res = op.run(Inputs(q, k, v, joint_q, joint_k, joint_v, jlens, cu_seqlens), mesh, opts, seq_len)
    n = (2 if joint_q is not None else 1) * (2 if return_lse else 1)
    return res[0] if n == 1 else tuple(res[:n])
