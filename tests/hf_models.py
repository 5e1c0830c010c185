"""Small random-init transformers (PyTorch) models saved as HF checkpoint directories.

The parity tests import these through koclip.checkpoint's safetensors path, so the weight
conversion is exercised by the same tests that compare the outputs.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

from koclip.modeling.hybrid import HybridCLIP

TOL = 1e-5  # fp32 parity with transformers' PyTorch models, max abs

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


def clip_model(path, weights: str = "safetensors", eos: str = "first", seed: int = 0):
    """A random tiny CLIPModel folder with a tokenizer and a CLIPImageProcessor, as a Korean CLIP
    (Bingsu/clip-vit-base-patch32-ko) is published: a WordPiece tokenizer whose [SEP] ends a text.

    eos: "first" (eos_token_id = [SEP]: pooled at its first occurrence) or "legacy" (eos_token_id 2,
    as configs saved before transformers PR #24773 carry: pooled at the highest token id).
    weights: "safetensors" or "bin" (pytorch_model.bin, saved by torch).
    """
    from safetensors.torch import load_file

    from koclip.vocab import TINY_CORPUS, train_wordpiece

    torch.manual_seed(seed)
    tokenizer = train_wordpiece(TINY_CORPUS, vocab_size=SMALL_TEXT["vocab_size"])
    eos_token_id = tokenizer.sep_token_id if eos == "first" else 2
    text_config = dict(vocab_size=max(SMALL_TEXT["vocab_size"], len(tokenizer)), hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, max_position_embeddings=24,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=eos_token_id)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=SMALL_VISION, projection_dim=16,
                                     logit_scale_init_value=2.0)
    model = _randomize(transformers.CLIPModel(config), seed).eval()
    path = str(path)
    model.save_pretrained(path)
    if weights == "bin":
        safetensors_path = f"{path}/model.safetensors"
        torch.save(load_file(safetensors_path), f"{path}/pytorch_model.bin")
        __import__("os").remove(safetensors_path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return model, path


# ---------------------------------------------------------------- parity with the PyTorch model


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def inputs(pad_id: int, eos_id: int | None = None):
    """Token ids and mask [3, 11] (rows of 11, 7 and 3 tokens, the rest padding; ending with
    `eos_id` when given, as a CLIP tokenizer ends a text) and NCHW pixels [2, 3, 32, 32]."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 120, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    if eos_id is not None:
        ids[np.arange(3), mask.sum(1) - 1] = eos_id
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW, as transformers takes them
    return ids, mask, pixels


def assert_matches_torch(ckpt, torch_model) -> dict[str, float]:
    """Our text and image features and logits_per_image vs the PyTorch model's, within TOL."""
    text_config = ckpt.config.text_config
    ids, mask, pixels = inputs(text_config.pad_token_id, text_config.eos_token_id)
    t_ids, t_mask, t_pixels = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
    with torch.no_grad():
        text = torch_model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
        image = torch_model.get_image_features(pixel_values=t_pixels).pooler_output
        logits = torch_model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pixels).logits_per_image
    model, nhwc = ckpt.model(), pixels.transpose(0, 2, 3, 1)
    apply = lambda method, *args: model.module.apply({"params": ckpt.params}, *args, method=method)
    diffs = {
        "text": max_diff(apply(HybridCLIP.text_features, ids, mask), text),
        "image": max_diff(apply(HybridCLIP.image_features, nhwc), image),
        "logits_per_image": max_diff(model.contrastive_logits(ckpt.params, ids, mask, nhwc)[1], logits),
    }
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


ENCODER_TEXTS = ["소파 위에 고양이", "빨간 사과", "a dog's face on the sofa", "고양이"]


def assert_encoders_match_torch(ckpt, torch_model, tokenizer_dir: str):
    """koclip.encoders (what the pipeline, queries and evaluation embed through) on ENCODER_TEXTS,
    tokenized by the folder's own tokenizer, and on random pixels vs the PyTorch model's normalised
    features, within TOL. Returns the tokenized batch transformers used."""
    from koclip.encoders import checkpoint_encoders

    encoders = checkpoint_encoders(ckpt, batch_size=4)
    batch = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)(ENCODER_TEXTS, padding=True, return_tensors="pt")
    _, _, pixels = inputs(0)
    with torch.no_grad():
        text = torch_model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        image = torch_model.get_image_features(pixel_values=torch.tensor(pixels))
    normalize = lambda x: torch.nn.functional.normalize(x.pooler_output, dim=-1)
    assert max_diff(encoders.texts(ENCODER_TEXTS), normalize(text)) <= TOL
    assert max_diff(encoders.images(pixels.transpose(0, 2, 3, 1)), normalize(image)) <= TOL
    return batch
