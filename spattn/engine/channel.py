"""The host request channel between the engine's driver and its ranks: pickled messages under keys of a
``torch.distributed.TCPStore`` (TCP on the host, never the NCCL groups).

Keys (``P`` = the engine's generation prefix, ``s`` = job sequence number): ``P/job/s`` driver -> every
rank; ``P/cancel/s`` driver -> rank 0; ``P/prog/s`` rank 0 -> driver (steps done); ``P/res/s`` rank 0 ->
driver (the result); ``P/done/s/r`` rank r -> driver (its status); ``P/ready/r`` (pid) and ``P/hb/r``
(a heartbeat counter). Waiting is polling ``check`` (a store ``wait`` that times out logs warnings).
"""
from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any, Optional


class ChannelClosed(RuntimeError):
    """The store's host (the driver) is gone."""


class Channel:
    """One connection to the store (one per thread: store clients are not shared across threads)."""

    def __init__(self, host: str, port: int, *, is_master: bool = False, timeout_s: float = 60.0):
        from torch.distributed import TCPStore

        self.host = host
        self.store = TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        self.port = self.store.port

    def put(self, key: str, obj: Any) -> None:
        self.store.set(key, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def has(self, key: str) -> bool:
        try:
            return self.store.check([key])
        except RuntimeError as e:  # DistNetworkError: the host went away
            raise ChannelClosed(str(e)) from None

    def get(self, key: str) -> Any:
        return pickle.loads(self.store.get(key))

    def poll(self, key: str, timeout_s: Optional[float] = None, interval_s: float = 0.005) -> Any:
        """The message under ``key`` once it exists; None past ``timeout_s``; ``ChannelClosed`` if the host left."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sleep = 0.001
        while not self.has(key):
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(sleep)
            sleep = min(interval_s, sleep * 2)
        return self.get(key)

    def count(self, key: str, n: int = 1) -> int:
        return int(self.store.add(key, n))

    def delete(self, *keys: str) -> None:
        for k in keys:
            try:
                self.store.delete_key(k)
            except RuntimeError:  # already gone, or the host left: nothing to free
                pass
