"""Patch-parallel VAE decode: every rank decodes one band of image rows, exactly as one device would.

    handle = parallelize_vae(pipe.vae, mesh)      # every rank; the same full latent goes in
    image = pipe.vae.decode(z).sample             # the full image comes out on every rank
    handle.remove()                               # the VAE is exactly as before

Inside ``vae.decoder`` each rank holds only its band of rows (latent rows split as evenly as the mesh
allows, so sizes the ranks do not divide are fine), and every layer that looks across rows is made to
see the whole image:

    full latent --split: this rank's rows--> local band
      3x3 convs (2-D, and the causal 3-D ones with their temporal cache): halo rows from the
        neighbours above and below, zeros only at the image's real top and bottom
      GroupNorm (Flux): sums and counts all-reduced in fp32, two passes (mean, then centred squares)
      RMS norms (Qwen-Image, Wan): over channels at each pixel, nothing to exchange
      nearest upsampling: row-local (halos and bands simply double with the image)
      mid-block attention (one head over all pixels): spattn.attention, ring over the SP ranks
      --gather: bands concatenated--> full decoder output on every rank (clamp etc. run unchanged)

Per VAE class a small ``VAEPlan`` names the decoder and the module classes to patch; one mechanism
swaps those modules' ``forward`` (instance attribute, weights and model code untouched) and
``remove()`` puts them back. Inference only (the halo exchange has no backward).

The ranks used are the sequence-parallel part of the mesh (Ulysses x Ring); on a CFG mesh each CFG
branch's ranks decode together. The temporal feature cache of the video VAEs stays per rank: it holds
the rank's own rows of the last frames, and the halo is exchanged after the cache is prepended, so the
neighbours' cached rows arrive with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import spattn

Tensor = torch.Tensor

__all__ = ["parallelize_vae", "VAEHandle", "VAEPlan", "VAE_PLANS", "vae_supported", "ConvInputMeter"]


# ---------------------------------------------------------------------------------------------------
# Plans: which modules of which VAE get a band-aware forward
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEPlan:
    """What to patch in one VAE class. Class names, so the plan needs no diffusers import."""

    decoder: str = "decoder"                 # module whose input rows are split and output rows gathered
    causal_convs: Tuple[str, ...] = ()       # causal 3-D convs with ``_padding`` (Qwen-Image/Wan style)
    attention_blocks: Tuple[str, ...] = ()   # one-head pixel attention blocks: norm, to_qkv, proj
    attentions: Tuple[str, ...] = ()         # diffusers ``Attention`` modules (group_norm, to_q/k/v, to_out)


VAE_PLANS: Dict[str, VAEPlan] = {
    "AutoencoderKLQwenImage": VAEPlan(causal_convs=("QwenImageCausalConv3d",),
                                      attention_blocks=("QwenImageAttentionBlock",)),
    "AutoencoderKLWan": VAEPlan(causal_convs=("WanCausalConv3d",), attention_blocks=("WanAttentionBlock",)),
    "AutoencoderKL": VAEPlan(attentions=("Attention",)),
}
# Norms that act per pixel (over channels): exact on a band as they are.
_PIXEL_NORMS = ("QwenImageRMS_norm", "WanRMS_norm")


def _plan_for(vae: nn.Module) -> Optional[VAEPlan]:
    for cls in type(vae).__mro__:   # a subclass of a supported VAE has its layers
        if cls.__name__ in VAE_PLANS:
            return VAE_PLANS[cls.__name__]
    return None


def vae_supported(vae: Any) -> bool:
    """True when ``parallelize_vae`` handles this VAE's class."""
    return isinstance(vae, nn.Module) and _plan_for(vae) is not None


# ---------------------------------------------------------------------------------------------------
# The band: communication among the SP ranks and the row geometry of the current decode
# ---------------------------------------------------------------------------------------------------

