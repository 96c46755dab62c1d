"""FP16 at load: a model's float32 weights and compute turned to float16 for the GPU, its inputs and outputs kept.

The conversion happens in memory when a model is opened on CUDA, so one FP32 file serves both devices: the CPU
runs the file as it is (float16 is slower there), the GPU runs the conversion, which is faster for a conv net
with its held-out accuracy unchanged (benchmarks/BENCHMARKS.md, section 5). Requests and responses do not change:
uint8 pixels in, FP32 probabilities out.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["float16_model"]


def float16_model(path: Path) -> bytes:
    """The model at ``path`` with float16 weights and compute, its input and output types as they were."""
    # Imported here, by the processes that convert: ONNX Runtime's converter package puts its own folder on
    # sys.path when imported, and FP32 models need neither it nor onnx.
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.checker.check_model(model)  # a broken conversion fails here, at load, not as an obscure run error
    return model.SerializeToString()
