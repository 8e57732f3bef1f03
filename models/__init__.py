"""Bundled reference models (``models/onnx``) and their training recipes (``models/train``)."""
