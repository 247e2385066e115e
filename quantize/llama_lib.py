"""llama-cpp-python, loaded the one way ft loads it: every module of ft takes `llama_cpp` from here.

Why: with a CUDA build of llama-cpp-python, a process that had imported numpy (or torch, which imports it) before
llama_cpp crashed (SIGSEGV) loading a 12B-shaped GGUF, and one that imported llama_cpp first did not
(`bench/load_order.py`, H100 and H200, docs/BENCHMARKS.md). The cause is two C++ runtimes in one process:

- libggml-cuda.so, as this CUDA toolchain links it, carries a static copy of libstdc++ and exports it (2,877 `std::`
  symbols, the locale machinery among them; libstdc++.so.6 is not among its dependencies);
- numpy's C++ extension loads the system libstdc++.so.6 first, which builds the locale, in a private scope (Python
  opens extensions with RTLD_LOCAL);
- llama-cpp-python then opens its libraries with RTLD_GLOBAL, and libllama binds `std::ostream::_M_insert<long>`
  to libggml-cuda's copy (the dynamic linker's binding log), which reads the locale of the other copy with its own
  facet ids: the crash is in `llama_model::print_info`'s first `ostream << long`, inside libggml-cuda.

When llama_cpp comes first, libggml-cuda's copy enters the global scope ahead of the system one and every library
binds to it, which is why import order decided. Opening the system libstdc++ into the global scope before llama_cpp
makes every later library bind to that one copy, whatever the process imported before.

    >>> from quantize.llama_lib import llama_cpp
    >>> llama_cpp.__name__
    'llama_cpp'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _libstdcxx_global() -> None:
    """Open the C++ runtime with RTLD_GLOBAL (promoting it where numpy or torch loaded it privately)."""
    name = ctypes.util.find_library("stdc++") if sys.platform.startswith("linux") else None
    if name:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


_libstdcxx_global()

import llama_cpp  # noqa: E402  (after the C++ runtime is global: see the module docstring)
import llama_cpp._logger  # noqa: E402  (llama-cpp-python's log callback, which quantize.llama_quant restores)
from llama_cpp import llama_cpp_ext  # noqa: E402
from llama_cpp._ggml import libggml  # noqa: E402  (ggml's own C API, for its GGUF parser)

__all__ = ["libggml", "llama_cpp", "llama_cpp_ext"]
