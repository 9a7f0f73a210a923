"""init_mesh(cfg_degree=...): CFG parts are contiguous blocks of ulysses x ring ranks; attention runs
inside each part only (each part may hold different inputs: the other CFG branch)."""
import torch
import torch.distributed as dist

import spattn
from dist_harness import run_on_ranks


def _layout(u, r, c):
    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r, cfg_degree=c)
    return (dist.get_rank(), mesh.cfg_degree, mesh.cfg_rank, mesh.world_size, mesh.sp_rank,
            dist.get_process_group_ranks(mesh.cfg_group) if mesh.cfg_group is not None else None)


def _all_layouts(u, r, c):
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, _layout(u, r, c))
    return rows


def test_cfg_mesh_layout():
    rows = run_on_ranks(4, _all_layouts, 2, 1, 2)
    # ranks 0,1 = branch 0 (sp 0,1); ranks 2,3 = branch 1; cfg groups join equal sp_rank
    assert [(g, c, cr, w, s) for g, c, cr, w, s, _ in rows] == [
        (0, 2, 0, 2, 0), (1, 2, 0, 2, 1), (2, 2, 1, 2, 0), (3, 2, 1, 2, 1)]
    assert [cg for *_, cg in rows] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    rows = run_on_ranks(4, _all_layouts, 1, 1, 4)
    assert [(c, cr, w) for _, c, cr, w, _, _ in rows] == [(4, i, 1) for i in range(4)]


def _attention_per_branch(u, r, c):
    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r, cfg_degree=c)
    g = torch.Generator().manual_seed(100 + mesh.cfg_rank)  # each branch has its own inputs
    q, k, v = (torch.randn(1, 24, 4, 8, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = spattn.attention(*(spattn.shard(t, mesh) for t in (q, k, v)), mesh)
    return (spattn.gather(out, mesh) - ref).abs().max().item()


def test_attention_inside_each_cfg_part():
    assert run_on_ranks(4, _attention_per_branch, 2, 1, 2) < 1e-5
    assert run_on_ranks(4, _attention_per_branch, 1, 2, 2) < 1e-5


def _bad(u, r, c):
    try:
        spattn.init_mesh(ulysses_degree=u, ring_degree=r, cfg_degree=c)
    except ValueError as e:
        return str(e)


def test_cfg_degree_mismatch_is_a_clear_error():
    msg = run_on_ranks(4, _bad, 4, 1, 2)
    assert "cfg_degree (2)" in msg and "must equal the group size (4)" in msg
