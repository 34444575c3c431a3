"""spotdiff export side: PyTorch models -> ONNX bundle (imports torch)."""


def __getattr__(name: str):
    if name == "__version__":  # one source, read on first use: sdrun.version
        from sdrun.version import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
