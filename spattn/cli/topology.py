"""GPU link topology (``nvidia-smi topo -m``) and the guide's recommended mode for it."""
from __future__ import annotations

import shutil
import subprocess
from typing import Dict, List, Sequence


def parse_topo(text: str) -> List[List[str]]:
    """The GPU x GPU matrix of ``nvidia-smi topo -m`` ("X", "NV12", "PIX", "PXB", "PHB", "NODE", "SYS")."""
    gpu_rows = []
    for line in text.splitlines():
        toks = line.split()  # the header line is indented; GPU rows start at column 0
        if line.startswith("GPU") and toks[0][3:].isdigit():
            gpu_rows.append(toks[1:])
    n = len(gpu_rows)
    return [row[:n] for row in gpu_rows]


def _islands(matrix: Sequence[Sequence[str]]) -> List[List[int]]:
    """GPUs connected by NVLink (directly or through others), as sorted groups."""
    n = len(matrix)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in range(n):
        for j in range(n):
            if i != j and matrix[i][j].startswith("NV"):
                parent[find(i)] = find(j)
    groups: Dict[int, List[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def recommend_for_topology(matrix: Sequence[Sequence[str]]) -> str:
    """The guide's best practice for these links: NVLink -> Ulysses first; PCIe -> Ring, or a hybrid
    with Ulysses inside NVLink islands."""
    n = len(matrix)
    if n < 2:
        return "one GPU: no sequence parallelism across links"
    isl = _islands(matrix)
    if len(isl) == 1:
        return (f"NVLink between all {n} GPUs: Ulysses first (ulysses_degree={n}); "
                f"Ring or a hybrid only for sequences too long for Ulysses' memory")
    k = min(len(g) for g in isl)
    if k == 1:
        kinds = sorted({matrix[i][j] for i in range(n) for j in range(n) if i != j})
        return (f"PCIe only ({'/'.join(kinds)}): Ring (ring_degree={n}) hides its P2P transfers behind compute; "
                f"compare with `spattn plan --link pcie --link-gbps 25 --gpus {n}`")
    contiguous = all(g == list(range(g[0], g[0] + len(g))) for g in isl) and len({len(g) for g in isl}) == 1
    order = "" if contiguous else (f"; islands {isl} are not contiguous ranks: order CUDA_VISIBLE_DEVICES island by "
                                   f"island, since init_mesh puts Ulysses on contiguous ranks")
    return (f"NVLink islands {isl} joined by PCIe: hybrid with Ulysses inside an island "
            f"(ulysses_degree={k}, ring_degree={n // k}){order}")


def topology() -> List[str]:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return ["fewer than 2 GPUs: links not checked"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ["nvidia-smi not found: links not checked"]
    try:
        text = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"nvidia-smi topo -m failed ({e}): links not checked"]
    m = parse_topo(text)
    if len(m) < 2:
        return ["nvidia-smi topo -m printed no GPU matrix: links not checked"]
    lines = [f"GPU{i}: " + " ".join(f"{m[i][j]:>5}" for j in range(len(m))) for i in range(len(m))]
    return lines + ["recommended: " + recommend_for_topology(m)]
