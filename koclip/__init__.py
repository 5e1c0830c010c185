"""koclip: the Korean CLIP model library (everything importable without Beam)."""
__version__ = "0.1.0"


def load_koclip(path: str, dtype: str = "float32"):
    """(model, processor) for the checkpoint at `path`: KoCLIP's quickstart (koclip.quickstart).
    Imported on first call, so `import koclip.fs` and friends do not pay for jax."""
    from koclip.quickstart import load_koclip as load

    return load(path, dtype)
