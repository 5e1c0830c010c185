"""koclip: the Korean CLIP model library (everything importable without Beam)."""
__version__ = "0.1.0"
