"""Release what an integration keeps of a mesh (ring engines, their buffers) before the interpreter
shuts down.

Why: a mesh bound into a registry (transformers' AttentionInterface) or a handle lives until the
interpreter's final teardown. Freed then, a ring engine's tensors and the gloo groups' worker threads
can need the GIL while Python is finalizing; a thread that asks for it then is ended by Python with a
forced unwind, which C++ turns into ``terminate called without an active exception`` (SIGABRT). An
``atexit`` callback runs while the interpreter is whole, so the release there is an ordinary one.
"""
from __future__ import annotations

import atexit
import weakref
from typing import Callable, Optional

import torch.distributed as dist


def release_at_exit(mesh, also: Optional[Callable[[], None]] = None) -> None:
    """At interpreter exit, drop ``mesh``'s cached ring exchanges (if the mesh is still alive) and
    run ``also`` (e.g. unregister a function that holds the mesh). Holds the mesh weakly."""
    ref = weakref.ref(mesh)

    def release() -> None:
        if also is not None:
            also()
        m = ref()
        if m is None:
            return
        cache = getattr(m, "comm_cache", None)
        if cache is not None:
            cache.clear()
        if not dist.is_initialized():
            # destroy_process_group ran: the mesh's groups are dead handles and the mesh holds the
            # last references to them; drop them now rather than in the interpreter's teardown.
            for attr in ("ulysses_group", "ring_group", "cfg_group", "_check_groups"):
                if hasattr(m, attr):
                    setattr(m, attr, None)

    atexit.register(release)
