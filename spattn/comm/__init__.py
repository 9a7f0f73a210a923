"""Communication: the ring exchange, the Ulysses all-to-all and counted collectives (no strategy here)."""
from .all_to_all import A2ASpec, A2AWork, start_head_to_seq, start_seq_to_head
from .collectives import COMM_KINDS, CommCounter, count_bytes, count_comm
from .ring_comm import RingComm, RingCommCache, make_ring_comm

__all__ = ["A2ASpec", "A2AWork", "start_head_to_seq", "start_seq_to_head", "COMM_KINDS", "CommCounter",
           "count_bytes", "count_comm", "RingComm", "RingCommCache", "make_ring_comm"]