def _split_rows(n: int, parts: int) -> List[int]:
    """Rows per rank, top to bottom: as even as possible, the first ``n % parts`` ranks one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class _Band:
    """The SP ranks of a mesh in sequence order, and the helpers the patched layers share:
    halo rows, all-reduce, gather of bands, re-sharding of tokens for ``spattn.attention``."""

    def __init__(self, mesh: spattn.SPMesh, backend: str):
        self.size = mesh.world_size
        self.index = mesh.sp_rank
        self.group, self.ranks = _sp_group(mesh)
        # Rank at sequence position i is group rank gr[i] in the group (new_group may order them).
        self.group_rank = [dist.get_group_rank(self.group, r) for r in self.ranks]
        # One head over all pixels: Ulysses cannot split it, so the attention runs as a ring over
        # all SP ranks; spattn's contiguous layout puts chunk group_rank[i] on sequence position i.
        self.attn_mesh = spattn.SPMesh(ring_group=self.group)
        self.backend = backend
        self.rows: Optional[List[int]] = None   # latent rows per sequence position, set per decoder call

    # -- geometry -----------------------------------------------------------------------------------
    def counts(self, local_rows: int) -> List[int]:
        """Rows per rank at the resolution of a tensor whose band has ``local_rows`` rows."""
        assert self.rows is not None, "band used outside a decoder call"
        scale = local_rows // self.rows[self.index]
        return [r * scale for r in self.rows]

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def pad_rows(self, x: Tensor, dim: int, n: int) -> Tensor:
        """``x`` with ``n`` rows added on each side along ``dim``: the neighbours' edge rows, or zeros
        at the image's top and bottom (what the convolution's own zero padding would add)."""
        if n == 0:
            return x
        dim = dim % x.dim()
        if x.shape[dim] < n:
            raise ValueError(f"spattn parallel VAE: a band of {x.shape[dim]} rows cannot give a halo of {n}")
        shape = list(x.shape)
        shape[dim] = n
        top, bottom = x.new_zeros(shape), x.new_zeros(shape)
        ops = []
        if self.index > 0:  # above: send my first rows (its bottom halo), receive its last rows
            up = self.ranks[self.index - 1]
            ops += [dist.P2POp(dist.isend, x.narrow(dim, 0, n).contiguous(), up, self.group),
                    dist.P2POp(dist.irecv, top, up, self.group)]
        if self.index < self.size - 1:
            down = self.ranks[self.index + 1]
            ops += [dist.P2POp(dist.isend, x.narrow(dim, x.shape[dim] - n, n).contiguous(), down, self.group),
                    dist.P2POp(dist.irecv, bottom, down, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return torch.cat([top, x, bottom], dim)

    def gather_rows(self, x: Tensor, dim: int) -> Tensor:
        """The bands of every rank concatenated along ``dim`` (uneven bands padded for the all-gather)."""
        dim = dim % x.dim()
        counts = self.counts(x.shape[dim])
        most = max(counts)
        if x.shape[dim] < most:
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], most - x.shape[dim], *x.shape[dim + 1:])], dim)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([parts[g].narrow(dim, 0, c) for g, c in zip(self.group_rank, counts)], dim)

    def reshard(self, x: Tensor, src: Sequence[Tuple[int, int]], dst: Sequence[Tuple[int, int]]) -> Tensor:
        """Move tokens (dim 1) from ranges ``src[i]`` (held by sequence position i) to ranges ``dst[i]``.
        Ranges are (start, stop) in one global token order; each position sends every other one the
        overlap of its range with theirs (mostly a neighbour's few rows)."""
        me = self.index
        (s0, s1), (d0, d1) = src[me], dst[me]
        ops, pieces = [], []
        for p in range(self.size):
            lo, hi = max(d0, src[p][0]), min(d1, src[p][1])   # what p sends me
            if hi > lo:
                if p == me:
                    pieces.append((lo, x[:, lo - s0:hi - s0]))
                else:
                    buf = x.new_empty(x.shape[0], hi - lo, *x.shape[2:])
                    ops.append(dist.P2POp(dist.irecv, buf, self.ranks[p], self.group))
                    pieces.append((lo, buf))
            lo, hi = max(s0, dst[p][0]), min(s1, dst[p][1])   # what I send p
            if hi > lo and p != me:
                ops.append(dist.P2POp(dist.isend, x[:, lo - s0:hi - s0].contiguous(), self.ranks[p], self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if not pieces:
            return x.new_empty(x.shape[0], 0, *x.shape[2:])
        return torch.cat([t for _, t in sorted(pieces, key=lambda item: item[0])], 1)

    def attention(self, qkv: Tensor, heads: int, width: int) -> Tensor:
        """Non-causal attention over the pixels of all bands; returns this band's outputs.

        qkv: (n, rows * width, 3 * heads * head_dim), this band's pixels row-major, [q | k | v] channels.
        Returns (n, rows * width, heads * head_dim). spattn wants equal shards with padding only at the
        global tail, so the tokens are first moved to that layout (a few rows between neighbours)."""
        n, local, ch = qkv.shape
        rows = self.counts(local // width)
        counts = [r * width for r in rows]
        starts = [sum(counts[:i]) for i in range(self.size)]
        total = sum(counts)
        chunk = -(-total // self.size)
        src = [(starts[i], starts[i] + counts[i]) for i in range(self.size)]
        dst = [(min(g * chunk, total), min((g + 1) * chunk, total)) for g in self.group_rank]
        t = self.reshard(qkv, src, dst)
        real = t.shape[1]
        if real < chunk:  # the tail ranks: padding spattn gives zero weight (seq_len=total)
            t = torch.cat([t, t.new_zeros(n, chunk - real, ch)], 1)
        head_dim = ch // (3 * heads)
        q, k, v = t.view(n, chunk, 3, heads, head_dim).unbind(2)
        out = spattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), self.attn_mesh, seq_len=total,
                               backend=self.backend)
        out = out.reshape(n, chunk, heads * head_dim)[:, :real]
        return self.reshard(out, dst, src)


def _sp_group(mesh: spattn.SPMesh) -> Tuple[dist.ProcessGroup, List[int]]:
    """One process group over the mesh's SP ranks (a CFG mesh: this branch's), and its global ranks in
    sequence order (sp_rank = ring_rank * ulysses_degree + ulysses_rank)."""
    if mesh.ring_group is None or mesh.ulysses_group is None:
        group = mesh.ulysses_group if mesh.ring_group is None else mesh.ring_group
        return group, list(dist.get_process_group_ranks(group))
    cached = getattr(mesh, "_vae_sp_group", None)   # built once per mesh, however often a VAE is parallelized
    if cached is not None:
        return cached
    ring = dist.get_process_group_ranks(mesh.ring_group)         # (r, my u) for every r
    per_u: List[Any] = [None] * mesh.ulysses_degree
    dist.all_gather_object(per_u, ring, group=mesh.ulysses_group)  # (r, u) for every r, u
    ranks = [per_u[u][r] for r in range(mesh.ring_degree) for u in range(mesh.ulysses_degree)]
    # Only this branch's ranks take part (on a CFG mesh the other branch builds its own).
    mesh._vae_sp_group = (dist.new_group(ranks, use_local_synchronization=True), ranks)
    return mesh._vae_sp_group


# ---------------------------------------------------------------------------------------------------
# Band-aware forwards, one per patched module kind
# ---------------------------------------------------------------------------------------------------

def _conv2d_forward(band: _Band, m: nn.Conv2d) -> Callable:
    ph, pw = m.padding

    def forward(x: Tensor) -> Tensor:
        x = band.pad_rows(x, -2, ph)
        return F.conv2d(x, m.weight, m.bias, m.stride, (0, pw), m.dilation, m.groups)
    return forward


def _causal_conv3d_forward(band: _Band, m: nn.Conv3d) -> Callable:
    def forward(x: Tensor, cache_x: Optional[Tensor] = None) -> Tensor:
        padding = list(m._padding)   # (w, w, h, h, 2 * t, 0): causal in time
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        # Halo after the cache: the neighbours' rows of the cached frames come along.
        x = band.pad_rows(x, 3, padding[2])
        padding[2] = padding[3] = 0
        return nn.Conv3d.forward(m, F.pad(x, padding))
    return forward


def _group_norm_forward(band: _Band, m: nn.GroupNorm) -> Callable:
    def forward(x: Tensor) -> Tensor:
        if x.dim() < 4:
            raise ValueError(f"spattn parallel VAE: GroupNorm on a band needs (n, c, [t,] rows, width), "
                             f"got {tuple(x.shape)}")
        n, c = x.shape[:2]
        xf = x.float().reshape(n, m.num_groups, -1)
        # Elements per group in the whole image: this band's count x total rows / band rows (an exact int,
        # no collective needed). Two passes (mean, then centred squares), as one device computes it.
        rows = x.shape[-2]
        count = xf.shape[-1] // rows * sum(band.counts(rows))
        mean = band.all_reduce(xf.sum(-1)) / count
        centred = xf - mean[..., None]
        var = band.all_reduce(centred.square().sum(-1)) / count
        y = (centred * torch.rsqrt(var[..., None] + m.eps)).reshape(x.shape)
        if m.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * m.weight.float().view(shape) + m.bias.float().view(shape)
        return y.to(x.dtype)
    return forward


def _attention_block_forward(band: _Band, m: nn.Module) -> Callable:
    """Qwen-Image / Wan: RMS norm and 1x1 to_qkv per pixel, one-head attention over the frame's pixels."""
    def forward(x: Tensor) -> Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = m.to_qkv(m.norm(x))                                   # (b*t, 3c, h, w)
        out = band.attention(qkv.flatten(2).transpose(1, 2), 1, w)  # (b*t, h*w, c)
        x = m.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity
    return forward


def _attention_forward(band: _Band, m: nn.Module) -> Callable:
    """diffusers ``Attention`` as the AutoencoderKL mid-block uses it (self-attention on a 4-D map)."""
    def forward(hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 4:
            raise ValueError("spattn parallel VAE: the decoder's attention is expected to be self-attention on "
                             "a (batch, channels, height, width) map without a mask")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states if m.group_norm is None else m.group_norm(hidden_states)   # band-aware GroupNorm
        x = x.view(b, c, h * w).transpose(1, 2)
        q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
        heads = m.heads
        if m.norm_q is not None or m.norm_k is not None:   # per head and token: apply before the exchange
            q = q.view(b, -1, heads, q.shape[-1] // heads)
            k = k.view(b, -1, heads, k.shape[-1] // heads)
            q = (q if m.norm_q is None else m.norm_q(q)).flatten(2)
            k = (k if m.norm_k is None else m.norm_k(k)).flatten(2)
        out = band.attention(torch.cat([q, k, v], -1), heads, w).to(q.dtype)
        out = m.to_out[1](m.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if m.residual_connection:
            out = out + residual
        return out / m.rescale_output_factor
    return forward


def _decoder_forward(band: _Band, m: nn.Module, halo: int) -> Callable:
    """Split the input's rows (dim -2) into bands, run the decoder on this rank's, gather the output."""
    original = m.forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        height = x.shape[-2]
        if height < band.size * halo:
            # Every rank sees the same shape, so every rank raises here, before any collective.
            raise ValueError(f"spattn parallel VAE: a latent of {height} rows cannot be split over {band.size} "
                             f"ranks (each needs at least {halo}); decode on fewer ranks or without "
                             f"parallelize_vae (spattn generate --no-vae-parallel)")
        band.rows = _split_rows(height, band.size)
        start = sum(band.rows[:band.index])
        out = original(x.narrow(-2, start, band.rows[band.index]), *args, **kwargs)
        return band.gather_rows(out, -2)
    return forward


# Which band-aware forward each kind of patched module gets.
_FORWARDS: Dict[str, Callable[[_Band, nn.Module], Callable]] = {
    "conv2d": _conv2d_forward, "causal_conv": _causal_conv3d_forward, "group_norm": _group_norm_forward,
    "attention_block": _attention_block_forward, "attention": _attention_forward,
}


# ---------------------------------------------------------------------------------------------------
# Applying a plan, and undoing it
# ---------------------------------------------------------------------------------------------------

_MISSING = object()


class VAEHandle:
    """What ``parallelize_vae`` did to one VAE; ``remove()`` undoes it (also as a context manager)."""

    def __init__(self, vae: nn.Module, mesh: spattn.SPMesh):
        self.vae, self.mesh = vae, mesh
        self._patched: List[Tuple[nn.Module, Any]] = []   # (module, its previous instance ``forward``)
        self.band: Optional[_Band] = None                   # the SP ranks sharing the decode (None: one rank)

    def _patch(self, m: nn.Module, forward: Callable) -> None:
        self._patched.append((m, m.__dict__.get("forward", _MISSING)))
        m.forward = forward

    @property
    def active(self) -> bool:
        """Whether the decode is split over ranks (False for a one-rank mesh: nothing to split)."""
        return bool(self._patched)

    def remove(self) -> None:
        """Restore every patched module's own ``forward``. Idempotent."""
        for m, previous in reversed(self._patched):
            if previous is _MISSING:
                del m.forward
            else:
                m.forward = previous
        self._patched = []

    def __enter__(self) -> "VAEHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _conv_halo(m: nn.Module, causal: bool) -> int:
    """Rows of halo a stride-1 "same"-padded conv needs; refuses any conv it could not band exactly."""
    if isinstance(m, nn.ConvTranspose2d) or isinstance(m, nn.ConvTranspose3d):
        raise TypeError(f"spattn parallel VAE: transposed convolution {type(m).__name__} is not supported")
    if not causal and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        raise TypeError(f"spattn parallel VAE: conv with padding={m.padding!r}, padding_mode={m.padding_mode!r} "
                        f"is not supported (zero padding by an int only)")
    hdim = -2   # kernel/stride/dilation index of the height axis (2-D: 0, 3-D: 1)
    k, s, d = m.kernel_size[hdim], m.stride[hdim], m.dilation[hdim]
    ph = m._padding[2] if causal else m.padding[hdim]
    if s != 1 or d != 1 or k != 2 * ph + 1:
        raise TypeError(f"spattn parallel VAE: conv with kernel {m.kernel_size}, stride {m.stride}, dilation "
                        f"{m.dilation}, padding {ph} rows does not keep the rows aligned; only stride-1 'same' "
                        f"convolutions are supported in the decoder")
    return ph


def parallelize_vae(vae: nn.Module, mesh: spattn.SPMesh, *, backend: str = "auto") -> VAEHandle:
    """Decode with every SP rank of ``mesh``, each on a band of image rows; exact, not tiled.

    Every rank calls ``vae.decode(z)`` with the same full latent (as pipelines do) and gets the full
    image: z (batch, channels, [frames,] height, width) -> (batch, 3, [frames',] 8 height, 8 width).
    Memory: the largest activation a rank holds is its band, ``ceil(height / P) / height`` of one
    device's, plus one halo row above and below per convolution.

    Args:
        vae: a diffusers ``AutoencoderKLQwenImage``, ``AutoencoderKLWan`` or ``AutoencoderKL`` (Flux).
        mesh: the ``spattn.SPMesh``; its SP ranks (Ulysses x Ring; on a CFG mesh, this branch's) share
            the decode. Must be called on every rank of the mesh (it may create one process group).
        backend: single-device kernel of the mid-block attention (see ``spattn.attention``).

    Returns:
        a ``VAEHandle``; ``remove()`` (or leaving a ``with`` block) restores the VAE.
    """
    plan = _plan_for(vae) if isinstance(vae, nn.Module) else None
    if plan is None:
        raise TypeError(f"spattn.integrations.diffusers.parallelize_vae: {type(vae).__name__} is not supported; "
                        f"supported VAEs: {', '.join(VAE_PLANS)} (or decode without it: --no-vae-parallel)")
    decoder = getattr(vae, plan.decoder, None)
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"parallelize_vae: {type(vae).__name__} has no decoder module {plan.decoder!r}")
    if "forward" in decoder.__dict__:
        raise RuntimeError("parallelize_vae: this VAE's decoder is already patched (parallelize_vae applied "
                           "twice?); call remove() on the first handle before parallelizing it again")
    # Decide every patch before touching anything (or communicating): a refusal leaves the VAE as is.
    todo: List[Tuple[nn.Module, str]] = []
    halo = 1
    for name, m in decoder.named_modules():
        cls = type(m).__name__
        if getattr(m, "_hf_hook", None) is not None:
            raise TypeError("parallelize_vae: the VAE has accelerate hooks (sequential CPU offload); "
                            "use model CPU offload or none with the parallel VAE")
        if cls in plan.causal_convs:
            rows = _conv_halo(m, causal=True)
            if rows:   # 1x1 in space (shortcuts, time convs): the model's own forward is exact on a band
                halo = max(halo, rows)
                todo.append((m, "causal_conv"))
        elif cls in plan.attention_blocks:
            todo.append((m, "attention_block"))
        elif cls in plan.attentions:
            todo.append((m, "attention"))
        elif isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            rows = _conv_halo(m, causal=False)
            if rows and not isinstance(m, nn.Conv2d):
                raise TypeError(f"parallelize_vae: decoder layer {name} ({cls}) pads rows and is not a 2-D or "
                                f"causal 3-D convolution spattn knows how to band")
            if rows:
                halo = max(halo, rows)
                todo.append((m, "conv2d"))
        elif isinstance(m, nn.GroupNorm):
            todo.append((m, "group_norm"))
        elif "norm" in cls.lower() and cls not in _PIXEL_NORMS and not isinstance(m, nn.LayerNorm):
            raise TypeError(f"parallelize_vae: decoder layer {name} ({cls}) is a norm spattn cannot band exactly")
    handle = VAEHandle(vae, mesh)
    if mesh.world_size == 1:
        return handle   # one rank: nothing to split
    if not dist.is_initialized():
        raise RuntimeError("parallelize_vae: torch.distributed is not initialized")
    band = _Band(mesh, backend)
    for m, kind in todo:
        handle._patch(m, _FORWARDS[kind](band, m))
    handle._patch(decoder, _decoder_forward(band, decoder, halo))
    handle.band = band
    return handle


# ---------------------------------------------------------------------------------------------------
# Measuring: the largest convolution input a rank holds
# ---------------------------------------------------------------------------------------------------

class ConvInputMeter:
    """Forward pre-hooks on every convolution of ``module``: ``peak`` is the largest input (elements)
    any of them received since the last ``reset()``. A band's conv inputs are its own rows (the halo,
    two rows, is added inside the patched forward)."""

    def __init__(self, module: nn.Module):
        self.peak = 0
        self._hooks = [m.register_forward_pre_hook(self._record) for m in module.modules()
                       if isinstance(m, (nn.Conv2d, nn.Conv3d))]

    def _record(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            self.peak = max(self.peak, args[0].numel())

    def reset(self) -> None:
        self.peak = 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
