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


def dual_encoder(path, text: str = "roberta", vision: str = "clip", weights: str = "safetensors", seed: int = 0):
    """A random tiny VisionTextDualEncoderModel folder as transformers writes one: config.json,
    weights, a WordPiece tokenizer and preprocessor_config.json (CLIPImageProcessor for a CLIP
    vision tower, ViTImageProcessor for ViT, each with its own sizes, mean and std).

    weights: "safetensors" (model.safetensors), "sharded" (shards + model.safetensors.index.json)
    or "bin" (pytorch_model.bin, as older saves are; transformers 5 writes safetensors only, so
    the .bin holds the safetensors' tensors under the same names, saved by torch).
    """
    from safetensors.torch import load_file

    from koclip.vocab import TINY_CORPUS, train_wordpiece

    torch.manual_seed(seed)
    tokenizer = train_wordpiece(TINY_CORPUS, vocab_size=SMALL_TEXT["vocab_size"])
    sizes = {**SMALL_TEXT, "vocab_size": max(SMALL_TEXT["vocab_size"], len(tokenizer))}  # Hangul adds tokens
    if text == "roberta":
        text_config = transformers.RobertaConfig(**{**sizes, "max_position_embeddings": 42, "pad_token_id": 1})
    else:
        text_config = transformers.BertConfig(**sizes)
    if vision == "clip":
        vision_config = transformers.CLIPVisionConfig(**SMALL_VISION)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    else:
        vision_config = transformers.ViTConfig(**SMALL_VISION)
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                                   image_std=[0.2, 0.25, 0.3])
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_config, projection_dim=16, logit_scale_init_value=2.0)
    model = _randomize(transformers.VisionTextDualEncoderModel(config), seed).eval()
    path = str(path)
    model.save_pretrained(path, max_shard_size="20KB" if weights == "sharded" else "50GB")
    if weights == "bin":
        safetensors_path = f"{path}/model.safetensors"
        torch.save(load_file(safetensors_path), f"{path}/pytorch_model.bin")
        __import__("os").remove(safetensors_path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return model, path
