"""scan-runtime: serve SCAN image-text matching models (ONNX / TensorRT engines, cached galleries, top-k search)."""

# The one version of the distribution: pyproject.toml reads it (dynamic version), the service reports it.
__version__ = "0.1.0"
