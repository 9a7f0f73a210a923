"""Strategies: the hybrid Ulysses pipeline, head plans, block plans, the P2P and all-gather rings, the op."""
