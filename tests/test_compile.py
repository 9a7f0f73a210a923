"""torch.compile(fullgraph=True) of a model calling spattn.attention: no graph break in any mode
(Ulysses, Ring, hybrid), and the compiled forward and backward give the eager numbers."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dist_harness import run_on_ranks


class TinyAttention(nn.Module):
    """q/k/v projections (GQA: 4 query heads, 2 KV heads), spattn.attention, out projection."""

    def __init__(self, mesh, *, causal: bool, seq_len: int, layout: str, dim: int = 32, heads: int = 4,
                 kv_heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.mesh, self.causal, self.seq_len, self.layout = mesh, causal, seq_len, layout
        self.shape = (heads, kv_heads, head_dim)
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):  # x: (batch, s_local, dim), this rank's shard
        import spattn

        b, s, _ = x.shape
        h, hkv, d = self.shape
        q = self.q(x).view(b, s, h, d)
        k, v = self.k(x).view(b, s, hkv, d), self.v(x).view(b, s, hkv, d)
        out = spattn.attention(q, k, v, self.mesh, causal=self.causal, seq_len=self.seq_len, layout=self.layout)
        return self.o(out.reshape(b, s, h * d))


def _compile_counting(model):
    """``torch.compile(model, fullgraph=True)`` on aot_eager, plus the list of graphs it produces
    (filled as dynamo compiles), so a test can assert one graph and no recompiles."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return torch.compile(model, fullgraph=True, backend=counting_backend), graphs


def compiled_vs_eager(u: int, r: int, causal: bool, seq_len: int, layout: str):
    """Max abs differences (output, input grad, parameter grads) between eager and compiled runs,
    and the number of graphs dynamo made (1 = no graph break)."""
    import torch._dynamo

    import spattn

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    torch.manual_seed(0)
    model = TinyAttention(mesh, causal=causal, seq_len=seq_len, layout=layout)
    x_full = torch.randn(2, seq_len, 32)
    x = spattn.shard(x_full, mesh, layout=layout)

    def run(fn):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]

    y0, gx0, gp0 = run(model)
    compiled, graphs = _compile_counting(model)
    y1, gx1, gp1 = run(compiled)
    y2, _, _ = run(compiled)  # second call: cached graph, same numbers
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731

    # Inference with the LSE: no tensors saved for backward, LSE (batch, heads, s) as in eager.
    def attn_lse(q, k, v):
        return spattn.attention(q, k, v, mesh, causal=causal, seq_len=seq_len, layout=layout, return_lse=True)

    q, k, v = (spattn.shard(torch.randn(2, seq_len, h, 8), mesh, layout=layout) for h in (4, 2, 2))
    with torch.no_grad():
        o0, l0 = attn_lse(q, k, v)
        o1, l1 = torch.compile(attn_lse, fullgraph=True, backend="aot_eager")(q, k, v)
        # spattn.shard (plain slicing) traces inside the compiled region too
        y3 = torch.compile(lambda xf: model(spattn.shard(xf, mesh, layout=layout)), fullgraph=True,
                           backend="aot_eager")(x_full)
    d_lse = max(diff(o0, o1), diff(y0, y3), float((l0 - l1).nan_to_num(posinf=0, neginf=0).abs().max()),
                float((l0.isinf() != l1.isinf()).sum()))
    n_graphs = len(graphs) if all("spattn.attention_fwd" in str(gm.graph) for gm in graphs) else -1
    return (diff(y0, y1), diff(gx0, gx1), max(diff(a, b) for a, b in zip(gp0, gp1)), diff(y1, y2), d_lse, n_graphs)


MESHES = [(2, 2, 1), (2, 1, 2), (4, 2, 2)]


@pytest.mark.parametrize("causal,seq_len,layout", [(True, 13, "zigzag"), (False, 12, "contiguous")])
@pytest.mark.parametrize("world,u,r", MESHES)
def test_compiled_attention_matches_eager(world, u, r, causal, seq_len, layout):
    d_out, d_gx, d_gp, d_rerun, d_lse, n_graphs = run_on_ranks(world, compiled_vs_eager, u, r, causal, seq_len, layout,
                                                        timeout=600)
    assert n_graphs == 1, "a graph break at the attention (or no spattn op in the graph: -1)"
    assert d_out <= 1e-6 and d_gx <= 1e-6 and d_gp <= 1e-6, (d_out, d_gx, d_gp)
    assert d_rerun == 0.0 and d_lse <= 1e-6, (d_rerun, d_lse)


