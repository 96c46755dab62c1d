"""ONNX Runtime sessions for one model version: provider choice, one session per instance, bucketed batches.

On CUDA, batches are padded up to the next "bucket" (powers of two, and from 96 on the sizes halfway between,
capped at ``max_batch_size``), so a session only ever sees a handful of shapes: each is warmed up at load time
(no first-request stall, and cuDNN's algorithm search runs once per shape), and each is a candidate for a
captured CUDA graph.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.cores import usable_cores
from serving.gpu_options import NO_GPU_OPTIONS, GpuOptions
from serving.page_locked import lock_where_possible
from serving.precision import float16_model

__all__ = [
    "BucketRunner",
    "Device",
    "DeviceUnavailable",
    "ModelRuntime",
    "ProviderSelector",
    "TensorInfo",
    "batch_buckets",
    "placement",
]

_log = logging.getLogger(__name__)
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_ORT_LOG_ERRORS = 3  # ONNX Runtime's default logger: errors only (its warnings are about graph placement)
_NUMPY_TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}


class Device(enum.Enum):
    AUTO = "auto"  # CUDA when its provider loads, else CPU with one warning
    CUDA = "cuda"  # CUDA or fail fast
    CPU = "cpu"


class DeviceUnavailable(RuntimeError):
    """``--device cuda`` was asked for and ONNX Runtime's CUDA provider cannot run here."""


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as ONNX Runtime declares it; ``-1`` marks the dynamic batch dimension."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


def placement(providers: Sequence[str], fp16: bool) -> str:
    """Where a model runs, as the load log lines say it (tests and benchmarks read the " in float16")."""
    return ", ".join(providers) + " in float16" * fp16


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The shapes a model runs: powers of two, from 96 on also the sizes halfway between (96, 192, 384, ...),
    below ``max_batch_size``, then ``max_batch_size`` itself.

    A large run costs about its bucket (on an H200, a cat/dog run of 65 images took what one of 128 did), so a
    run padded up to the next power of two could pay for nearly twice its images. Halfway sizes keep the
    padding under a third of the session's rows, for one more session (and warm-up) per size.
    """
    powers = {1 << i for i in range(max_batch_size.bit_length())}
    halfway = {3 << i for i in range(5, max_batch_size.bit_length())}
    return (*sorted(size for size in powers | halfway if size < max_batch_size), max_batch_size)


class ProviderSelector:
    """Chooses execution providers once per process, so a missing CUDA is reported in one line, once."""

    def __init__(self, device: Device, cuda_options: dict[str, str] | None = None) -> None:
        self.device = device
        self.cuda_options = cuda_options or {
            "cudnn_conv_algo_search": "EXHAUSTIVE",  # affordable: every bucket is warmed up once at load
            "arena_extend_strategy": "kSameAsRequested",  # grow the arena by what is asked, not by doubling
            "do_copy_in_default_stream": "1",
        }
        self._cuda_failed = device is Device.CPU

    @property
    def on_cpu(self) -> bool:
        """True once sessions are opened on the CPU (chosen, or CUDA failed to load)."""
        return self._cuda_failed

    def session(
        self, model: Path | bytes, options: ort.SessionOptions, cuda_options: Mapping[str, str] | None = None
    ) -> ort.InferenceSession:
        """Open ``model`` (a file, or one in memory) on CUDA if chosen and working, else on the CPU
        (``DeviceUnavailable`` for ``cuda``); ``cuda_options`` are the model's own, over the process-wide ones."""
        source = str(model) if isinstance(model, Path) else model
        if self._cuda_failed:
            return ort.InferenceSession(source, options, providers=[_CPU])
        ort.set_default_logger_severity(4)  # ONNX Runtime's own multi-line errors would drown our one line
        cuda = {**self.cuda_options, **(cuda_options or {})}
        try:
            session = ort.InferenceSession(source, options, providers=[(_CUDA, cuda), _CPU])
        finally:
            ort.set_default_logger_severity(_ORT_LOG_ERRORS)
        if _CUDA in session.get_providers():
            return session
        self._cuda_failed = True
        reason = "no CUDA GPU, or the CUDA 13 / cuDNN 9 libraries it needs are not installed"
        if self.device is Device.CUDA:
            raise DeviceUnavailable(f"--device cuda: ONNX Runtime's CUDA execution provider did not load ({reason})")
        _log.warning("CUDA execution provider unavailable (%s): serving on the CPU", reason)
        return session


