"""transformers' CLIPModel folders (Bingsu/clip-vit-base-patch32-ko's layout: the CLIP text
transformer with a Korean tokenizer) load as checkpoints and embed as the PyTorch model does."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hf_models
from hf_models import assert_matches_torch
from koclip import checkpoint
from koclip.cli.main import main
from koclip.errors import CheckpointError


@pytest.mark.parametrize("weights,eos", [("safetensors", "first"), ("bin", "first"), ("safetensors", "legacy")])
def test_clip_model_folder_embeds_as_transformers(tmp_path, weights, eos):
    torch_model, path = hf_models.clip_model(tmp_path / "hf", weights, eos)
    ckpt = checkpoint.load_checkpoint(path)
    text = ckpt.config.text_config
    assert text.model_type == "clip_text_model" and text.eos_token_id == torch_model.config.text_config.eos_token_id
    assert ckpt.config.max_text_length == 24  # the text tower's max_position_embeddings, as CLIP's tokenizer truncates
    assert np.array_equal(ckpt.params["text_projection"]["kernel"], torch_model.text_projection.weight.detach().numpy().T)
    assert float(ckpt.params["logit_scale"]) == torch_model.logit_scale.item()
    assert_matches_torch(ckpt, torch_model)


def test_pooling_reads_the_end_of_text_token_not_the_last_or_first(tmp_path):
    """Moving the EOS token changes the text embedding; tokens after it (under the mask) do not."""
    _, path = hf_models.clip_model(tmp_path / "hf")
    ckpt = checkpoint.load_checkpoint(path)
    model, eos = ckpt.model(), ckpt.config.text_config.eos_token_id
    ids = np.array([[10, 11, 12, eos, 0, 0], [10, 11, 12, eos, 0, 0], [10, 11, eos, 12, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    ids[1, 4:] = [30, 31]  # two real tokens after the EOS: causal attention keeps them out of its state
    out = np.asarray(model.encode_text(ckpt.params, ids, mask))
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    assert np.abs(out[0] - out[2]).max() > 1e-3


def test_encoders_on_a_converted_clip_model_match_transformers(tmp_path, capsys):
    """What the pipeline, queries and evaluation embed through (koclip.encoders), from real
    tokenized Korean text, after `koclip convert` into our format."""
    torch_model, src = hf_models.clip_model(tmp_path / "hf")
    dst = str(tmp_path / "ours")
    assert main(["convert", src, dst]) == 0
    converted = checkpoint.load_checkpoint(dst)
    assert converted.fingerprint == checkpoint.load_checkpoint(src).fingerprint
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["text_config"]["model_type"] == "clip_text_model"
    batch = hf_models.assert_encoders_match_torch(converted, torch_model, src)
    assert (batch["input_ids"] == torch_model.config.text_config.eos_token_id).any(dim=1).all()
    capsys.readouterr()
    assert main(["info", dst]) == 0
    assert "clip_text_model" in capsys.readouterr().out


def test_a_clip_text_config_without_an_integer_eos_is_one_line(tmp_path):
    _, path = hf_models.clip_model(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = [2, 3]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: a clip_text_model needs one integer eos_token_id"):
        checkpoint.load_checkpoint(path)
