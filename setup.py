"""spattn build script.

The Python package always installs. The C++/CUDA extension (``spattn._C``) is optional; see
``_extensions`` for the flags that control it.
"""
from setuptools import setup


def _extensions():
    """Return (ext_modules, cmdclass) for the optional C++ extension. Filled by the csrc/ work."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="spattn",
    version="0.1.0",
    description="Sequence-parallel attention: Ulysses, Ring and hybrid, forward and backward",
    packages=["spattn", "spattn.backends", "spattn.kernels"],
    # Triton kernels live at the top level (kernels/) as leaf code, installed as spattn.kernels.
    package_dir={"spattn": "spattn", "spattn.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
