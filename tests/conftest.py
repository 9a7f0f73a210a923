"""Test session setup.

No GPU here: Triton kernels run under the interpreter, which must be switched on before any kernel
module is imported (the @triton.jit decorator reads it). The rank pools of dist_harness live for the
whole session and are closed at exit.
"""
import os
import sys

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


def pytest_sessionfinish(session, exitstatus):
    from dist_harness import close_all

    close_all()
