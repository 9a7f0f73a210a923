"""spattn build script.

The Python package always installs. The C++/CUDA extension (``spattn._C``) is optional; see
``_extensions`` for the flags that control it.
"""
import glob
import hashlib
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD = "pip install --no-build-isolation -e ."


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(msg: str) -> None:
    print(f"spattn setup: {msg}", file=sys.stderr)


def csrc_hash() -> str:
    """Hash of the csrc/ sources, baked into the build so spattn/_ext.py can detect a stale build.

    spattn/_ext.py recomputes it the same way (sorted file names + contents, sha256, 16 hex chars).
    """
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
        if os.path.isfile(path):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def _job_count(n_units: int) -> int:
    """Parallel compile jobs: cores, but at most one per ~3 GiB of RAM (a torch TU peaks ~1.5-2.5 GiB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3), n_units))


def _arch_list(spec: str) -> str:
    """SPATTN_CUDA_ARCHS ("80;90", also "8.0 9.0", "90a") -> TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX").

    The newest arch also gets PTX so newer GPUs can JIT the kernels instead of failing to launch.
    """
    archs = []
    for a in spec.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip().lower().replace("sm_", "")
        if not a:
            continue
        if "." not in a:
            digits = a.rstrip("abcdefghijklmnopqrstuvwxyz")
            a = f"{digits[:-1]}.{digits[-1]}{a[len(digits):]}"
        archs.append(a)
    if not archs:
        raise SystemExit(f"spattn setup: SPATTN_CUDA_ARCHS={spec!r} names no architecture")
    archs[-1] += "+PTX"
    return ";".join(archs)


def _pip_cuda_dirs(sub: str):
    """include/ or lib/ dirs of the CUDA wheels torch pulls in (nvidia/cu13/...): the system toolkit
    may ship only nvcc and the runtime, while ATen/cuda headers need cuBLAS/cuSPARSE headers too."""
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]  # .pth paths too
    found = []
    for root in roots:
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", sub))):
            if d not in found:
                found.append(d)
    return found


def _guess_cuda_home() -> None:
    """Set CUDA_HOME when torch would guess it wrong: torch takes dirname(dirname(which nvcc)), which
    is wrong when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda.h")):
        return
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


