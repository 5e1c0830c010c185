"""jobs.evaluate: the function and the CLI on a tiny random checkpoint and a dozen images.

The tiny model's figures are meaningless; what is checked with it is the plumbing (counts,
skipped images, JSON, fixed shapes). Meaning is checked with injected encoders whose answer is
known: images and captions embedded by which image they belong to give perfect retrieval.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from koclip.errors import QueryError
from jobs.evaluate import (DEFAULT_TEMPLATE, Encoders, EvaluationError, correct_images, default_queries_path,
                           evaluate, format_query_report, main, query_report, read_queries)
from koclip.checkpoint import load_checkpoint
from koclip.data.manifest import read_manifest
from koclip.metrics import random_mrr_at_k

# Good images in manifest order: (first caption, more captions). The last two share a first
# caption, so they share a zero-shot label and are both relevant to that caption.
CAPTIONS = [
    ("빨간 사과", ["빨갛고 둥근 과일"]),
    ("강아지 얼굴", []),
    ("벚꽃", ["분홍색 꽃"]),
    ("소파 위에 고양이", []),
    ("하늘을 나는 비행기", ["비행기"]),
    ("바다 위의 배", []),
    ("노란 바나나", []),
    ("초록 나뭇잎", ["나뭇잎"]),
    ("파란 하늘", []),
    ("보라색 포도", []),
    ("웃는 얼굴", ["기쁜 표정"]),
    ("웃는 얼굴", []),
]
N_GOOD = len(CAPTIONS)


def _colours(n: int, rng) -> np.ndarray:
    """n random RGB colours, pairwise far apart."""
    while True:
        colours = rng.integers(0, 256, (n, 3))
        distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(n) * 1e9
        if distances.min() > 40:
            return colours


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(manifest path, colours of the good images in order)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colours = _colours(N_GOOD, rng)
    lines = []
    for i, ((first, more), colour) in enumerate(zip(CAPTIONS, colours)):
        path = root / f"img{i:02d}.png"
        size = tuple(int(s) for s in rng.integers(20, 60, 2))
        Image.new("RGB", size, tuple(int(c) for c in colour)).save(path)
        lines.append({"id": f"img{i:02d}", "image": str(path), "captions": [first, *more], "split": "test"})
    (root / "broken.png").write_bytes(b"this is not a png")
    lines.append({"id": "broken", "image": str(root / "broken.png"), "captions": ["깨진 그림"], "split": "test"})
    lines.append({"id": "gone", "image": str(root / "gone.png"), "captions": ["없는 그림"], "split": "test"})
    lines.insert(3, {"id": "train0", "image": str(root / "img00.png"), "captions": ["학습용"], "split": "train"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return str(manifest), colours


@pytest.fixture(scope="module")
def records(dataset):
    return read_manifest(dataset[0], split="test")


@pytest.fixture(scope="module")
def tiny_result(tiny_ckpt_dir, records):
    return evaluate(tiny_ckpt_dir, records, batch_size=4)


def test_counts_add_up_and_bad_images_are_listed(tiny_result, records):
    counts = tiny_result["counts"]
    assert counts["images_listed"] == len(records) == N_GOOD + 2
    assert counts["images_embedded"] + counts["images_skipped"] == counts["images_listed"]
    assert counts["images_embedded"] == N_GOOD
    reasons = {s["id"]: s["reason"] for s in tiny_result["skipped"]}
    assert reasons == {"broken": "not_an_image", "gone": "not_found"}
    assert counts["captions_listed"] == sum(len(r.captions) for r in records)
    assert counts["captions_of_skipped_images"] == 2
    distinct = {c for first, more in CAPTIONS for c in [first, *more]}
    assert counts["caption_queries"] == len(distinct)
    assert counts["labels"] == N_GOOD - 1  # two images share "웃는 얼굴"


def test_metrics_are_fractions_and_shapes_stay_fixed(tiny_result, tiny_ckpt_dir):
    m = tiny_result["metrics"]
    expected = {f"t2i_mrr@{k}" for k in (1, 5, 10)} | {f"t2i_recall@{k}" for k in (1, 5, 10)} | {
        f"i2t_recall@{k}" for k in (1, 5, 10)} | {"zeroshot_acc@1", "zeroshot_acc@5"} | {
        f"t2i_label_{name}@{k}" for name in ("mrr", "recall") for k in (1, 5, 10)}
    assert expected <= set(m)
    for name in expected:
        assert 0.0 <= m[name] <= 1.0, name
    for k in (1, 5):
        assert m[f"t2i_mrr@{k}"] <= m[f"t2i_recall@{k}"]
    assert m["t2i_recall@1"] <= m["t2i_recall@5"] <= m["t2i_recall@10"]
    assert m["t2i_mrr@10_random"] == pytest.approx(random_mrr_at_k(N_GOOD, 10))
    assert m["t2i_mrr@10_vs_random"] == pytest.approx(m["t2i_mrr@10"] / m["t2i_mrr@10_random"])
    assert tiny_result["fingerprint"] == load_checkpoint(tiny_ckpt_dir).fingerprint
    assert tiny_result["template"] == DEFAULT_TEMPLATE
    # One image shape; texts at most one shape per length bucket.
    assert tiny_result["compiles"]["image"] == 1
    assert 1 <= tiny_result["compiles"]["text"] <= len(load_checkpoint(tiny_ckpt_dir).config.text_length_buckets)


# ---------------------------------------------------------------- known answers


def _known_encoders(colours, config, template, sign=1.0) -> Encoders:
    """Image i -> one-hot e_i (recognised by its colour); a caption -> the normalised sum of the
    one-hots of the images carrying it; a prompt -> its label's caption."""
    dim = 16
    owners: dict[str, list[int]] = {}
    for i, (first, more) in enumerate(CAPTIONS):
        for caption in [first, *more]:
            owners.setdefault(caption, []).append(i)
    mean, std = np.asarray(config.image_mean), np.asarray(config.image_std)

    def images(pixels):
        rgb = (pixels * std + mean).mean(axis=(1, 2)) * 255
        which = np.linalg.norm(rgb[:, None] - colours[None], axis=-1).argmin(axis=1)
        return np.eye(dim, dtype=np.float32)[which]

    prompts = {template.format(c): c for c in owners}

    def texts(strings):
        out = np.zeros((len(strings), dim), np.float32)
        for row, s in enumerate(strings):
            out[row, owners[prompts.get(s, s)]] = sign
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return Encoders(images=images, texts=texts)


