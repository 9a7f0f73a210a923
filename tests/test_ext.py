"""spattn._C: fused merge vs merge_ref, build/staleness reporting, and the C++ ring engine on gloo ranks.

The file is skipped when the extension is not built, unless the build was asked for
(SPATTN_FORCE_CUDA=1 or SPATTN_REQUIRE_EXT=1 in the environment): then a missing build fails.
"""
from __future__ import annotations

import os
import shutil
import sys
import types

import pytest
import torch

from spattn import _ext, ops

_asked = any(os.environ.get(v, "") in ("1", "true", "yes", "on") for v in ("SPATTN_FORCE_CUDA", "SPATTN_REQUIRE_EXT"))
if not _ext.available():
    why = _ext._try_load()[1]
    if _asked:
        raise RuntimeError(f"spattn._C was required by the environment but {why}; {_ext.REBUILD_CMD}")
    pytest.skip(f"spattn._C not built ({why}): pip install --no-build-isolation -e .", allow_module_level=True)

from dist_harness import run_on_ranks  # noqa: E402

C = _ext.load(required=True)
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Fused CPU merge
# ----------------------------------------------------------------------------------------------
def _inputs(shape, dtype, inf, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = shape
    out = torch.randn(shape, generator=g)
    lse = torch.randn(b, h, s, generator=g) * 3
    blk = torch.randn(shape, generator=g).to(dtype)
    blk_lse = torch.randn(b, h, s, generator=g) * 3
    rows = torch.rand(b, h, s, generator=g) < 0.4
    if inf in ("run", "both"):
        lse[rows] = NEG_INF
    if inf in ("blk", "both"):
        blk_lse[rows if inf == "both" else ~rows] = NEG_INF
    if inf == "all":
        lse.fill_(NEG_INF)
        blk_lse.fill_(NEG_INF)
    out.transpose(1, 2)[lse == NEG_INF] = 0  # a row that saw no key is 0 (spattn's convention)
    return out, lse, blk, blk_lse


def _check_against_ref(out, lse, blk, blk_lse, fn):
    ref_out, ref_lse = ops.merge_ref(out, lse, blk, blk_lse)
    o, l = out.clone(), lse.clone()
    fn(o, l, blk, blk_lse)
    assert not o.isnan().any() and not l.isnan().any()
    torch.testing.assert_close(l, ref_lse, rtol=1e-6, atol=1e-6)  # -inf must match -inf
    torch.testing.assert_close(o, ref_out, rtol=1e-5, atol=1e-6)


SHAPES = [(1, 16, 2, 64), (2, 37, 3, 67), (1, 5, 1, 1), (2, 70, 4, 128), (1, 33, 5, 24), (3, 1, 2, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inf", ["none", "run", "blk", "both", "all"])
def test_merge_cpu_matches_ref(dtype, shape, inf):
    _check_against_ref(*_inputs(shape, dtype, inf), C.merge_cpu_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_cpu_portable_path(dtype, monkeypatch):
    """The at::vec path used on CPUs without AVX2/F16C gives the same results."""
    monkeypatch.setenv("SPATTN_MERGE_NO_AVX2", "1")
    for shape in SHAPES:
        _check_against_ref(*_inputs(shape, dtype, "both"), C.merge_cpu_)


def test_merge_cpu_both_minus_inf_row_stays_empty():
    out, lse, blk, blk_lse = _inputs((1, 8, 2, 16), torch.float32, "all")
    C.merge_cpu_(out, lse, blk, blk_lse)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == NEG_INF).all())


def test_merge_registered_and_strided_inputs():
    assert _ext.register_merge_if_available()
    out, lse, blk, blk_lse = _inputs((2, 20, 3, 40), torch.bfloat16, "both")
    # blk as a strided view (e.g. a slice of a packed buffer) takes the fast path after .contiguous().
    packed = torch.stack([blk, blk]).transpose(0, 1).contiguous()
    _check_against_ref(out, lse, packed[:, 0], blk_lse, lambda *a: ops.merge_(*a, impl="cpp"))
    ref_out, ref_lse = ops.merge_ref(out, lse, blk, blk_lse)
    # Sequence slices of a bigger running output (as the ring merges them): fused, in place.
    big_o, big_l = torch.zeros(2, 50, 3, 40), torch.full((2, 3, 50), NEG_INF)
    o, l = big_o[:, 7:27], big_l[:, :, 7:27]
    o.copy_(out)
    l.copy_(lse)
    C.merge_cpu_(o, l, blk, blk_lse)
    torch.testing.assert_close(o, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l, ref_lse)
    assert not big_o[:, 27:].any() and bool((big_l[:, :, :7] == NEG_INF).all())  # outside untouched
    # A running output with a strided last dim falls back to the torch merge, still in place.
    wide = torch.zeros(2, 20, 3, 80)
    o = wide[..., ::2]
    o.copy_(out)
    l = lse.clone()
    ops.merge_(o, l, blk, blk_lse)  # "auto" picks "cpp" for CPU tensors
    torch.testing.assert_close(o, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l, ref_lse)


def test_merge_autograd_tracked_inputs_use_torch():
    """Autograd must see the merge when it tracks the block: the fused kernel is bypassed then."""
    assert _ext.register_merge_if_available()
    out, lse, blk, blk_lse = _inputs((1, 8, 2, 16), torch.float32, "none")
    blk.requires_grad_(True)
    o = out.clone()
    ops.merge_(o, lse.clone(), blk, blk_lse)
    o.sum().backward()
    assert blk.grad is not None and blk.grad.abs().sum() > 0


def test_merge_cpu_rejects_bad_shapes():
    out, lse, blk, blk_lse = _inputs((1, 8, 2, 16), torch.float32, "none")
    with pytest.raises(RuntimeError, match="lse must be"):
        C.merge_cpu_(out, lse.transpose(1, 2).contiguous(), blk, blk_lse)
    with pytest.raises(RuntimeError, match="float32"):
        C.merge_cpu_(out.double(), lse, blk, blk_lse)


# ----------------------------------------------------------------------------------------------
# Build reporting: missing / stale builds, CUDA build present when asked for
# ----------------------------------------------------------------------------------------------
def test_missing_or_stale_build_messages(monkeypatch):
    monkeypatch.setattr(_ext, "_try_load", lambda: (None, "spattn._C is not built"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        _ext.ring_engine_class(required=True)
    _ext._say_fallback_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="Python ring exchange"):
        assert _ext.ring_engine_class(required=False) is None
    from spattn.comm import make_ring_comm

    with pytest.raises(RuntimeError, match="rebuild it with: pip install"):
        make_ring_comm(None, torch.empty(1), engine="cpp")
    assert not _ext.register_merge_if_available()
    _ext._say_fallback_once.cache_clear()


def test_stale_module_detected(monkeypatch):
    loader = _ext._try_load.__wrapped__  # uncached
    fake = types.ModuleType("spattn._C")
    fake.ABI_VERSION = _ext.ABI_VERSION - 1
    monkeypatch.setitem(sys.modules, "spattn._C", fake)
    mod, why = loader()
    assert mod is None and "stale" in why and "ABI" in why
    if _ext._checkout_csrc() is not None:  # running from a source checkout: csrc/ edits are caught
        fake.ABI_VERSION, fake.SOURCE_HASH = _ext.ABI_VERSION, "0" * 16
        mod, why = loader()
        assert mod is None and "csrc/ changed" in why


def test_source_hash_tracks_edits(tmp_path):
    src = _ext._checkout_csrc()
    if src is None:
        pytest.skip("not running from a source checkout (no csrc/ next to the package)")
    assert C.SOURCE_HASH == _ext.source_hash(src)  # the build under test is current
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    before = _ext.source_hash(copy)
    with open(copy / "merge_cpu.cpp", "a") as f:
        f.write("\n// edit\n")
    assert _ext.source_hash(copy) != before


def test_cuda_build_present():
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: there is no CUDA build of spattn._C to check")
    forced = os.environ.get("SPATTN_FORCE_CUDA", "") in ("1", "true", "yes", "on")
    if not forced and not C.cuda_compiled():
        pytest.skip("spattn._C was built without CUDA (no GPU at build time and SPATTN_FORCE_CUDA unset)")
    assert C.cuda_compiled(), "SPATTN_FORCE_CUDA=1 but spattn._C has no CUDA code: rebuild it"
    assert hasattr(C, "merge_cuda_")
    if torch.cuda.is_available():
        out, lse, blk, blk_lse = (t.cuda() for t in _inputs((2, 37, 3, 67), torch.bfloat16, "both"))
        _check_against_ref(out, lse, blk, blk_lse, C.merge_cuda_)


# ----------------------------------------------------------------------------------------------
# Ring engine on gloo ranks (run by tests/dist_harness.py; functions must be module-level)
# ----------------------------------------------------------------------------------------------
def _ring_lap(comm, first, steps):
    """Pass blocks around the ring; check the double-buffer rule; return what arrived each step."""
    cur, got, last = first, [], None
    for _ in range(steps):
        comm.start(cur)
        recv = comm.wait()
        if last is not None:  # wait() alternates between two buffers, never the one just returned
            assert recv.data_ptr() != last
        last = recv.data_ptr()
        got.append(recv.clone())
        cur = recv
    return got


def engine_ring_matches_python(steps):
    """Ring of K/V-packed messages: the C++ engine must deliver exactly what RingComm delivers."""
    import torch.distributed as dist

    from spattn.comm import RingComm, make_ring_comm

    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    k = torch.randn(2, 33, 3, 16, generator=torch.Generator().manual_seed(rank))
    kv = torch.stack([k, k * 2])  # K and V packed: one message
    eng = make_ring_comm(group, kv, engine="cpp")
    assert type(eng).__name__ == "CppRingComm" and (eng.next, eng.prev) == ((rank + 1) % size, (rank - 1) % size)
    got_cpp = _ring_lap(eng, kv, steps)
    got_py = _ring_lap(RingComm(group, kv), kv, steps)
    for j, (a, b) in enumerate(zip(got_cpp, got_py)):
        assert torch.equal(a, b), f"step {j}: engines disagree"
        src = (rank - j - 1) % size
        want = torch.randn(2, 33, 3, 16, generator=torch.Generator().manual_seed(src))
        assert torch.equal(a[0], want) and torch.equal(a[1], want * 2), f"step {j}: not rank {src}'s block"
    return True


def engine_two_in_flight(steps):
    """The ring backward pattern: K/V forward and fp32 dK/dV partials both in flight on one group."""
    import torch.distributed as dist

    from spattn.comm import make_ring_comm

    rank, size = dist.get_rank(), dist.get_world_size()
    kv = torch.full((2, 4, 8), float(rank), dtype=torch.bfloat16)
    acc = torch.zeros(2, 4, 8)
    kv_comm = make_ring_comm(dist.group.WORLD, kv, engine="cpp")
    dkv_comm = make_ring_comm(dist.group.WORLD, acc, engine="cpp")
    cur, send = kv, None
    for j in range(steps):
        kv_comm.start(cur)
        contrib = torch.full_like(acc, float(cur[0, 0, 0]))  # "gradient" w.r.t. the block we hold
        send = contrib.clone() if j == 0 else dkv_comm.wait().add_(contrib)
        dkv_comm.start(send)
        cur = kv_comm.wait()
        assert float(cur[0, 0, 0]) == (rank - j - 1) % size
    dkv = dkv_comm.wait()
    # A partial travels with its K/V block, so after `steps` hops it holds `steps` contributions of
    # the block that started `steps` ranks back.
    want = float(steps * ((rank - steps) % size))
    assert torch.equal(dkv, torch.full_like(acc, want)), (rank, dkv.flatten()[0].item(), want)
    return True


def engine_subgroups_and_errors():
    """Rings on subgroups (group-local ranks), a ring of one, and misuse errors."""
    import torch.distributed as dist

    from spattn._ext import CppRingComm

    rank, size = dist.get_rank(), dist.get_world_size()
    evens, odds = dist.new_group(list(range(0, size, 2))), dist.new_group(list(range(1, size, 2)))
    singles = [dist.new_group([r]) for r in range(size)]
    mine = evens if rank % 2 == 0 else odds
    members = list(range(rank % 2, size, 2))
    eng = CppRingComm(mine, torch.empty(3))
    eng.start(torch.full((3,), float(rank)))
    got = eng.wait()
    i = members.index(rank)
    assert got[0].item() == members[(i - 1) % len(members)] and eng.next == members[(i + 1) % len(members)]
    one = CppRingComm(singles[rank], torch.empty(3))
    one.start(torch.full((3,), 7.0))
    assert torch.equal(one.wait(), torch.full((3,), 7.0))
    errors = []
    for bad in (lambda: eng.wait(), lambda: eng.start(torch.empty(4)), lambda: eng.start(torch.empty(3).double())):
        try:
            bad()
        except RuntimeError as e:
            errors.append(str(e))
    assert len(errors) == 3 and "without start" in errors[0] and "does not match" in errors[1], errors
    eng.start(torch.zeros(3))
    try:
        eng.start(torch.zeros(3))
        raise AssertionError("start twice must fail")
    except RuntimeError as e:
        assert "twice" in str(e)
    eng.wait()
    return True


def engine_outlives_group(rounds):
    """Dropping an engine after destroy_process_group(group) releases the last reference to the
    group; that must not deadlock on the GIL with gloo's worker threads (it did once)."""
    import torch.distributed as dist

    from spattn._ext import CppRingComm

    for _ in range(rounds):
        g = dist.new_group(list(range(dist.get_world_size())))
        eng = CppRingComm(g, torch.empty(4))
        eng.start(torch.zeros(4))
        eng.wait()
        dist.barrier(group=g)
        dist.destroy_process_group(g)
        del eng, g
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_engine_ring_matches_python(world):
    assert run_on_ranks(world, engine_ring_matches_python, 2 * world + 1)


@pytest.mark.parametrize("world", [2, 4])
def test_engine_two_in_flight(world):
    assert run_on_ranks(world, engine_two_in_flight, world)


def test_engine_subgroups_and_errors():
    assert run_on_ranks(4, engine_subgroups_and_errors)


def test_engine_outlives_group():
    assert run_on_ranks(2, engine_outlives_group, 20, timeout=120)