def _extensions():
    """Return (ext_modules, cmdclass) for the optional C++ extension ``spattn._C``.

    Environment:
      SPATTN_SKIP_EXT=1     build no extension (pure Python install).
      SPATTN_FORCE_CUDA=1   build the CUDA sources even without a visible GPU (CI); implies
                            SPATTN_REQUIRE_EXT=1.
      SPATTN_REQUIRE_EXT=1  a failing or impossible extension build fails the install.
      SPATTN_CUDA_ARCHS     CUDA archs, default "80;90".
      MAX_JOBS              ninja jobs; default from cores and memory.
    Without torch (or a compiler) the extension is skipped with a message: spattn then uses its
    Python paths. Build with ``pip install --no-build-isolation -e .`` so torch is importable.
    """
    if _flag("SPATTN_SKIP_EXT"):
        _note("SPATTN_SKIP_EXT=1: not building the C++ extension spattn._C")
        return [], {}
    force_cuda = _flag("SPATTN_FORCE_CUDA")
    required = force_cuda or _flag("SPATTN_REQUIRE_EXT")

    def skip(reason: str):
        if required:
            raise SystemExit(f"spattn setup: cannot build spattn._C, which SPATTN_FORCE_CUDA/SPATTN_REQUIRE_EXT "
                             f"asks for: {reason}")
        _note(f"not building the C++ extension spattn._C ({reason}); spattn will use its Python paths. "
              f"To build it: {REBUILD}")
        return [], {}

    if any(a in sys.argv for a in ("sdist", "egg_info", "dist_info")) and "build_ext" not in sys.argv:
        return [], {}  # metadata-only commands never compile
    _guess_cuda_home()  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch to build against"
        return skip(f"torch is not importable at build time: {e}; install torch first and build with "
                    f"--no-build-isolation")
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        return skip("no C++ compiler found (set CXX)")

    with_cuda = force_cuda or (torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None)
    if with_cuda and torch.version.cuda is None:
        return skip(f"CUDA requested but torch {torch.__version__} is a CPU-only build")
    if with_cuda and cpp_extension.CUDA_HOME is None:
        return skip("CUDA requested but no CUDA toolkit (nvcc) found; set CUDA_HOME")

    src = [os.path.join("csrc", f) for f in ("ring_engine.cpp", "merge_cpu.cpp")]
    cxx_flags = ["-O3", f"-DSPATTN_SRC_HASH={csrc_hash()}"]
    kwargs = {}
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's builds and runs serially in a TU without -fopenmp.
        # libgomp.so.1 resolves to the copy torch already loaded: one thread pool, torch's thread count.
        cxx_flags.append("-fopenmp")
        kwargs["extra_link_args"] = ["-fopenmp"]
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list(os.environ.get("SPATTN_CUDA_ARCHS", "80;90"))
        src.append(os.path.join("csrc", "merge_cuda.cu"))
        cxx_flags.append("-DSPATTN_WITH_CUDA")
        kwargs["extra_compile_args"] = {"cxx": cxx_flags,
                                        "nvcc": ["-O3", "-DSPATTN_WITH_CUDA", f"-DSPATTN_SRC_HASH={csrc_hash()}"]}
        kwargs["include_dirs"] = _pip_cuda_dirs("include")
        kwargs["library_dirs"] = _pip_cuda_dirs("lib")
        ext_cls = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext_cls = cpp_extension.CppExtension
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(_job_count(len(src)))
    _note(f"building spattn._C ({'CPU+CUDA ' + os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else 'CPU'}) "
          f"with MAX_JOBS={os.environ['MAX_JOBS']}")

    class BuildExt(cpp_extension.BuildExtension):
        """A failed compile is fatal only when the extension was required; otherwise warn and go on."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - compiler errors come in several exception types
                if required:
                    raise
                _note(f"WARNING: building spattn._C failed ({e}); installing without it. spattn will use "
                      f"its Python paths. Fix the error and rebuild with: {REBUILD}")
                self._spattn_failed = True

        def get_outputs(self):
            return [] if getattr(self, "_spattn_failed", False) else super().get_outputs()

        def copy_extensions_to_source(self):
            if not getattr(self, "_spattn_failed", False):
                super().copy_extensions_to_source()

    ext = ext_cls(name="spattn._C", sources=src, **kwargs)
    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="spattn",
    version="0.1.0",
    description="Sequence-parallel attention: Ulysses, Ring and hybrid, forward and backward",
    # Every subpackage under spattn/ (a hand-written list missed spattn.integrations.diffusers, spattn.comm,
    # spattn.parallel); Triton kernels live at the top level (kernels/) as leaf code, installed as spattn.kernels.
    packages=find_packages(include=["spattn", "spattn.*"]) + ["spattn.kernels"],
    package_dir={"spattn": "spattn", "spattn.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        # Tested ranges (see README): the integrations import these only when used.
        "diffusers": ["diffusers>=0.36,<0.43", "transformers>=4.57,<6", "accelerate", "pillow", "tqdm",
                      "imageio", "imageio-ffmpeg"],   # MP4 for video models (tiny-wan, Wan)
        "serve": ["fastapi", "uvicorn", "prometheus-client"],   # spattn serve
        "transformers": ["transformers>=4.57,<6"],
        "bench": ["matplotlib"],
        "test": ["pytest", "triton", "hypothesis", "psutil", "diffusers>=0.36,<0.43", "transformers>=4.57,<6",
                 "accelerate", "pillow", "tqdm", "matplotlib",
                 "fastapi", "uvicorn", "prometheus-client", "openai", "httpx", "imageio", "imageio-ffmpeg"],
    },
    entry_points={"console_scripts": ["spattn=spattn.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
