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


def release_at_exit(mesh, also: Optional[Callable[[], None]] = None) -> None:
    """At interpreter exit, drop ``mesh``'s cached ring exchanges (if the mesh is still alive) and
    run ``also`` (e.g. unregister a function that holds the mesh). Holds the mesh weakly."""
    ref = weakref.ref(mesh)

    def release() -> None:
        if also is not None:
            also()
        m = ref()
        cache = getattr(m, "comm_cache", None)
        if cache is not None:
            cache.clear()

    atexit.register(release)