class BucketRunner:
    """One instance's runs: each batch goes through the session for its bucket, padded up to it on CUDA.

    Padding happens in place where it can: ``run_rows`` reads the bucket's rows straight from a buffer that
    holds them (the engine's shared memory), and a batch of any other size is copied into the instance's
    staging buffer. The padding rows hold whatever that buffer held before; each image's outputs depend on
    that image alone, and the padding's outputs are dropped. On the CPU, where one session takes any size,
    nothing is padded.
    """

    def __init__(
        self,
        sessions: dict[int, ort.InferenceSession],
        input_info: TensorInfo,
        output_info: TensorInfo,
        max_batch_size: int,
        pad: bool,
    ) -> None:
        self._sessions = sessions
        self._buckets = sorted(sessions)
        self._input = input_info
        self._output_names = [output_info.name]
        self._max_batch_size = max_batch_size
        self._pad = pad
        self._staging: np.ndarray | None = None  # made on first use (page-locked on CUDA by ModelRuntime)

    def _bucket(self, count: int) -> int:
        return next(bucket for bucket in self._buckets if bucket >= count)

    def rows_read(self, count: int) -> int:
        """How many rows a run of ``count`` images reads: its bucket on CUDA, ``count`` itself on the CPU."""
        return self._bucket(count) if self._pad else count

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Blocking: ``images`` through the model, one output row per image."""
        count = len(images)
        if self.rows_read(count) == count:
            return self.run_rows(images, count)
        staging = self.staging()
        staging[:count] = images
        return self.run_rows(staging, count)

    def staging(self) -> np.ndarray:
        """The instance's reused input buffer of the max batch size, to gather a batch in before its run; one
        run at a time uses it (the engine's merger runs one per instance)."""
        if self._staging is None:
            self._staging = np.zeros((self._max_batch_size, *self._input.shape[1:]), self._input.dtype)
        return self._staging

    def run_rows(self, buffer: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` rows of ``buffer`` through the model, read in place: ``buffer`` holds at least
        ``rows_read(count)`` rows (the rows past ``count`` are padding)."""
        rows = self.rows_read(count)
        session = self._sessions[self._bucket(rows)]
        output: np.ndarray = session.run(self._output_names, {self._input.name: buffer[:rows]})[0]
        return output[:count]


class ModelRuntime:
    """``instance_count`` instances of one ONNX file; ``runners[i]`` runs a uint8 batch on instance ``i``.

    On CUDA each instance holds one session per bucket: ONNX Runtime's CUDA convolutions plan for the last
    input shape they saw, and re-planning on every change of batch size cost an H100 about 200 ms a batch once
    batches of mixed sizes arrived. A session that only ever sees one shape plans once, at warm-up. On the CPU
    one session serves every batch size, unpadded. ``gpu`` is what the model's config asks of CUDA: its own
    provider options, and a float16 conversion of the file (``serving.precision``); the CPU runs the file as
    it is.
    """

    def __init__(
        self,
        path: Path,
        instance_count: int,
        max_batch_size: int,
        providers: ProviderSelector,
        gpu: GpuOptions = NO_GPU_OPTIONS,
    ) -> None:
        self.path = path
        self.max_batch_size = max_batch_size
        self.buckets = batch_buckets(max_batch_size)
        cuda_options = dict(gpu.cuda)
        probe = providers.session(path, ort.SessionOptions(), cuda_options)  # finds out where the model runs
        on_cuda = _CUDA in probe.get_providers()
        self.fp16 = gpu.fp16 and on_cuda
        if gpu.fp16 and not on_cuda:
            _log.info("%s: precision fp16 is for the GPU; the CPU runs the file in FP32", path)
        options = self._options(providers, instance_count)  # after the probe: a failed CUDA is known by now
        model = float16_model(path) if self.fp16 else path
        self.instances = [
            self._bucket_sessions(providers, options, cuda_options, model, on_cuda) for _ in range(instance_count)
        ]
        first = self.instances[0][self.buckets[0]]
        self.providers: list[str] = first.get_providers()
        (self.input,) = (self._describe(arg) for arg in first.get_inputs())
        (self.output,) = (self._describe(arg) for arg in first.get_outputs())
        self.on_cuda = on_cuda
        self._page_locks = ExitStack()  # released by close()
        self.runners = [
            BucketRunner(sessions, self.input, self.output, max_batch_size, on_cuda) for sessions in self.instances
        ]
        if on_cuda:  # the batches gathered in each instance's staging buffer copy to the GPU directly
            for runner in self.runners:
                lock_where_possible(self._page_locks, runner.staging(), f"the staging buffer of {self.path}")

    def _bucket_sessions(
        self,
        providers: ProviderSelector,
        options: ort.SessionOptions,
        cuda_options: Mapping[str, str] | None,
        model: Path | bytes,
        on_cuda: bool,
    ) -> dict[int, ort.InferenceSession]:
        if not on_cuda:
            return dict.fromkeys(self.buckets, providers.session(model, options))
        return {bucket: providers.session(model, options, cuda_options) for bucket in self.buckets}

    @staticmethod
    def _options(providers: ProviderSelector, instance_count: int) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if providers.on_cpu:
            # Split the cores this process may use (its CPU set and cgroup limit, not the machine's) between the
            # model's instances, instead of every session taking one thread per core of the machine.
            options.intra_op_num_threads = max(1, usable_cores() // instance_count)
        return options

    @staticmethod
    def _describe(arg: Any) -> TensorInfo:
        if arg.type not in _NUMPY_TYPES:
            raise ValueError(f"unsupported tensor type {arg.type} for {arg.name}")
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        return TensorInfo(arg.name, np.dtype(_NUMPY_TYPES[arg.type]), shape)

    def close(self) -> None:
        """Release the sessions (and their GPU memory) now rather than whenever the last reference goes."""
        self.instances.clear()
        self.runners.clear()
        self._page_locks.close()

    def warm_up(self) -> None:
        """Run every bucket on every instance once, so algorithm search and allocation happen now."""
        for runner in self.runners:
            for bucket in self.buckets:
                runner(np.zeros((bucket, *self.input.shape[1:]), dtype=self.input.dtype))
