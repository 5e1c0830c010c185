"""Small random-init transformers (PyTorch) models saved as HF checkpoint directories.

The parity tests import these through koclip.checkpoint's safetensors path, so the weight
conversion is exercised by the same tests that compare the outputs.
"""
from __future__ import annotations

import torch
import transformers

SMALL_TEXT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)
SMALL_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    image_size=32, patch_size=8)


def _save(model, path) -> str:
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _randomize(model, seed: int):
    # Random-init LayerNorms are (1, 0) and biases 0; perturb every tensor so a wrong mapping shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def bert(path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**{**SMALL_TEXT, **overrides})
    model = _randomize(transformers.BertModel(cfg, add_pooling_layer=True), seed)
    return model, _save(model, path)


def roberta(path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(**{**SMALL_TEXT, "max_position_embeddings": 42, "pad_token_id": 1, **overrides})
    model = _randomize(transformers.RobertaModel(cfg, add_pooling_layer=True), seed)
    return model, _save(model, path)


def clip(path, seed: int = 0, projection_dim: int = 24):
    """A full CLIPModel (text tower too), as openai/clip-vit-base-patch32 is published."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=20),
        vision_config=SMALL_VISION, projection_dim=projection_dim,
    )
    model = _randomize(transformers.CLIPModel(cfg), seed)
    return model, _save(model, path)


def clip_vision(path, seed: int = 0):
    torch.manual_seed(seed)
    model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL_VISION)), seed)
    return model, _save(model, path)


def vit(path, seed: int = 0):
    torch.manual_seed(seed)
    model = _randomize(transformers.ViTModel(transformers.ViTConfig(**SMALL_VISION), add_pooling_layer=True), seed)
    return model, _save(model, path)
