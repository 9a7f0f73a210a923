"""Triton kernels for spattn (leaf code: imports nothing from spattn)."""
