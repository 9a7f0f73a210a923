"""Bodies that run on every rank (via dist_harness) and compare spattn with full-sequence references.

Every rank builds the same full tensors from a seed, runs spattn on its shard, gathers the results
with ``spattn.gather``; rank 0 computes the references and returns the errors for the test to assert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import spattn
from spattn.backends.reference import attention_ref, visible
from spattn.testing import DTYPES, assert_within_tolerance, error_table, gather_checked
_MESHES: Dict[Tuple[int, int], spattn.SPMesh] = {}


def get_mesh(u: int, r: int) -> spattn.SPMesh:
    """Meshes are cached per process: creating groups per test would leak them and cost time. A mesh
    broken by an argument mismatch (every rank marks it) is rebuilt."""
    if (u, r) not in _MESHES or _MESHES[(u, r)].check_broken:
        _MESHES[(u, r)] = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    return _MESHES[(u, r)]


@dataclass(frozen=True)
class Case:
    u: int
    r: int
    seq: int = 64
    heads: int = 4
    kv_heads: Optional[int] = None
    head_dim: int = 32
    batch: int = 1
    dtype: str = "fp32"
    causal: bool = False
    layout: str = "contiguous"
    text: int = 0                 # joint text tokens (0: none)
    joint_strategy: str = "front"
    backend: str = "auto"
    engine: str = "python"
    chunks: Optional[int] = None  # Ulysses pipeline head chunks (attention(ulysses_chunks=...))
    seed: int = 0
    mask: str = ""                # joint_mask: "" none, "pad", "short", "hole", "empty" (see text_mask)
    docs: Tuple[int, ...] = ()    # packed documents' lengths (cu_seqlens; batch 1, no text); () none
    window: Tuple[int, int] = (-1, -1)  # window_size (left, right), -1 unbounded


    @property
    def kvh(self) -> int:
        return self.kv_heads or self.heads

    @property
    def cu_seqlens(self) -> Optional[torch.Tensor]:
        if not self.docs:
            return None
        return torch.tensor([0] + list(torch.tensor(self.docs).cumsum(0)), dtype=torch.int32)


def text_mask(c: Case) -> Optional[torch.Tensor]:
    """The case's joint_mask, bool (batch, text), True = real token.
    "pad": right-padded like a pipeline's batched prompts: batch element b keeps max(1, T - 4b) tokens
    (T=7, batch 2: 7 and 3). "short": T - 2 - 2b tokens (all padded). "hole": element 0 loses tokens in the middle, the others alternate
    False/True (a masked first token too). "empty": element 0 right-padded to 3, the rest all masked."""
    if not c.mask:
        return None
    T, B = c.text, c.batch
    m = torch.ones(B, T, dtype=torch.bool)
    if c.mask == "pad":
        for b in range(B):
            m[b, max(1, T - 4 * b):] = False
    elif c.mask == "short":  # every prompt padded: the keys past the longest one are dropped
        for b in range(B):
            m[b, max(1, T - 2 - 2 * b):] = False
    elif c.mask == "hole":
        m[0, 1:max(2, T // 2)] = False
        m[1:, 0::2] = False
    elif c.mask == "empty":
        m[0, 3:] = False
        m[1:] = False
    else:
        raise ValueError(c.mask)
    return m


def _inputs(c: Case):
    g = torch.Generator().manual_seed(c.seed)
    dt = DTYPES[c.dtype]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    q, k, v = rnd(c.batch, c.seq, c.heads, c.head_dim), rnd(c.batch, c.seq, c.kvh, c.head_dim), \
        rnd(c.batch, c.seq, c.kvh, c.head_dim)
    dout = rnd(c.batch, c.seq, c.heads, c.head_dim)
    joint = None
    if c.text:
        joint = (rnd(c.batch, c.text, c.heads, c.head_dim), rnd(c.batch, c.text, c.kvh, c.head_dim),
                 rnd(c.batch, c.text, c.kvh, c.head_dim), rnd(c.batch, c.text, c.heads, c.head_dim))
    return q, k, v, dout, joint


def _full_reference(c: Case, q, k, v, dout, joint, dtype, impl: str):
    """Full-sequence attention (+ grads). impl: 'ref' (fp64 math) or 'sdpa' (torch, in ``dtype``)."""
    ts = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    jts = [t.detach().to(dtype).requires_grad_() for t in joint[:3]] if joint else []
    qq, kk, vv = ts
    grad_out = dout.to(dtype)  # d(loss)/d(out) of the loss below, row by row over the joint sequence
    if joint:
        jq, jk, jv = jts
        front = c.joint_strategy == "front"
        cat = (lambda t, j: torch.cat([j, t] if front else [t, j], dim=1))
        qq, kk, vv = cat(qq, jq), cat(kk, jk), cat(vv, jv)
        grad_out = cat(grad_out, joint[3].to(dtype))
    km = text_mask(c)
    if km is not None:  # key mask over the joint sequence; image keys are always visible
        img_keys = torch.ones(c.batch, c.seq, dtype=torch.bool)
        km = torch.cat([km, img_keys] if c.joint_strategy == "front" else [img_keys, km], dim=1)
    # Packed documents: each attends only within itself, so the reference runs document by document.
    bounds = c.cu_seqlens.tolist() if c.docs else [0, qq.shape[1]]
    if impl == "ref":
        o, lse = _ref_with_grads(c, (qq, kk, vv), km, bounds, grad_out)
    else:
        o = torch.cat([_sdpa(c, qq[:, lo:hi], kk[:, lo:hi], vv[:, lo:hi], km)
                       for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
        lse = None
        (o * grad_out).sum().backward()
    T = c.text
    if joint:
        img = slice(T, None) if c.joint_strategy == "front" else slice(0, c.seq)
        txt = slice(0, T) if c.joint_strategy == "front" else slice(c.seq, None)
        o_img, o_txt = o[:, img], o[:, txt]
        lse_img = lse[:, :, img] if lse is not None else None
    else:
        o_img, o_txt, lse_img = o, None, lse
    res = {"out": o_img, "lse": lse_img, "dq": ts[0].grad, "dk": ts[1].grad, "dv": ts[2].grad}
    if joint:
        res.update({"jout": o_txt, "djq": jts[0].grad, "djk": jts[1].grad, "djv": jts[2].grad})
    return res


def _ref_with_grads(c: Case, qkv, km, bounds, grad_out):
    """fp64 reference over the joint sequence, a block of query rows at a time, each block's backward run
    before the next block's forward: a 6889-token case never holds its (S, S) score matrices and their
    autograd buffers at once (3x faster on one thread, same numbers). Returns out, lse; the gradients
    reach ``qkv``'s inputs."""
    leaves = [t.detach().requires_grad_() for t in qkv]
    ql, kl, vl = leaves
    window = None if c.window == (-1, -1) else c.window
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = max(16, (1 << 21) // (ql.shape[0] * ql.shape[2] * (hi - lo)))  # ~16 MB of fp64 scores
        for a in range(lo, hi, rows):
            b = min(a + rows, hi)
            o, lse = attention_ref(ql[:, a:b], kl[:, lo:hi], vl[:, lo:hi], c.causal, key_mask=km, window=window,
                                   q_offset=a - lo)
            (o * grad_out[:, a:b]).sum().backward()
            outs.append(o.detach())
            lses.append(lse.detach())  # (a kept graph would keep every block's scores alive)
    torch.autograd.backward(list(qkv), [t.grad for t in leaves])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _sdpa(c: Case, q, k, v, km):
    """One sequence's attention in torch's SDPA with the case's causal, window and key mask."""
    window = None if c.window == (-1, -1) else c.window
    mask = visible(q.shape[1], k.shape[1], c.causal, window) if window else None
    if km is not None:
        mask = km[:, None, None, :] if mask is None else mask & km[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          is_causal=c.causal and mask is None,
                                          enable_gqa=c.kvh != c.heads).transpose(1, 2)


def run_case(c: Case, **options) -> Optional[dict]:
    """Run on every rank. Returns, on rank 0, {name: (err, sdpa_err, ref_max)}. ``options``: more
    keyword options of spattn.attention (e.g. ring_impl, allgather_bytes)."""
    return _run_case(c, options)


def _run_case(c: Case, options: dict) -> Optional[dict]:
    mesh = get_mesh(c.u, c.r)
    q, k, v, dout, joint = _inputs(c)
    kw = dict(seq_len=c.seq, layout=c.layout)
    if c.docs:
        kw["cu_seqlens"] = c.cu_seqlens
    ql, kl, vl = (spattn.shard(t, mesh, **kw).requires_grad_() for t in (q, k, v))
    dl = spattn.shard(dout, mesh, **kw)
    args = {} if c.window == (-1, -1) else dict(window_size=c.window)
    if joint:
        jts = [t.clone().requires_grad_() for t in joint[:3]]
        args.update(joint_q=jts[0], joint_k=jts[1], joint_v=jts[2], joint_strategy=c.joint_strategy,
                    joint_mask=text_mask(c))
    res = spattn.attention(ql, kl, vl, mesh, causal=c.causal, return_lse=True, backend=c.backend,
                           ring_engine=c.engine, ulysses_chunks=c.chunks, **args, **kw, **options)
    if joint:
        out, jout, lse, _ = res
        loss = (out * dl).sum() + (jout * joint[3]).sum()
    else:
        out, lse = res
        loss = (out * dl).sum()
    loss.backward()
    got = gather_checked(mesh, c.seq, kw, out, lse, ql.grad, kl.grad, vl.grad)
    if joint:
        got.update(jout=jout.detach(), djq=jts[0].grad, djk=jts[1].grad, djv=jts[2].grad)
        if c.mask:  # masked text keys: exactly zero gradient, on every rank
            km = text_mask(c)
            assert (got["djk"][~km] == 0).all() and (got["djv"][~km] == 0).all(), "masked keys got gradient"
            # Masked text rows are queries too: finite (compared with SDPA below like every row).
            assert torch.isfinite(got["jout"]).all() and torch.isfinite(got["djq"]).all(), "non-finite text rows"
        # Replicated results must be identical on every rank.
        for n in ("jout", "djq", "djk", "djv"):
            t = got[n].contiguous()
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.is_initialized() else [t]
            if dist.is_initialized():
                dist.all_gather(parts, t)
            assert all(torch.equal(p, parts[0]) for p in parts), f"{n} differs between ranks"
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    ref = _full_reference(c, q, k, v, dout, joint, torch.float64, "ref")
    base = _full_reference(c, q, k, v, dout, joint, DTYPES[c.dtype], "sdpa")
    return error_table(got, ref, base)


def check(c: Case) -> None:
    """Run ``c`` on its ranks and hold every result to the one tolerance rule (spattn.testing)."""
    from dist_harness import run_on_ranks

    assert_within_tolerance(run_on_ranks(c.u * c.r, run_case, c), c.dtype, c)


def cpp_available() -> bool:
    try:
        from spattn import _ext
        return _ext.ring_engine_class(required=False) is not None
    except Exception:  # noqa: BLE001 - any import problem means "not built"
        return False


def triton_available() -> bool:
    try:
        from spattn.backends import get_backend

        get_backend("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return True
    except Exception:  # noqa: BLE001 - not installed, or no interpreter / GPU
        return False


# ----------------------------------------------------------------------------------------------
# Small bodies for API and error tests
# ----------------------------------------------------------------------------------------------
def expect_error(u: int, r: int, kind: str) -> str:
    """Provoke one bad input on every rank; return the error message (must be raised before any
    collective, so all ranks raise and nothing hangs)."""
    mesh = get_mesh(u, r)
    x = torch.randn(1, 8, 4, 16)
    try:
        if kind == "degrees":
            spattn.init_mesh(ulysses_degree=3, ring_degree=dist.get_world_size())
        elif kind == "rank3":
            spattn.attention(x[0], x[0], x[0], mesh)
        elif kind == "shape":
            spattn.attention(x, x[:, :, :2, :8], x[:, :, :2, :8], mesh)
        elif kind == "kv_mismatch":
            spattn.attention(x, x, x[:, :, :, :8], mesh)
        elif kind == "dtype":
            spattn.attention(x, x.double(), x, mesh)
        elif kind == "gqa":
            spattn.attention(x, x[:, :, :3], x[:, :, :3], mesh)
        elif kind == "device":
            spattn.attention(x.to("meta"), x.to("meta"), x.to("meta"), mesh)
        elif kind == "seq_len":
            spattn.attention(x, x, x, mesh, seq_len=5 * mesh.world_size + 100)
        elif kind == "qk_len":
            spattn.attention(x, x[:, :4], x[:, :4], mesh)
        elif kind == "layout":
            spattn.attention(x, x, x, mesh, layout="striped")
        elif kind == "joint_causal":
            t = torch.randn(1, 3, 4, 16)
            spattn.attention(x, x, x, mesh, causal=True, joint_q=t, joint_k=t, joint_v=t)
        elif kind == "joint_partial":
            spattn.attention(x, x, x, mesh, joint_q=torch.randn(1, 3, 4, 16))
        elif kind in ("mask_no_joint", "mask_dtype", "mask_shape"):
            t = torch.randn(1, 3, 4, 16)
            m = {"mask_no_joint": torch.ones(1, 3, dtype=torch.bool), "mask_dtype": torch.ones(1, 3),
                 "mask_shape": torch.ones(3, dtype=torch.bool)}[kind]
            joint = {} if kind == "mask_no_joint" else dict(joint_q=t, joint_k=t, joint_v=t)
            spattn.attention(x, x, x, mesh, joint_mask=m, **joint)
        elif kind == "backend":
            spattn.attention(x, x, x, mesh, backend="nope")
        else:
            raise AssertionError(kind)
    except (ValueError, TypeError, RuntimeError) as e:
        # Prove no collective was left half-done: a barrier right after must pass promptly.
        if dist.is_initialized():
            dist.barrier()
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"no error raised for {kind}")


def shard_gather_roundtrip(u: int, r: int, seq: int, layout: str) -> bool:
    mesh = get_mesh(u, r)
    x = torch.arange(2 * seq * 3, dtype=torch.float32).view(2, seq, 3).requires_grad_()
    loc = spattn.shard(x, mesh, layout=layout)
    assert loc.shape[1] == spattn.local_seq_len(seq, mesh, layout)
    full = spattn.gather(loc, mesh, seq_len=seq, layout=layout)
    assert torch.equal(full, x.detach()), "gather(shard(x)) != x"
    full.sum().backward()
    # The replicated result's gradient counts once: each rank's input gets its own positions' part.
    ids = spattn.shard(torch.arange(1, seq + 1, dtype=torch.float32).view(1, seq), mesh, layout=layout).flatten()
    mine = torch.zeros(seq)
    mine[(ids[ids > 0] - 1).long()] = 1  # 0 marks padding
    expect = mine.view(1, seq, 1).expand_as(x)
    assert torch.equal(x.grad, expect), "shard/gather gradient is not this rank's slice"
    if layout == "contiguous" and seq % mesh.world_size == 0:  # rank r holds the r-th chunk
        c = seq // mesh.world_size
        assert torch.equal(loc.detach(), x.detach()[:, mesh.sp_rank * c:(mesh.sp_rank + 1) * c])
    return True


def mesh_info(u: int, r: int) -> list:
    mesh = get_mesh(u, r)
    info = [mesh.ulysses_degree, mesh.ring_degree, mesh.world_size, mesh.sp_rank, mesh.ulysses_rank, mesh.ring_rank]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, info)
    return parts


