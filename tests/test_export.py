"""`koclip export`: a checkpoint as a transformers VisionTextDualEncoderModel (or CLIPModel) folder, loaded by
transformers 5's PyTorch AutoModel / AutoProcessor and compared with our towers on the same inputs."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from koclip.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from koclip.cli.main import main
from koclip.errors import ConfigError
from koclip.export import export_transformers
from koclip.quickstart import load_koclip

TEXTS = ["강아지", "소파 위에 고양이 한 마리", "빨간 사과와 초록 사과", "자동차"]
TOLERANCE = 1e-5

# (preset, config changes, the text model transformers should build)
CASES = {
    "bert-clip": ("tiny-bert-clip", {}, "BertModel"),
    "roberta-clip-resize-40": ("tiny-roberta-clip", {"image_resize": 40}, "RobertaModel"),
    # ViTImageProcessor's recipe (a square resize, no crop), another filter, mean and std.
    "bert-vit-square-fixed-scale": ("tiny-bert-vit", {
        "logit_scale_mode": "fixed", "image_resize_mode": "square", "image_resample": "bilinear",
        "image_mean": (0.4, 0.5, 0.6), "image_std": (0.2, 0.25, 0.3)}, "BertModel"),
    # FlaxHybridCLIP's positions 0..L-1: the same network as a BERT.
    "roberta-vit-from-zero": ("tiny-roberta-vit", {"text_position_ids": "from_zero"}, "BertModel"),
    # A CLIP text transformer: a CLIPModel.
    "cliptext-clip": ("tiny-cliptext-clip", {}, "CLIPTextModel"),
}


def architecture(text_class: str) -> tuple[str, str]:
    """(the model class, the processor class) transformers should build for an export."""
    if text_class == "CLIPTextModel":
        return "CLIPModel", "CLIPProcessor"
    return "VisionTextDualEncoderModel", "VisionTextDualEncoderProcessor"


def photo() -> Image.Image:
    """A non-square RGB JPEG, decoded: resize, crop and colour all matter."""
    image = Image.new("RGB", (83, 57), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 60, 50), fill=(230, 180, 40))
    draw.rectangle((50, 20, 80, 55), fill=(200, 30, 60))
    noise = np.random.default_rng(0).integers(0, 40, (57, 83, 3), dtype=np.uint8)
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue()))


def random_checkpoint(path: str, preset: str, changes: dict, tokenizer_dir: str) -> str:
    """A named tiny config with every parameter random: LayerNorm scales 1 + noise, everything else
    noise (a fresh init has LayerNorms (1, 0) and zero biases, under which a wrong mapping of
    those would not show). Drawn from the shapes, so no init is compiled; the tokenizer is the
    session's tiny one (every preset has its vocabulary size)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from koclip.config import NAMED_CONFIGS
    from koclip.modeling import KoCLIP

    config = dataclasses.replace(NAMED_CONFIGS[preset](), **changes)
    rng = np.random.default_rng(1)
    params = {key: ((key[-1] == "scale") + rng.normal(0, 0.05, shape.shape)).astype(np.float32)
              for key, shape in flatten_dict(KoCLIP(config).param_shapes()).items()}
    params[("logit_scale",)] = np.asarray(2.3, np.float32)
    save_checkpoint(path, config, unflatten_dict(params), tokenizer_dir=tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def export_case(tmp_path_factory, tiny_ckpt_dir):
    """name -> the case's checkpoint exported with `koclip export`, loaded both ways (built once)."""
    built = {}

    def build(name: str) -> dict:
        if name not in built:
            preset, changes, text_class = CASES[name]
            root = tmp_path_factory.mktemp(name)
            ckpt_dir = random_checkpoint(str(root / "ckpt"), preset, changes, tiny_ckpt_dir)
            dst = str(root / "hf")
            assert main(["export", ckpt_dir, dst]) == 0
            hf_model, info = transformers.AutoModel.from_pretrained(dst, output_loading_info=True)
            model, processor = load_koclip(ckpt_dir)
            inputs = processor(text=TEXTS, images=[photo(), photo().rotate(90, expand=True)],
                               return_tensors="np", padding=True)
            built[name] = {"dst": dst, "ckpt_dir": ckpt_dir, "hf": hf_model.eval(), "info": info,
                           "text_class": text_class, "model": model, "processor": processor, "inputs": inputs}
        return built[name]

    return build


@pytest.fixture(params=sorted(CASES))
def exported(request, export_case):
    return export_case(request.param)


def _torch_inputs(inputs) -> dict:
    return {"input_ids": torch.from_numpy(inputs["input_ids"]).long(),
            "attention_mask": torch.from_numpy(inputs["attention_mask"]).long(),
            "pixel_values": torch.from_numpy(inputs["pixel_values"])}


def _max_diff(torch_value, ours) -> float:
    return float(np.abs(torch_value.detach().numpy() - ours).max())


def test_transformers_builds_the_model_from_every_tensor(exported):
    info, hf = exported["info"], exported["hf"]
    assert type(hf).__name__ == architecture(exported["text_class"])[0]
    assert type(hf.text_model).__name__ == exported["text_class"]
    vision = exported["model"].config.vision_config.model_type
    assert type(hf.vision_model).__name__ == {"clip_vision_model": "CLIPVisionModel", "vit": "ViTModel"}[vision]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_features_and_logits_match_ours(exported):
    hf, model, inputs = exported["hf"], exported["model"], exported["inputs"]
    pt = _torch_inputs(inputs)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=pt["input_ids"], attention_mask=pt["attention_mask"]).pooler_output
        image = hf.get_image_features(pixel_values=pt["pixel_values"]).pooler_output
        outputs = hf(**pt)
    ours = model(**inputs)
    assert _max_diff(text, model.get_text_features(inputs["input_ids"], inputs["attention_mask"])) <= TOLERANCE
    assert _max_diff(image, model.get_image_features(inputs["pixel_values"])) <= TOLERANCE
    assert _max_diff(outputs.logits_per_image, ours.logits_per_image) <= TOLERANCE
    assert _max_diff(outputs.text_embeds, ours.text_embeds) <= TOLERANCE
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(model.logit_scale, rel=1e-6)
    if model.config.logit_scale_mode == "fixed":
        assert model.logit_scale == model.config.fixed_logit_scale  # not exp of the parameter


