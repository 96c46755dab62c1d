"""Page-locking host memory that already exists (``cudaHostRegister``), so CUDA copies from it directly.

ONNX Runtime copies a numpy input to the GPU with ``cudaMemcpyAsync``; from ordinary (pageable) memory CUDA
stages the copy through a buffer of its own and the calling thread waits for it, while from page-locked memory
the copy is one direct transfer: on an H200, two cat/dog instances ran 16% more images/s at batch 128 from
page-locked input (``benchmarks/BENCHMARKS.md``). ONNX Runtime 1.31's Python API allocates no page-locked
buffer by name, but registering memory in place needs only the CUDA runtime its CUDA provider has loaded.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np

__all__ = ["lock_where_possible", "page_locked"]

_log = logging.getLogger(__name__)
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


def lock_where_possible(stack: ExitStack, array: np.ndarray, what: str) -> bool:
    """Page-lock ``array`` until ``stack`` closes; if CUDA cannot, say so once here and serve on unlocked (slower
    copies, same results)."""
    try:
        stack.enter_context(page_locked(array))
    except (OSError, RuntimeError) as exc:
        _log.warning("%s stays pageable, so copies from it to the GPU are staged: %s", what, exc)
        return False
    return True
