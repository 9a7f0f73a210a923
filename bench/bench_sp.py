"""Benchmark: sequence-parallel attention on P gloo ranks vs single-process SDPA, forward and backward.

    python bench/bench_sp.py                      # default point: S=4096, 8 heads, d=64, fp32, B=1, P=2
    python bench/bench_sp.py -P 4 --causal --layout zigzag --csv bench/out/sp.csv

Prints per mode (Ulysses, Ring, hybrids) the time of one forward and one backward, divided by the
time of SDPA on the full sequence in one process using all the cores (the cores are split evenly
between the ranks). Ideal is <= 1.00: all communication hidden behind compute.
"""
from spattn.demo import main

if __name__ == "__main__":
    main(seq=4096, iters=5)