def compiled_joint_vs_eager(u: int, r: int, seq_len: int, text_len: int):
    """Joint (text + image) attention compiled fullgraph vs eager: max abs differences of out,
    joint_out, LSEs and the six gradients."""
    import torch._dynamo

    import spattn

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    torch.manual_seed(1)
    full = [torch.randn(2, seq_len, h, 8) for h in (4, 2, 2)]
    image = [spattn.shard(t, mesh) for t in full]
    text = [torch.randn(2, text_len, h, 8) for h in (4, 2, 2)]

    def f(q, k, v, jq, jk, jv):
        return spattn.attention(q, k, v, mesh, seq_len=seq_len, joint_q=jq, joint_k=jk, joint_v=jv,
                                return_lse=True)

    def run(fn):
        xs = [t.clone().requires_grad_() for t in image + text]
        out, jout, lse, jlse = fn(*xs)
        (out * out.detach().cos()).sum().add((jout * jout.detach().sin()).sum()).backward()
        return [out.detach(), jout.detach(), lse.nan_to_num(neginf=0), jlse.detach()] + [x.grad for x in xs]

    ref = run(f)
    torch._dynamo.reset()
    got = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    return max(float((a - b).abs().max()) for a, b in zip(ref, got))


@pytest.mark.parametrize("world,u,r", MESHES)
def test_compiled_joint_attention_matches_eager(world, u, r):
    assert run_on_ranks(world, compiled_joint_vs_eager, u, r, 11, 5, timeout=600) <= 1e-6


def compiled_changing_lengths(u: int, r: int, lengths):
    """One compiled function called with several sequence lengths (recompiles or dynamic shapes):
    max abs differences of output and dq vs eager for each."""
    import spattn

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    torch.manual_seed(0)

    def f(q, k, v, S):
        return spattn.attention(q, k, v, mesh, causal=True, seq_len=S, layout="zigzag")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    worst = 0.0
    for S in lengths:
        q, k, v = (spattn.shard(torch.randn(1, S, h, 8), mesh, layout="zigzag").requires_grad_() for h in (4, 2, 2))
        a = f(q, k, v, S)
        a.sum().backward()
        g, q.grad = q.grad.clone(), None
        b = cf(q, k, v, S)
        b.sum().backward()
        worst = max(worst, float((a - b).abs().max()), float((g - q.grad).abs().max()))
    return worst


def test_compiled_attention_changing_lengths():
    assert run_on_ranks(2, compiled_changing_lengths, 2, 1, (13, 17, 21), timeout=600) <= 1e-6


def test_traced_attention_takes_every_argument_of_attention():
    """The compile path must see every option of spattn.attention: eager and compiled calls share one
    op, so every keyword of attention() must reach it (as an option or an op input), or it would be
    silently dropped in both."""
    import inspect

    import spattn
    from spattn.call import Inputs, Options

    want = set(inspect.signature(spattn.attention).parameters) - {"q", "k", "v", "mesh"}
    tensors = {"joint_q", "joint_k", "joint_v", "joint_mask", "cu_seqlens"}
    assert want - tensors == {f.name for f in __import__("dataclasses").fields(Options)}, \
        "spattn.call.Options must have a field for every keyword option of attention()"
    src = inspect.getsource(spattn.attention)
    call = src[src.index("options_id("):src.index(")", src.index("options_id("))]
    missing = [p for p in want - tensors - {"seq_len"} if f"{p}={p}" not in call]
    assert not missing, f"attention() does not pass {missing} to the op's options"
    # seq_len travels as an op argument of its own (it may be a dynamic int under torch.compile)
    assert "Inputs(q, k, v, joint_q, joint_k, joint_v, jlens, cu_seqlens), mesh, opts, seq_len)" in src
    assert len(Inputs._fields) == 8


