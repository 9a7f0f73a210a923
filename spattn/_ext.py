"""Optional C++ extension loader (``spattn._C``).

The extension provides the C++ ring engine (transfers overlapped with compute on a comm stream /
gloo's background threads) and fused merge kernels. Everything works without it: callers get None
(or the torch merge) and spattn says once that it uses the Python paths. When the extension is
explicitly asked for, a missing, stale or broken build is an error that names the rebuild command.

``ops.merge_`` calls ``register_merge_if_available()`` on its first use (``import spattn`` loads
nothing optional) to use the fused kernels; it is silent and does nothing when the extension is absent.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

# Must equal kAbiVersion in csrc/spattn.h: bumped when the Python <-> C++ contract changes.
ABI_VERSION = 1
REBUILD_CMD = "pip install --no-build-isolation -e ."

__all__ = ["load", "available", "ring_engine_class", "register_merge_if_available", "CppRingComm",
           "ABI_VERSION", "REBUILD_CMD"]


def source_hash(csrc: Path) -> str:
    """Hash of the csrc/ sources; the same computation as ``csrc_hash`` in setup.py."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _checkout_csrc() -> Optional[Path]:
    """csrc/ of the source checkout this package runs from (editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    csrc = root / "csrc"
    return csrc if csrc.is_dir() and (root / "setup.py").is_file() else None


@functools.lru_cache(maxsize=None)
def _try_load() -> Tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) when spattn._C is importable and current, else (None, why not). Cached."""
    try:
        import torch.distributed  # noqa: F401 - registers c10d.ProcessGroup, used by _C's signatures

        mod = importlib.import_module("spattn._C")
    except ModuleNotFoundError as e:
        if e.name != "spattn._C":
            return None, f"spattn._C could not be imported ({e})"
        return None, "spattn._C is not built"
    except (ImportError, OSError) as e:  # e.g. undefined symbols: built against another torch
        return None, f"spattn._C is stale or broken and failed to import ({e})"
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        return None, (f"spattn._C is stale (ABI version {getattr(mod, 'ABI_VERSION', None)}, this spattn "
                      f"needs {ABI_VERSION})")
    csrc = _checkout_csrc()
    if csrc is not None:
        built, now = getattr(mod, "SOURCE_HASH", "unknown"), source_hash(csrc)
        if built != now:
            return None, (f"spattn._C is stale: csrc/ changed since it was built (built from {built}, "
                          f"sources are {now})")
    return mod, None


def load(required: bool = False) -> Optional[ModuleType]:
    """The extension module, or None; with ``required`` a missing/stale build raises RuntimeError."""
    mod, why = _try_load()
    if mod is None and required:
        raise RuntimeError(f"spattn: the C++ extension was requested but {why}; rebuild it with: "
                           f"{REBUILD_CMD}")
    return mod


def available() -> bool:
    """Whether spattn._C is built, importable and up to date."""
    return _try_load()[0] is not None


@functools.lru_cache(maxsize=None)
def _say_fallback_once(why: str) -> None:
    warnings.warn(f"spattn: {why}; using the Python ring exchange and torch merge instead "
                  f"(build the extension with: {REBUILD_CMD})", RuntimeWarning, stacklevel=4)


class CppRingComm:
    """``comm.RingComm`` backed by the C++ engine: same constructor, ``start``/``wait`` and
    double-buffer rule (``start`` receives into the buffer not returned by the last ``wait``).

    The engine packs nothing itself: the caller sends one tensor (K and V stacked) per step. On CUDA
    the transfer runs on a dedicated comm stream ordered by events against the caller's stream.

    Args:
        group: the ring process group (ranks ordered as the ring).
        like: a tensor whose shape/dtype/device the exchanged messages have.
    """

    def __init__(self, group, like: Tensor):
        import torch.distributed as dist

        self.group = group
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (rank - 1) % self.size)
        self._engine = load(required=True).RingEngine(group, like)

    def start(self, send: Tensor) -> None:
        """Send ``send`` to the next rank and start receiving the previous rank's block."""
        self._engine.start(send)

    def wait(self) -> Tensor:
        """Wait for the exchange started last; return the received block (an engine buffer)."""
        return self._engine.wait()


def ring_engine_class(required: bool = False):
    """The C++ ring engine class (``CppRingComm``), or None when the extension is not usable.

    With ``required`` a missing or stale build raises RuntimeError naming the rebuild command;
    otherwise the fallback to the Python engine is announced once per process.
    """
    mod, why = _try_load()
    if mod is None:
        load(required=required)  # raises when required
        _say_fallback_once(why)
        return None
    return CppRingComm


def _fused_merge(mod: ModuleType):
    """The in-place merge ``fn(out, lse, blk_out, blk_lse)`` for ops.register_merge.

    The kernels update fp32 ``out``/``lse`` in place, also strided views of them (the ring merges into
    sequence slices) as long as the last dim is dense; block inputs may have any layout (they are made
    contiguous). Anything else goes to the torch merge, so ``ops.merge_``'s contract always holds; so
    do tensors that autograd tracks (the kernels write through raw pointers, invisible to autograd).
    """
    from .backends.merges import merge_torch_  # the registry's layer: no import of ops (ops loads this module)

    kernels = {"cpu": mod.merge_cpu_}
    if mod.cuda_compiled():
        kernels["cuda"] = mod.merge_cuda_
    ok_blk = (torch.float32, torch.bfloat16, torch.float16)

    def merge(out: Tensor, lse: Tensor, blk_out: Tensor, blk_lse: Tensor) -> None:
        kernel = kernels.get(out.device.type)
        if (kernel is not None and out.dtype == torch.float32 and lse.dtype == torch.float32
                and blk_lse.dtype == torch.float32 and blk_out.dtype in ok_blk
                and out.dim() == 4 and lse.dim() == 3 and out.stride(3) == 1 and lse.stride(2) == 1
                and not (torch.is_grad_enabled() and (out.requires_grad or blk_out.requires_grad))):
            kernel(out, lse, blk_out, blk_lse)
        else:
            merge_torch_(out, lse, blk_out, blk_lse)

    return merge


def register_merge_if_available() -> bool:
    """Register the fused merges with ``spattn.ops``; silently False when spattn._C is not usable.

    "cpp" (CPU) is selected automatically by ``ops.merge_``. The CUDA kernel is registered as "cuda"
    for explicit use only (``merge_(..., impl="cuda")``): it is compiled in CI but has not been run
    on a GPU yet.
    """
    mod = load(required=False)
    if mod is None:
        return False
    from .backends.merges import register_merge

    fn = _fused_merge(mod)
    register_merge("cpp", fn, accepts=lambda t: t.device.type == "cpu")
    if mod.cuda_compiled():
        register_merge("cuda", fn, accepts=lambda t: False)
    return True
