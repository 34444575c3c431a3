"""spotdiff export side: PyTorch models -> ONNX bundle (imports torch)."""
__version__ = "0.1.0"
