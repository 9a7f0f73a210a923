"""Optional C++ extension loader (spattn._C). Filled in by the csrc/ work."""
from __future__ import annotations


def ring_engine_class(required: bool = False):
    """The C++ ring engine class, or None when the extension is not built."""
    if required:
        raise RuntimeError("spattn: the C++ ring engine was requested but spattn._C is not built; "
                           "rebuild with: pip install --no-build-isolation -e .")
    return None
