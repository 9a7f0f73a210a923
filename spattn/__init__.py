"""spattn: sequence-parallel attention (Ulysses, Ring and hybrid), forward and backward.

    mesh = spattn.init_mesh(ulysses_degree=2, ring_degree=2)   # after init_process_group
    q, k, v = (spattn.shard(t, mesh) for t in (q_full, k_full, v_full))
    out = spattn.attention(q, k, v, mesh, causal=True)         # this rank's shard of the output
    out_full = spattn.gather(out, mesh)

Layout: (batch, seq, heads, head_dim). LSE: natural log, fp32, (batch, heads, seq).
"""
from . import config, ops
from .attention import attention
from .check import verify_identical
from .layout import gather, local_seq_len, shard
from .mesh import SPMesh, init_mesh

# Nothing optional loads here: the C++ extension (spattn._C) loads on first use (ring engine, merges).

__all__ = ["attention", "init_mesh", "SPMesh", "shard", "gather", "local_seq_len", "ops", "config", "verify_identical"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # spattn.Engine & co.: the serving layer (above this API), loaded on first use, never at import.
    if name in ("Engine", "SamplingParams", "GenerationOutput", "EngineDeadError"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'spattn' has no attribute {name!r}")