def test_perfect_encoders_give_perfect_scores(tiny_ckpt_dir, records, dataset):
    ckpt = load_checkpoint(tiny_ckpt_dir)
    template = "{} 사진"
    result = evaluate(ckpt, records, batch_size=5, template=template,
                      encoders=_known_encoders(dataset[1], ckpt.config, template))
    m = result["metrics"]
    for name in ("t2i_mrr@1", "t2i_mrr@10", "t2i_label_mrr@1", "t2i_label_recall@1", "t2i_recall@1",
                 "i2t_recall@1", "zeroshot_acc@1"):
        assert m[name] == 1.0, name
    assert m["t2i_mrr@10_vs_random"] == pytest.approx(1.0 / random_mrr_at_k(N_GOOD, 10))
    assert result["counts"]["images_skipped"] == 2


def test_opposite_encoders_score_zero(tiny_ckpt_dir, records, dataset):
    # Each caption points away from its own images: they rank last (ties with nothing above).
    ckpt = load_checkpoint(tiny_ckpt_dir)
    result = evaluate(ckpt, records, encoders=_known_encoders(dataset[1], ckpt.config, DEFAULT_TEMPLATE, sign=-1.0))
    m = result["metrics"]
    for name in ("t2i_mrr@10", "t2i_label_mrr@10", "t2i_recall@10", "i2t_recall@10", "zeroshot_acc@5"):
        assert m[name] == 0.0, name


