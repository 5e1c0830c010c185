"""Flax encoders (BERT/RoBERTa, CLIP text, CLIP vision, ViT) and the hybrid KoCLIP model."""
from koclip.modeling.hybrid import DTYPES, HybridCLIP, KoCLIP, count_params, l2_normalize

__all__ = ["DTYPES", "HybridCLIP", "KoCLIP", "count_params", "l2_normalize"]
