"""mixport: Mixture-of-Experts models from Hugging Face folders to ONNX and TensorRT."""

from __future__ import annotations

__version__ = "0.1.0"