def test_exported_processor_gives_our_pixels_and_ids(exported):
    processor = transformers.AutoProcessor.from_pretrained(exported["dst"])
    assert type(processor).__name__ == architecture(exported["text_class"])[1]
    square = exported["model"].config.image_resize_mode == "square"
    assert type(processor.image_processor).__name__.startswith("ViTImageProcessor" if square else "CLIPImageProcessor")
    images = [photo(), photo().rotate(90, expand=True)]
    theirs = processor(text=TEXTS, images=images, return_tensors="np", padding=True)
    ours = exported["inputs"]
    assert theirs["pixel_values"].shape == ours["pixel_values"].shape
    assert float(np.abs(theirs["pixel_values"] - ours["pixel_values"]).max()) <= TOLERANCE
    np.testing.assert_array_equal(theirs["input_ids"], ours["input_ids"])
    np.testing.assert_array_equal(theirs["attention_mask"], ours["attention_mask"])


def test_roberta_from_zero_is_robertas_network_with_positions_0_to_L_minus_1(export_case):
    """The reference: transformers' RobertaModel with the same weights, called with explicit
    position_ids = arange(L). Its own numbering (from pad_token_id + 1) embeds differently."""
    case = export_case("roberta-vit-from-zero")
    hf, model, inputs = case["hf"], case["model"], case["inputs"]
    with open(os.path.join(case["dst"], "config.json")) as f:
        assert json.load(f)["text_config"]["model_type"] == "bert"
    text = model.config.text_config
    assert text.model_type == "roberta"
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings, type_vocab_size=text.type_vocab_size,
        pad_token_id=text.pad_token_id, layer_norm_eps=text.layer_norm_eps)).eval()
    roberta.load_state_dict(hf.text_model.state_dict())
    ids, mask = (torch.from_numpy(inputs[k]).long() for k in ("input_ids", "attention_mask"))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        reference = hf.text_projection(roberta(ids, mask, position_ids=positions).pooler_output)
        own_numbering = hf.text_projection(roberta(ids, mask).pooler_output)
    ours = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    assert _max_diff(reference, ours) <= TOLERANCE
    assert _max_diff(own_numbering, ours) > 1e-3


def test_a_pair_of_towers_transformers_cannot_hold_is_one_line_and_writes_nothing(tmp_path):
    """A CLIP text tower is exported as a CLIPModel, which has no ViT vision tower."""
    from koclip.config import tiny_config
    from koclip.modeling import KoCLIP

    config = tiny_config("clip_text_model", "vit")
    ckpt = Checkpoint(config, jax.device_get(KoCLIP(config).init(0)))
    with pytest.raises(ConfigError, match="a clip_text_model text tower is exported as a CLIPModel, which holds "
                                          "a CLIP vision tower only, not 'vit'"):
        export_transformers(ckpt, str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


def test_cli_wrong_path_and_existing_export_are_one_line_exit_2(tiny_ckpt_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["export", str(tmp_path / "no-such-checkpoint"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koclip: error: ") and err.count("\n") == 1 and "no-such-checkpoint" in err
    assert not dst.exists()

    assert main(["export", tiny_ckpt_dir, str(dst)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {dst}")
    assert main(["export", tiny_ckpt_dir, str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["export", tiny_ckpt_dir, str(dst), "--overwrite"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "vision-text-dual-encoder"
    assert config["koclip_fingerprint"] == load_checkpoint(tiny_ckpt_dir).fingerprint


def test_an_export_loads_back_as_a_checkpoint_that_embeds_the_same(exported):
    """export -> load_checkpoint (the transformers folder itself) -> the same features: the vision
    keys as transformers 4 writes them (vision_model.vision_model.*) are read as they are."""
    from koclip.checkpoint import load_checkpoint
    from koclip.quickstart import load_koclip

    load_checkpoint(exported["dst"])  # a CheckpointError (keys that do not fit) before the fix
    model, inputs = exported["model"], exported["inputs"]
    back, _ = load_koclip(exported["dst"])
    assert np.abs(back.get_image_features(inputs["pixel_values"]) -
                  model.get_image_features(inputs["pixel_values"])).max() <= TOLERANCE
    assert np.abs(back.get_text_features(inputs["input_ids"], inputs["attention_mask"]) -
                  model.get_text_features(inputs["input_ids"], inputs["attention_mask"])).max() <= TOLERANCE
