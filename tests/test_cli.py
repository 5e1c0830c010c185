"""The koclip CLI, run in-process: init, info, embed-text, embed-image, and its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import hf_models
from koclip import checkpoint
from koclip.cli.main import main
from koclip.modeling import KoCLIP
from koclip.processing import tokenize
from koclip.vocab import TINY_CORPUS, train_wordpiece


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (64, 64)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (root / "notes.jpg").write_text("not an image")
    return paths, str(root / "notes.jpg")


def test_info_reports_the_fingerprint(tiny_ckpt_dir, capsys):
    assert main(["info", tiny_ckpt_dir]) == 0
    out = capsys.readouterr().out
    assert checkpoint.load_checkpoint(tiny_ckpt_dir).fingerprint in out
    assert "bert" in out and "clip_vision_model" in out


def test_embed_text_prints_the_library_embeddings(tiny_ckpt_dir, capsys):
    texts = ["빨간 사과", "소파 위에 고양이"]
    assert main(["embed-text", tiny_ckpt_dir, *texts, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ckpt = checkpoint.load_checkpoint(tiny_ckpt_dir)
    ids, mask = tokenize(ckpt.tokenizer(), texts, ckpt.config.text_length_buckets)
    expected = np.asarray(KoCLIP(ckpt.config).encode_text(ckpt.params, ids, mask))
    np.testing.assert_allclose(np.array([printed[t] for t in texts]), expected, atol=1e-5)


def test_embed_image_with_labels_prints_probabilities(tiny_ckpt_dir, images, capsys):
    paths, _ = images
    assert main(["embed-image", tiny_ckpt_dir, *paths, "--text", "고양이", "사과", "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == set(paths)
    for p in probs.values():
        assert set(p) == {"고양이", "사과"} and abs(sum(p.values()) - 1.0) < 1e-5


@pytest.mark.parametrize("argv_tail,needle", [
    (["info", "{missing}"], "checkpoint directory not found"),
    (["embed-image", "{ckpt}", "{bad}"], "not_an_image"),
    (["embed-image", "{ckpt}", "{missing}.png"], "not_found"),
    (["embed-text", "{ckpt}", " "], "empty"),
    (["init", "{missing}"], "--tiny"),
])
def test_errors_are_one_line(tmp_path, tiny_ckpt_dir, images, capsys, argv_tail, needle):
    argv = [a.format(missing=str(tmp_path / "nope"), ckpt=tiny_ckpt_dir, bad=images[1]) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_init_from_transformers_dirs(tmp_path, capsys):
    _, text_dir = hf_models.bert(tmp_path / "bert")
    train_wordpiece(TINY_CORPUS, vocab_size=120).save_pretrained(text_dir)
    _, vision_dir = hf_models.clip(tmp_path / "clip", projection_dim=24)
    out = str(tmp_path / "hybrid")
    assert main(["init", out, "--text", text_dir, "--vision", vision_dir]) == 0
    assert main(["embed-text", out, "빨간 사과", "--json"]) == 0
    vectors = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(vectors["빨간 사과"]) == 24


# ---------------------------------------------------------------- what every command line shares


def test_both_flag_spellings_parse_alike_and_beam_flags_pass_through():
    from koclip.cli import ArgumentParser

    parser = ArgumentParser(prog="x")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-memory", default="4GB")
    for argv in (["--batch-size", "8", "--max-memory=1GB"], ["--batch_size", "8", "--max_memory=1GB"]):
        args, rest = parser.parse_known_args(argv + ["--temp_location=gs://b/tmp", "--", "--batch_size"])
        assert (args.batch_size, args.max_memory) == (8, "1GB")
        assert rest == ["--temp_location=gs://b/tmp", "--", "--batch_size"]  # Beam's own, and after "--"


def test_run_cli_reports_a_koclip_error_in_one_line_and_lets_bugs_raise(capsys):
    from koclip.cli import run_cli
    from koclip.errors import NotFoundError, UsageError

    def missing():
        raise NotFoundError("no such file: x.jsonl")

    assert run_cli("prog", missing) == 2
    assert capsys.readouterr().err == "prog: error: no such file: x.jsonl\n"
    assert run_cli("prog", lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # a programming error keeps its traceback
        run_cli("prog", lambda: 1 / 0)
    with pytest.raises(ValueError):
        run_cli("prog", lambda: int("not a number"))
    assert issubclass(UsageError, Exception) and not issubclass(UsageError, ValueError)


def test_every_command_line_is_built_on_the_shared_parts():
    """Each `main` parses with koclip.cli.ArgumentParser (both spellings) and reports through
    run_cli, so a new CLI cannot quietly catch its own tuple of errors again."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    mains = []
    for path in sorted([*root.glob("koclip/**/*.py"), *root.glob("pipelines/*.py"), *root.glob("jobs/*.py")]):
        if path.name == "page.py":  # the Streamlit page's main() draws a page: errors are shown on it
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                mains.append(path.relative_to(root).as_posix())
                text = ast.get_source_segment(path.read_text(encoding="utf-8"), node)
                assert "run_cli(" in text, path
                assert "except" not in text, f"{path}: main() catches errors itself"
    assert {"koclip/cli/main.py", "koclip/query/cli.py", "pipelines/embed.py", "jobs/train.py",
            "jobs/reindex.py"} <= set(mains)
