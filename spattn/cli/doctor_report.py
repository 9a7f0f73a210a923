"""``spattn doctor``'s report: versions, the C++ extension, attention backends and merges, devices, links."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Dict, List, Tuple

from .topology import topology


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> Dict[str, str]:
    import torch

    import spattn

    cuda = torch.version.cuda or "none (CPU build)"
    return {"python": platform.python_version(), "torch": torch.__version__, "CUDA (torch build)": cuda,
            "triton": _version("triton"), "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "spattn": f"{_version('spattn')} ({os.path.dirname(os.path.abspath(spattn.__file__))})"}


def extension_status() -> str:
    from spattn import _ext

    mod, why = _ext._try_load()
    if mod is None:
        return f"not usable: {why} (Python ring engine and torch merge are used; build: {_ext.REBUILD_CMD})"
    cuda = "CUDA kernels compiled" if mod.cuda_compiled() else "CPU only (no CUDA kernels)"
    archs = ""
    if mod.cuda_compiled():
        archs = (f", archs not recorded in the build (setup.py default SPATTN_CUDA_ARCHS=80;90; this torch "
                 f"targets {' '.join(_torch_archs()) or 'unknown'})")
    return f"built (ABI {mod.ABI_VERSION}, sources {getattr(mod, 'SOURCE_HASH', '?')}), {cuda}{archs}"


def _torch_archs() -> List[str]:
    import torch

    try:
        return list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001 - a CPU build may raise or return nothing
        return []


def backend_status(device) -> Tuple[Dict[str, str], str]:
    """Per registered backend: 'usable' or why not, and what backend="auto" picks on ``device``."""
    from spattn import backends

    out = {}
    for name in backends.available_backends():
        try:
            be = backends._instance(name)
        except ImportError as e:
            out[name] = f"not usable ({e.name or e} not installed)"
            continue
        if not be.available(device):
            why = "needs a CUDA device" if name == "triton" else f"not available on {device.type}"
            out[name] = f"not usable ({why})"
        elif name == "triton" and device.type == "cpu":
            out[name] = "interpreter only (TRITON_INTERPRET=1): for tests, not a GPU check"
        else:
            out[name] = "usable"
    try:
        auto = backends.get_backend("auto", device).name
    except RuntimeError as e:
        auto = f"none ({e})"
    return out, auto


def triton_policy() -> str:
    from spattn import backends

    order = backends._AUTO_ORDER.get("cuda", ())
    verified = getattr(backends, "TRITON_GPU_VERIFIED", None)
    if order and order[0] == "triton":
        return f"auto on CUDA prefers triton (verified on a GPU: {verified or 'no record'})"
    return ("auto on CUDA prefers torch's fused kernels; triton is opt-in (backend=\"triton\") until its kernels "
            "pass `spattn doctor --selftest` on a real GPU" + (f" (verified: {verified})" if verified else
                                                               " (no GPU has run them yet)"))


def merge_status() -> Dict[str, str]:
    from spattn import ops

    out = {}
    from spattn import backends

    for name in ops.merge_impls():
        acc = dict(backends.MERGE_ORDER).get(name)
        auto = [d for d in ("cpu", "cuda") if acc is not None and _accepts(acc, d)]
        out[name] = ("always (fallback)" if name == "torch" else
                     f"auto on {', '.join(auto)}" if auto else "explicit only (impl=...)")
    return out


def _accepts(acc, device: str) -> bool:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return False
    try:
        return bool(acc(torch.empty(1, device=device)))
    except Exception:  # noqa: BLE001
        return False


def devices() -> List[str]:
    import torch

    lines = [f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if not torch.cuda.is_available():
        lines.append("cuda: no GPU visible" + ("" if torch.version.cuda else " (CPU build of torch)"))
        return lines
    for i in range(torch.cuda.device_count()):
        pr = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {pr.name}, sm_{pr.major}{pr.minor}, {pr.total_memory / 2**30:.0f} GiB, "
                     f"bf16 {'yes' if pr.major >= 8 else 'no'}")
    return lines



def report() -> None:
    import torch

    print("== versions ==")
    for k, v in versions().items():
        print(f"  {k:<20}{v}")
    print("== C++ extension (spattn._C) ==")
    print(f"  {extension_status()}")
    print("== attention backends ==")
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devs:
        status, auto = backend_status(dev)
        print(f"  {dev.type}: " + "; ".join(f"{k}: {v}" for k, v in status.items()))
        print(f"  {dev.type}: backend=\"auto\" picks {auto}")
    print(f"  {triton_policy()}")
    print("== fused merges (spattn.ops.merge_) ==")
    print("  " + "; ".join(f"{k}: {v}" for k, v in merge_status().items()))
    print("== devices ==")
    for line in devices():
        print(f"  {line}")
    print("== links ==")
    for line in topology():
        print(f"  {line}")
