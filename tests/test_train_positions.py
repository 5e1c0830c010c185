"""Fine-tuning keeps the text-position convention of the checkpoint it starts from."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.presets import PROJECTIONS, Phase, TrainConfig, tiny_model
from jobs.train import train
from koclip import checkpoint
from koclip.config import tiny_config
from koclip.data.manifest import Item, write_manifest
from koclip.modeling import KoCLIP


@pytest.mark.slow  # a real (one-step) training run: compiles the train step
def test_training_a_flax_hybrid_checkpoint_keeps_positions_from_zero(tmp_path):
    records = []
    for i, caption in enumerate(["빨간 사과", "강아지 얼굴", "소파 위에 고양이", "a red apple"]):
        Image.fromarray(np.full((36, 36, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        records.append(Item(id=str(i), uri=str(tmp_path / f"{i}.png"), captions=(caption,), split="train", group=str(i)))
    write_manifest(str(tmp_path / "manifest.jsonl"), records)
    cfg = TrainConfig(manifest=str(tmp_path / "manifest.jsonl"), out=str(tmp_path / "out"), batch_size=4,
                      augment=False, eval_split="", log_every=1, checkpoint_every=100,
                      phases=(Phase(1, PROJECTIONS, 1e-2),))
    config = tiny_config("roberta", text_position_ids="from_zero")
    source = checkpoint.Checkpoint(config, KoCLIP(config).init(0), tokenizer_dir=tiny_model(cfg).tokenizer_dir)
    train(cfg, source, progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_position_ids"] == "from_zero"
    assert checkpoint.load_checkpoint(str(tmp_path / "out")).config.text_position_ids == "from_zero"