class TinyJoint(nn.Module):
    """MMDiT-style block: image and text projections, joint attention with a text mask, out projections."""

    def __init__(self, mesh, seq_len: int, dim: int = 16, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.mesh, self.seq_len, self.shape = mesh, seq_len, (heads, kv_heads, head_dim)
        width = (heads + 2 * kv_heads) * head_dim
        self.img, self.txt = nn.Linear(dim, width), nn.Linear(dim, width)
        self.img_o, self.txt_o = nn.Linear(heads * head_dim, dim), nn.Linear(heads * head_dim, dim)

    def _qkv(self, proj, x):
        h, hkv, d = self.shape
        b, n, _ = x.shape
        q, k, v = proj(x).split([h * d, hkv * d, hkv * d], dim=-1)
        return q.view(b, n, h, d), k.view(b, n, hkv, d), v.view(b, n, hkv, d)

    def forward(self, x, y, mask):  # x: (batch, s_local, dim) image shard; y: (batch, text, dim); mask (batch, text)
        import spattn

        q, k, v = self._qkv(self.img, x)
        jq, jk, jv = self._qkv(self.txt, y)
        out, jout = spattn.attention(q, k, v, self.mesh, seq_len=self.seq_len, joint_q=jq, joint_k=jk,
                                     joint_v=jv, joint_mask=mask)
        return self.img_o(out.flatten(2)), self.txt_o(jout.flatten(2))


def compiled_masked_joint_vs_eager(u: int, r: int, seq_len: int, mask_rows):
    """joint_mask under torch.compile(fullgraph=True) vs eager: max abs difference over the image and
    text outputs (two masks) and the gradients of both inputs and every parameter, the rerun
    difference, and the number of graphs (1 = no graph break, no recompile for the second mask)."""
    import spattn

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    torch.manual_seed(2)
    model = TinyJoint(mesh, seq_len)
    mask = torch.tensor(mask_rows, dtype=torch.bool)
    x = spattn.shard(torch.randn(2, seq_len, 16), mesh)
    y = torch.randn(2, mask.shape[1], 16)

    def run(fn):
        # Two calls with different masks (the same graph: mask values are data) before one backward:
        # each backward must use its own call's text lengths.
        model.zero_grad()
        xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
        a, b = fn(xi, yi, mask)
        a2, b2 = fn(xi, yi, mask.flip(0))
        loss = (a * a.detach().cos()).sum() + (b * b.detach().sin()).sum() + (a2 * b2.mean(1, keepdim=True)).sum()
        loss.backward()
        return [a.detach(), b.detach(), a2.detach(), b2.detach(), xi.grad, yi.grad] + \
            [p.grad.clone() for p in model.parameters()]

    ref = run(model)
    compiled, graphs = _compile_counting(model)
    got = run(compiled)
    again = run(compiled)
    n_graphs = len(graphs) if all("spattn.attention_fwd" in str(gm.graph) for gm in graphs) else -1

    # Inference with the LSEs (no saved tensors): out, joint_out, lse, joint_lse as in eager.
    def attn_lse(q, k, v, jq, jk, jv, m):
        return spattn.attention(q, k, v, mesh, seq_len=seq_len, joint_q=jq, joint_k=jk, joint_v=jv,
                                joint_mask=m, return_lse=True)

    qkv = [spattn.shard(torch.randn(2, seq_len, h, 8), mesh) for h in (4, 2, 2)]
    jqkv = [torch.randn(2, mask.shape[1], h, 8) for h in (4, 2, 2)]
    with torch.no_grad():
        e = attn_lse(*qkv, *jqkv, mask)
        c = torch.compile(attn_lse, fullgraph=True, backend="aot_eager")(*qkv, *jqkv, mask)
    d_inf = max(float((a - b).nan_to_num(posinf=0, neginf=0).abs().max()) for a, b in zip(e, c))
    d_inf = max(d_inf, *(float((a.isinf() != b.isinf()).sum()) for a, b in zip(e, c)))
    return (max(d_inf, max(float((a - b).abs().max()) for a, b in zip(ref, got))),
            max(float((a - b).abs().max()) for a, b in zip(got, again)), n_graphs)


MASKS = {"pad": [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]],    # right-padded, shorter than text_len
         "hole": [[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]}  # holes and a masked first token


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("world,u,r", MESHES)
def test_compiled_joint_mask_matches_eager(world, u, r, mask):
    d, d_rerun, n_graphs = run_on_ranks(world, compiled_masked_joint_vs_eager, u, r, 11, MASKS[mask], timeout=600)
    assert n_graphs == 1, "a graph break at the attention (or no spattn op in the graph: -1)"
    assert d <= 1e-6, d
    assert d_rerun == 0.0, d_rerun


def compiled_documents_vs_eager(u: int, r: int, ring_impl: str):
    """Packed documents (cu_seqlens) and an explicit ring_impl under torch.compile(fullgraph=True) vs
    eager: max abs difference of out, LSE and dq/dk/dv over two document layouts (the boundaries are
    data: one graph for both), and the number of graphs."""
    import spattn

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    S = 24
    torch.manual_seed(3)
    q, k, v = (spattn.shard(torch.randn(1, S, h, 8), mesh, layout="zigzag") for h in (4, 2, 2))
    graphs = []

    def counting(gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def f(q, k, v, cu):
        return spattn.attention(q, k, v, mesh, causal=True, layout="zigzag", cu_seqlens=cu, ring_impl=ring_impl,
                                return_lse=True)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=counting)
    worst = 0.0
    for cu in (torch.tensor([0, 5, 13, 24]), torch.tensor([0, 2, 20, 24])):
        res = []
        for fn in (f, cf):
            qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
            out, lse = fn(qi, ki, vi, cu)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            res.append([out.detach(), lse.nan_to_num(neginf=0), qi.grad, ki.grad, vi.grad])
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(*res)))
    n_graphs = len(graphs) if all("spattn.attention_fwd" in str(gm.graph) for gm in graphs) else -1
    return worst, n_graphs


@pytest.mark.parametrize("world,u,r,impl", [(2, 1, 2, "p2p"), (2, 1, 2, "allgather"), (4, 2, 2, "p2p")])
def test_compiled_documents_match_eager(world, u, r, impl):
    """cu_seqlens and ring_impl work under torch.compile: the same op as eager, so the same numbers."""
    worst, n_graphs = run_on_ranks(world, compiled_documents_vs_eager, u, r, impl, timeout=600)
    assert n_graphs == 1, "a graph break at the attention (or no spattn op in the graph: -1)"
    assert worst == 0.0, worst
