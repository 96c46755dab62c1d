"""Page-locking host memory that already exists (``cudaHostRegister``), so CUDA copies from it directly.

ONNX Runtime copies a numpy input to the GPU with ``cudaMemcpyAsync``; from ordinary (pageable) memory CUDA
stages the copy through a buffer of its own and the calling thread waits for it, while from page-locked memory
the copy is one direct transfer. ONNX Runtime 1.31's Python API allocates no page-locked buffer by name, but
registering memory in place needs only the CUDA runtime that its CUDA provider has already loaded.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

__all__ = ["page_locked"]

_CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def _cuda_runtime() -> ctypes.CDLL:
    """The CUDA runtime library: the one a CUDA session has loaded into this process, found by its name."""
    for name in _CUDA_RUNTIMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"no CUDA runtime library found (tried {', '.join(_CUDA_RUNTIMES)})")


@contextmanager
def page_locked(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array``'s memory page-locked for CUDA while the block runs.

    Raises:
        OSError: no CUDA runtime library.
        RuntimeError: CUDA refused to register the memory (its error code).
    """
    runtime = _cuda_runtime()
    pointer, size = ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes)
    status = runtime.cudaHostRegister(pointer, size, ctypes.c_uint(0))  # 0: cudaHostRegisterDefault
    if status != 0:
        raise RuntimeError(f"cudaHostRegister of {array.nbytes} bytes failed: CUDA error {status}")
    try:
        yield array
    finally:
        runtime.cudaHostUnregister(pointer)
