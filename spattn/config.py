"""Every ``SPATTN_*`` environment variable, read once (at first use), each with an argument equivalent.

    variable                 default   argument that overrides it
    SPATTN_CHECK             1         init_mesh(check=...) / attention(check=...)   0 off, 1 signature, 2 + joint contents
    SPATTN_TIMEOUT_S         30        init_mesh(timeout_s=...)                      cross-rank check wait, seconds
    SPATTN_ULYSSES_CHUNKS    4         attention(ulysses_chunks=...)                 head chunks of the Ulysses pipeline
    SPATTN_RING_ENGINE       auto      attention(ring_engine=...)                    "auto", "python", "cpp"
    SPATTN_RING_IMPL         (rule)    attention(ring_impl=...)                      forces what ring_impl="auto" picks
    SPATTN_ALLGATHER_BYTES   256 MiB   attention(allgather_bytes=...)                K/V budget of one all-gather chunk

The environment is read the first time any of them is needed and never again (a process that
changes its environment on purpose calls ``reload()``); an argument always wins over the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["Settings", "settings", "reload", "check_mode_of", "timeout_of"]

CHECK_MODES = (0, 1, 2)
RING_ENGINES = ("auto", "python", "cpp")
FORCED_RING_IMPLS = ("p2p", "allgather")


@dataclass(frozen=True)
class Settings:
    """The environment's defaults (see the module docstring for each one's argument)."""

    check: int = 1
    timeout_s: float = 30.0
    ulysses_chunks: int = 4
    ring_engine: str = "auto"
    ring_impl: Optional[str] = None  # None: the measured rule decides
    allgather_bytes: int = 256 << 20


def check_mode_of(value, source: str) -> int:
    """A check mode (0, 1, 2) from an int or string, or a ValueError naming ``source``."""
    raw = str(value).strip() or "1"
    if raw not in ("0", "1", "2"):
        raise ValueError(f"spattn: {source} must be 0 (off), 1 (signature check, default) or 2 "
                         f"(also joint tensor contents), got {value!r}")
    return int(raw)


def timeout_of(value, source: str) -> float:
    """A positive number of seconds, or a ValueError naming ``source``."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = -1.0
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"spattn: {source} must be a positive number of seconds, got {value!r}")
    return t


def positive_int_of(value, source: str) -> int:
    """A positive int, or a ValueError naming ``source``."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or (not isinstance(value, str) and n != value):
        raise ValueError(f"spattn: {source} must be a positive int, got {value!r}")
    return n


def _read() -> Settings:
    env = os.environ.get
    engine = env("SPATTN_RING_ENGINE", "auto")
    if engine not in RING_ENGINES:
        raise ValueError(f"spattn: SPATTN_RING_ENGINE must be one of {RING_ENGINES}, got {engine!r} "
                         f"(or pass attention(ring_engine=...))")
    impl = env("SPATTN_RING_IMPL", "") or None
    if impl is not None and impl not in FORCED_RING_IMPLS:  # "" / "auto": the rule decides
        impl = None if impl == "auto" else impl
        if impl is not None:
            raise ValueError(f"spattn: SPATTN_RING_IMPL must be one of {FORCED_RING_IMPLS} (or unset), got "
                             f"{impl!r} (or pass attention(ring_impl=...))")
    chunks = env("SPATTN_ULYSSES_CHUNKS", "4")
    return Settings(
        check=check_mode_of(env("SPATTN_CHECK", "1"), "SPATTN_CHECK"),
        timeout_s=timeout_of(env("SPATTN_TIMEOUT_S", "30"), "SPATTN_TIMEOUT_S"),
        # As before: a non-positive count means one chunk (no pipelining).
        ulysses_chunks=max(1, int(chunks)) if chunks.strip().lstrip("-").isdigit() else
        positive_int_of(chunks, "SPATTN_ULYSSES_CHUNKS"),
        ring_engine=engine,
        ring_impl=impl,
        allgather_bytes=positive_int_of(env("SPATTN_ALLGATHER_BYTES", str(256 << 20)), "SPATTN_ALLGATHER_BYTES"),
    )


_SETTINGS: Optional[Settings] = None


def settings() -> Settings:
    """The environment's settings, read on the first call and kept."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = _read()
    return _SETTINGS


def reload() -> Settings:
    """Read the environment again (for a process that changes ``SPATTN_*`` on purpose)."""
    global _SETTINGS
    _SETTINGS = None
    return settings()
