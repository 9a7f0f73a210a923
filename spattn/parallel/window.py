"""Sliding windows in the block plans: each backend call's global positions, cut to the rows and keys the
window lets meet; calls (and so whole ring blocks) wholly outside it are skipped and counted.

A window ``(left, right)`` (flash-attn's convention, -1 = unbounded) keeps key position kpos for query
position qpos iff ``-right <= qpos - kpos <= left`` (and kpos <= qpos when causal). Every call of a
windowed plan lies inside one (query segment, key segment) pair, so its rows and keys are consecutive
global positions: the backend gets ``q_offset`` / ``k_offset`` and masks the window's edges itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

Window = Tuple[int, int]
Call = Tuple[int, int, int, int, bool]  # q_lo, q_hi, k_lo, k_hi, causal (local sequence indices)
NO_WINDOW: Window = (-1, -1)


def reach(window: Window, causal: bool) -> Tuple[Optional[int], Optional[int]]:
    """(back, ahead): how far before / after its own position a query sees (None: unbounded)."""
    back = window[0] if window[0] >= 0 else None
    ahead = window[1] if window[1] >= 0 else None
    if causal:
        ahead = 0 if ahead is None else min(ahead, 0)
    return back, ahead


def cut(call: Call, q_pos: int, k_pos: int, window: Window, causal: bool) -> Optional[Tuple[Call, int, int]]:
    """``call`` whose first row and first key sit at global positions ``q_pos`` / ``k_pos``, cut to the
    rows that see some key and the keys some row sees; None when the window lets none meet.
    Returns (call, q_offset, k_offset): the cut call and the global positions of its first row and key."""
    q0, q1, k0, k1, c = call
    back, ahead = reach(window, causal)
    a, b, lo, hi = q_pos, q_pos + (q1 - q0), k_pos, k_pos + (k1 - k0)  # global rows [a, b), keys [lo, hi)
    for _ in range(2):  # keys by the rows, rows by the keys left; a second pass is tight
        if back is not None:
            lo, b = max(lo, a - back), min(b, hi + back)
        if ahead is not None:
            hi, a = min(hi, b + ahead), max(a, lo - ahead)
        if a >= b or lo >= hi:
            return None
    return (q0 + a - q_pos, q0 + b - q_pos, k0 + lo - k_pos, k0 + hi - k_pos, c), a, lo