def subgroup_mesh(u: int, r: int) -> list:
    """init_mesh over a subgroup (the even ranks) called by its members only."""
    world = dist.get_world_size()
    ranks = list(range(0, world, 2))
    sub = dist.new_group(ranks)
    if dist.get_rank() not in ranks:
        return []
    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r, group=sub)
    torch.manual_seed(0)
    q = torch.randn(1, 16 * len(ranks), 4, 16)
    loc = spattn.shard(q, mesh)
    out = spattn.gather(spattn.attention(loc, loc, loc, mesh, causal=True), mesh)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2),
                                         is_causal=True).transpose(1, 2)
    return [(out - ref).abs().max().item(), mesh.sp_rank]


def mismatched_shards(u: int, r: int) -> str:
    """Rank 0 passes a longer shard than the others. With check=1 every rank must raise the
    same clear error instead of entering a mismatched collective."""
    mesh = get_mesh(u, r)
    n = 12 if dist.get_rank() == 0 else 8
    x = torch.randn(1, n, 4, 16)
    try:
        spattn.attention(x, x, x, mesh, check=1)
    except ValueError as e:
        dist.barrier()
        return str(e)
    raise AssertionError("mismatched shards were not detected")


def engines_identical(c: Case) -> bool:
    """The ring engine only moves bytes: Python and C++ engines must give bit-identical results."""
    mesh = get_mesh(c.u, c.r)
    q, k, v, dout, _ = _inputs(c)
    kw = dict(seq_len=c.seq, layout=c.layout)
    results = []
    for engine in ("python", "cpp"):
        ql, kl, vl = (spattn.shard(t, mesh, **kw).requires_grad_() for t in (q, k, v))
        out = spattn.attention(ql, kl, vl, mesh, causal=c.causal, ring_engine=engine, **kw)
        out.backward(spattn.shard(dout, mesh, **kw))
        results.append([out.detach(), ql.grad, kl.grad, vl.grad])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between the Python and C++ ring engines"
    return True
