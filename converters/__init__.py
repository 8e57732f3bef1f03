"""Model converters: PyTorch and Keras classifiers to ONNX for the node, with parity checks.

Beside the node, never imported by it. ``pacs-node convert torch|keras ...`` (``converters.cli``)
exports the model (dynamic batch axis, opset >= 17), optionally adds the class-activation-map output
for global-average-pool + linear heads, compares the source framework with ONNX Runtime on random and
phantom inputs, optionally writes an fp16 variant with its own parity, and writes a manifest scaffold.
"""

from converters.common import ConversionError, ParityResult

__all__ = ["ConversionError", "ParityResult"]