def test_collapsed_embeddings_get_no_credit_from_ties(tiny_ckpt_dir, records):
    # Every image and text the same vector: pessimistic ties put each relevant item last (12 > 10).
    constant = Encoders(images=lambda p: np.ones((len(p), 4), np.float32) / 2,
                        texts=lambda t: np.ones((len(t), 4), np.float32) / 2)
    m = evaluate(tiny_ckpt_dir, records, encoders=constant)["metrics"]
    assert m["t2i_mrr@10"] == 0.0 and m["t2i_recall@10"] == 0.0


def test_bad_inputs_raise(tiny_ckpt_dir, records):
    with pytest.raises(QueryError, match="template"):
        evaluate(tiny_ckpt_dir, records, template="no placeholder")
    bad_only = [r for r in records if r.id in ("broken", "gone")]
    with pytest.raises(EvaluationError, match="could be decoded"):
        evaluate(tiny_ckpt_dir, bad_only)


# ---------------------------------------------------------------- CLI


def test_cli_prints_a_table_and_writes_json(tiny_ckpt_dir, dataset, tmp_path, capsys):
    out = tmp_path / "eval" / "results.json"  # a folder that does not exist yet
    code = main(["--checkpoint", tiny_ckpt_dir, "--manifest", dataset[0], "--split", "test", "--batch-size", "8",
                 "--k", "1", "5", "10", "--out", str(out), "--dtype", "bfloat16", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "text→image MRR@10" in printed and "zero-shot accuracy@5" in printed
    assert "skipped broken (not_an_image)" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["manifest"] == dataset[0] and result["split"] == "test"
    assert result["fingerprint"] == load_checkpoint(tiny_ckpt_dir).fingerprint
    assert result["dtype"] == "bfloat16" and result["template"] == DEFAULT_TEMPLATE
    assert result["elapsed_seconds"] > 0
    c = result["counts"]
    assert c["images_listed"] == N_GOOD + 2 and c["images_embedded"] + c["images_skipped"] == c["images_listed"]
    assert {s["id"] for s in result["skipped"]} == {"broken", "gone"}
    assert all(0.0 <= v <= 1.0 for k, v in result["metrics"].items() if "random" not in k)


@pytest.mark.parametrize("missing", ["checkpoint", "manifest"])
def test_cli_missing_input_is_one_line_and_exit_2(tiny_ckpt_dir, dataset, tmp_path, capsys, missing):
    paths = {"checkpoint": tiny_ckpt_dir, "manifest": dataset[0]}
    paths[missing] = str(tmp_path / "nowhere")
    code = main(["--checkpoint", paths["checkpoint"], "--manifest", paths["manifest"], "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("jobs.evaluate: error:") and "\n" not in err and "nowhere" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_empty_split_is_an_error(tiny_ckpt_dir, dataset, capsys, tmp_path):
    assert main(["--checkpoint", tiny_ckpt_dir, "--manifest", dataset[0], "--split", "val",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "no records in split 'val'" in capsys.readouterr().err


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert "--checkpoint" in done.stdout and "--template" in done.stdout


# ---------------------------------------------------------------- query report


def test_an_image_is_correct_for_a_query_that_is_one_of_its_captions(records):
    positions = {records[i].id: i for i in range(len(records))}
    assert correct_images("나뭇잎", records) == [positions["img07"]]  # a second caption counts
    assert correct_images("웃는  얼굴", records) == [positions["img10"], positions["img11"]]  # spaces normalised
    assert correct_images("얼굴", records) == []  # a word inside a caption is not the caption


def test_query_report_ranks_the_first_correct_image(tiny_ckpt_dir, records, dataset):
    ckpt = load_checkpoint(tiny_ckpt_dir)
    perfect = _known_encoders(dataset[1], ckpt.config, DEFAULT_TEMPLATE)
    # "빨간 사과" is sent between img02 (closer) and its own img00: rank 2, top-5 but not top-1.
    misled = Encoders(images=perfect.images, texts=lambda strings: np.array(
        [np.eye(16, dtype=np.float32)[2] * 0.8 + np.eye(16, dtype=np.float32)[0] * 0.6 if s == "빨간 사과"
         else perfect.texts([s])[0] for s in strings]))
    queries = [("food", "빨간 사과"), ("faces", "웃는 얼굴"), ("plants", "나뭇잎")]
    report = query_report(ckpt, records, queries, encoders=misled, top=3)
    by_query = {row["query"]: row for row in report["queries"]}
    assert [by_query[q]["rank"] for _, q in queries] == [2, 1, 1]
    assert [t["id"] for t in by_query["빨간 사과"]["top"][:2]] == ["img02", "img00"]
    assert [t["correct"] for t in by_query["빨간 사과"]["top"][:2]] == [False, True]
    assert by_query["웃는 얼굴"]["correct_images"] == 2 and by_query["웃는 얼굴"]["correct_by_split"] == {"test": 2}
    s = report["summary"]
    assert s["queries"] == 3 and s["images"] == N_GOOD  # the two broken images are skipped, listed
    assert s["top1_hit_rate"] == pytest.approx(2 / 3) and s["top5_hit_rate"] == 1.0
    assert s["mrr@10"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert report["categories"]["food"] == {"queries": 1, "top1_hit_rate": 0.0, "top5_hit_rate": 1.0}
    assert {x["id"] for x in report["skipped"]} == {"broken", "gone"}
    table = format_query_report(report)
    assert "| 빨간 사과 | 2 | 1 |" in table and "top-5 hit rate **100.0%**" in table


def test_query_without_a_correct_image_is_refused(tiny_ckpt_dir, records):
    with pytest.raises(EvaluationError, match="no correct image.*고양이"):
        query_report(tiny_ckpt_dir, records, [("", "비행기"), ("", "고양이")])


def test_query_list_parsing(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("# a comment\n# category: 동물\n고양이\n\n  강아지   얼굴 \n# category: 음식\n피자\n", encoding="utf-8")
    assert read_queries(str(path)) == [("동물", "고양이"), ("동물", "강아지 얼굴"), ("음식", "피자")]
    path.write_text("고양이\n고양이\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match="twice"):
        read_queries(str(path))


def test_committed_query_list_is_answerable_from_the_cldr_captions():
    pytest.importorskip("emoji")
    from koclip.data import emoji_cldr, emoji_ko

    queries = read_queries(default_queries_path())
    assert 60 <= len(queries) <= 100
    assert {"animals", "food", "weather", "sports", "objects", "faces", "flags"} == {c for c, _ in queries}
    captions = [emoji_cldr.captions(text, name) for text, name in emoji_ko.candidates()]
    for _, query in queries:
        assert any(query in c for c in captions), query


def test_cli_query_report_writes_json_and_markdown(tiny_ckpt_dir, dataset, tmp_path, capsys):
    queries = tmp_path / "q.txt"
    queries.write_text("# category: misc\n학습용\n비행기\n", encoding="utf-8")
    out = tmp_path / "report" / "queries.json"
    assert main(["--checkpoint", tiny_ckpt_dir, "--manifest", dataset[0], "--queries", str(queries),
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["split"] == "all" and report["summary"]["images"] == N_GOOD + 1  # the train image too
    assert [row["query"] for row in report["queries"]] == ["학습용", "비행기"]
    assert all(1 <= row["rank"] <= N_GOOD + 1 for row in report["queries"])
    markdown = (tmp_path / "report" / "queries.md").read_text(encoding="utf-8")
    assert "| 학습용 |" in markdown and markdown in capsys.readouterr().out
    assert main(["--checkpoint", tiny_ckpt_dir, "--manifest", dataset[0], "--queries", str(tmp_path / "none.txt"),
                 "--out", str(out)]) == 2
    assert "none.txt" in capsys.readouterr().err
