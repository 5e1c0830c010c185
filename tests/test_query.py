"""koclip.query on a tiny random checkpoint, over a real Parquet store and a real FAISS index.

The corpus is the emoji-ko test split of an 800-emoji build, embedded by the same checkpoint
through checkpoint_encoders, written as two Parquet shards and indexed by koclip.index. The
tiny model's rankings mean nothing; what is checked is that search(), classify() and
rank_patches() compute exactly what they claim (against brute force and jobs.evaluate).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from koclip import query
from koclip.errors import ImageDecodeError
from koclip.query import cli as query_cli
from koclip.checkpoint import load_checkpoint
from koclip.data import cache_dir
from koclip.encoders import checkpoint_encoders
from koclip.processing import ImagePreprocessor

BATCH = query.DEFAULT_BATCH_SIZE


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from koclip.data.emoji_ko import ensure_emoji_ko
    from koclip.data.manifest import read_manifest

    manifest = ensure_emoji_ko(str(tmp_path_factory.mktemp("emoji-ko")), limit=800)
    return read_manifest(manifest, split="test")


@pytest.fixture(scope="module")
def model(tiny_ckpt_dir):
    return query.load_model(tiny_ckpt_dir)


def embed_images(model, records) -> np.ndarray:
    """float32 [N, D] in record order, in batches of the model's batch size as jobs.evaluate makes them."""
    preprocess, size = ImagePreprocessor.from_config(model.config), model.batch_size
    batches = [np.stack([preprocess(r.uri) for r in records[i:i + size]]) for i in range(0, len(records), size)]
    return np.concatenate([model.encoders.images(b) for b in batches])


def write_store(root, model, records, image_embeddings, shards: int = 2) -> str:
    """A real Parquet embedding store of `records` (captions embedded too), in `shards` shards."""
    from koclip.store import Row, rows_to_table, write_shard

    rows = [Row(r.id, r.uri, f"{i:064x}", 128, 128, list(r.captions), image_embeddings[i],
                model.embed_texts(r.captions), r.split) for i, r in enumerate(records)]
    step = -(-len(rows) // shards)
    for n in range(shards):
        table = rows_to_table(rows[n * step:(n + 1) * step], model.fingerprint, model.config.to_dict(),
                              model.config.projection_dim)
        write_shard(str(pathlib.Path(root) / f"shard-{n:05d}.parquet"), table)
    return str(root)


@pytest.fixture(scope="module")
def image_embeddings(model, records):
    return embed_images(model, records)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, model, records, image_embeddings):
    return write_store(tmp_path_factory.mktemp("store"), model, records, image_embeddings)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, store_dir):
    from koclip.index import build_index

    out = str(tmp_path_factory.mktemp("index") / "emoji-ko")
    build_index(store_dir, out, kind="flat")
    return out


@pytest.fixture(scope="module")
def other_ckpt_dir(tmp_path_factory):
    from koclip.cli.main import main

    out = str(tmp_path_factory.mktemp("ckpt") / "other")
    assert main(["init", out, "--tiny", "tiny-bert-clip", "--seed", "1"]) == 0
    return out


def _noise(width=70, height=50, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- search


def test_each_image_finds_itself_first(index_dir, model, records):
    results = query.search([pathlib.Path(r.uri) for r in records], k=3, index=index_dir, model=model)
    assert [hits[0].id for hits in results] == [r.id for r in records]
    for hits, record in zip(results, records):
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].uri == record.uri and hits[0].captions == list(record.captions)
        assert [h.rank for h in hits] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_text_query_ranks_as_brute_force(index_dir, tiny_ckpt_dir, records, image_embeddings):
    encoders = checkpoint_encoders(load_checkpoint(tiny_ckpt_dir), BATCH)
    for text in ("빨간 사과", "웃는 얼굴", records[5].captions[0]):
        scores = image_embeddings @ encoders.texts([text])[0]
        expected = np.argsort(-scores, kind="stable")[:10]
        hits = query.search(text, k=10, index=index_dir, model=tiny_ckpt_dir)
        assert [h.id for h in hits] == [records[i].id for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=1e-5)


def test_batch_equals_single_queries(index_dir, model, records):
    batch = ["빨간 사과", pathlib.Path(records[0].uri), records[1].captions[0],
             pathlib.Path(records[2].uri).read_bytes(), Image.open(records[3].uri)]
    together = query.search(batch, k=5, index=index_dir, model=model)
    assert len(together) == len(batch)
    for item, hits in zip(batch, together):
        alone = query.search(item, k=5, index=index_dir, model=model)
        assert [h.id for h in hits] == [h.id for h in alone]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], atol=1e-5)
    assert query.search([], index=index_dir, model=model) == []


def test_vector_queries_need_no_model(index_dir, records, image_embeddings):
    loads = query.cache_info()["model_loads"]
    vector = image_embeddings[4] * 3.0  # normalised before searching
    hits = query.search(vector, k=4, index=index_dir, model="/no/such/model")
    assert hits[0].id == records[4].id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    expected = np.argsort(-(image_embeddings @ image_embeddings[4]), kind="stable")[:4]
    assert [h.id for h in hits] == [records[i].id for i in expected]
    batch = query.search(image_embeddings[[4, 7]], k=4, index=index_dir)
    assert [h.id for h in batch[0]] == [h.id for h in hits] and batch[1][0].id == records[7].id
    assert query.cache_info()["model_loads"] == loads
    with pytest.raises(query.QueryError, match="dimension 16"):
        query.search(np.ones(5, np.float32), index=index_dir)
    with pytest.raises(query.QueryError, match="non-zero"):
        query.search(np.zeros(16, np.float32), index=index_dir)


def test_caption_index_hits_name_their_item(store_dir, model, records, tmp_path):
    from koclip.index import build_index

    build_index(store_dir, str(tmp_path / "captions"), column="caption_embeddings", kind="flat")
    # The tiny vocabulary maps many Korean captions to the same tokens: query with one whose
    # embedding no other caption shares, so the expected first hit is not a tie.
    embedded = model.embed_texts([r.captions[0] for r in records])
    similar = (embedded @ embedded.T > 1 - 1e-5).sum(axis=1)
    pick = records[int(np.flatnonzero(similar == 1)[0])]
    caption = embedded[records.index(pick)]
    hits = query.search(caption, k=2, index=str(tmp_path / "captions"))
    assert hits[0].id == f"{pick.id}#0" and hits[0].item_id == pick.id
    assert hits[0].captions == list(pick.captions[:1]) and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_the_index_and_bad_k(index_dir, model, records):
    hits = query.search("사과", k=len(records) + 5, index=index_dir, model=model)
    assert len(hits) == len(records) and sorted(h.id for h in hits) == sorted(r.id for r in records)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(query.QueryError, match="k must be"):
            query.search("사과", k=bad, index=index_dir, model=model)


def test_models_and_indexes_load_once_per_process(index_dir, tiny_ckpt_dir):
    query.clear_cache()
    before = query.cache_info()
    query.search("빨간 사과", k=3, index=index_dir, model=tiny_ckpt_dir)
    model = query.load_model(tiny_ckpt_dir)
    compiles = model.compiles()
    query.search("강아지 얼굴", k=3, index=index_dir, model=tiny_ckpt_dir)
    after = query.cache_info()
    assert after["model_loads"] == before["model_loads"] + 1
    assert after["index_loads"] == before["index_loads"] + 1
    assert model.compiles() == compiles  # same text bucket: no new trace
    assert query.load_model(tiny_ckpt_dir) is model


def test_a_newly_published_version_is_picked_up(tmp_path, model, records, image_embeddings):
    from koclip.index import build_index

    root = str(tmp_path / "index")
    build_index(write_store(tmp_path / "old", model, records[:10], image_embeddings[:10], shards=1), root, kind="flat")
    loads = query.cache_info()["index_loads"]
    assert len(query.search("사과", k=50, index=root, model=model)) == 10
    assert len(query.search("사과", k=50, index=root, model=model)) == 10
    assert query.cache_info()["index_loads"] == loads + 1
    build_index(write_store(tmp_path / "new", model, records, image_embeddings, shards=1), root, kind="flat")
    hits = query.search(pathlib.Path(records[20].uri), k=1, index=root, model=model)
    assert hits[0].id == records[20].id and query.cache_info()["index_loads"] == loads + 2
    assert sum(version.startswith(root) for version in query.cache_info()["indexes"]) == 1  # the old one is dropped


def test_an_index_on_gcs(gcs_bucket, store_dir, model, records):
    from koclip.index import build_index

    build_index(store_dir, f"{gcs_bucket}/index", kind="flat")
    hits = query.search(pathlib.Path(records[2].uri), k=2, index=f"{gcs_bucket}/index", model=model)
    assert hits[0].id == records[2].id and hits[0].uri == records[2].uri


def test_fingerprint_mismatch_is_refused(index_dir, other_ckpt_dir, model):
    other = query.load_model(other_ckpt_dir)
    with pytest.raises(query.FingerprintMismatch) as e:
        query.search("사과", index=index_dir, model=other_ckpt_dir)
    assert other.fingerprint in str(e.value) and model.fingerprint in str(e.value)


def test_undecodable_query_image(index_dir, model, tmp_path):
    with pytest.raises(query.QueryImageError, match="not_an_image") as e:
        query.search(b"this is not a picture", index=index_dir, model=model)
    assert isinstance(e.value, ImageDecodeError) and e.value.reason == "not_an_image"
    with pytest.raises(query.QueryImageError) as e:
        query.search(tmp_path / "missing.png", index=index_dir, model=model)
    assert e.value.reason == "not_found" and "missing.png" in str(e.value)


def test_a_str_is_always_text(index_dir, model, records):
    path = records[0].uri  # a path given as str is searched as text
    as_text = query.search(path, k=5, index=index_dir, model=model)
    by_vector = query.search(model.embed_texts([path])[0], k=5, index=index_dir)
    assert [h.id for h in as_text] == [h.id for h in by_vector]
    assert as_text[0].score < 0.99  # the image itself would score 1.0
    with pytest.raises(TypeError, match="a query is"):
        query.search(42, index=index_dir, model=model)
    with pytest.raises(query.QueryError, match="empty"):
        query.search("  ", index=index_dir, model=model)


def test_missing_index_and_model(tmp_path, model, index_dir):
    with pytest.raises(query.QueryError, match="python -m pipelines.index"):
        query.search("사과", index=str(tmp_path / "nothing"), model=model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(query.QueryError, match="is not an index"):
        query.search("사과", index=str(tmp_path / "empty"), model=model)
    with pytest.raises(query.QueryError, match="python -m jobs.train"):
        query.search("사과", index=index_dir, model=str(tmp_path / "nothing"))


# ---------------------------------------------------------------- agreement with jobs.evaluate


def check_agreement(index_dir, ckpt_dir, model, records) -> dict:
    """Assert that text->image MRR/recall from search() and zero-shot accuracy from classify()
    are jobs.evaluate's figures on the same records, model and encoder batch size; return them."""
    from jobs.evaluate import evaluate

    result = evaluate(ckpt_dir, records, batch_size=model.batch_size, encoders=model.encoders)
    figures = result["metrics"]
    assert result["counts"]["images_embedded"] == len(records)

    captions = list(dict.fromkeys(c for r in records for c in r.captions))  # evaluate's caption queries
    owners = {c: {r.id for r in records if c in r.captions} for c in captions}
    hits = query.search(captions, k=10, index=index_dir, model=model)
    ranks = np.array([next((h.rank for h in found if h.id in owners[c]), np.inf) for c, found in zip(captions, hits)])
    for k in (1, 5, 10):
        assert np.mean(ranks <= k) == pytest.approx(figures[f"t2i_recall@{k}"], abs=1e-12)
        assert np.mean(np.where(ranks <= k, 1 / ranks, 0)) == pytest.approx(figures[f"t2i_mrr@{k}"], abs=1e-12)
    assert figures["t2i_recall@10"] > 0  # something is found, so the comparison is not 0 == 0

    labels = list(dict.fromkeys(r.captions[0] for r in records))
    ranked = query.classify([pathlib.Path(r.uri) for r in records], labels, model=model)
    # evaluate counts ties against the model; classify lists tied labels in the order given. The
    # tiny vocabulary reads most Korean words as [UNK], so many prompts tie there, and the two
    # compute the same probabilities along different float paths: a tie in one may differ in the
    # last bits in the other. So evaluate's figure must lie between the accuracies with near-ties
    # (within 1e-6) counted for and against the model.
    own = [dict(found)[r.captions[0]] for found, r in zip(ranked, records)]
    best_ranks = np.array([1 + sum(p > o + 1e-6 for _, p in found) for found, o in zip(ranked, own)])
    worst_ranks = np.array([sum(p >= o - 1e-6 for _, p in found) for found, o in zip(ranked, own)])
    for k in (1, 5):
        assert np.mean(worst_ranks <= k) - 1e-12 <= figures[f"zeroshot_acc@{k}"] <= np.mean(best_ranks <= k) + 1e-12
    return figures


def test_search_and_classify_match_jobs_evaluate(index_dir, tiny_ckpt_dir, model, records):
    assert len(records) > 50
    check_agreement(index_dir, tiny_ckpt_dir, model, records)


# Read at collection, before the session fixture points KOCLIP_CACHE at a temporary folder.
USER_CACHE = cache_dir()


@pytest.mark.slow
def test_demo_model_on_the_emoji_ko_test_split(tmp_path):
    """The issue's check with the demo model (`python -m jobs.train`): embed the emoji-ko test
    split, index it, every test image finds itself first, and search()/classify() reproduce
    jobs.evaluate's figures. Prints them (docs/query.md quotes this line)."""
    from koclip.data.emoji_ko import ensure_emoji_ko
    from koclip.data.manifest import read_manifest
    from koclip.index import build_index

    demo = os.path.join(USER_CACHE, "demo")
    if not os.path.exists(os.path.join(demo, "config.json")):
        pytest.skip(f"no demo model in {demo}: run `python -m jobs.train`")
    records = read_manifest(ensure_emoji_ko(os.path.join(USER_CACHE, "emoji-ko")), split="test")
    model = query.load_model(demo)
    store = write_store(tmp_path / "store", model, records, embed_images(model, records), shards=4)
    built = build_index(store, str(tmp_path / "index"))
    results = query.search([pathlib.Path(r.uri) for r in records], k=1, index=str(tmp_path / "index"), model=model)
    assert [hits[0].id for hits in results] == [r.id for r in records]
    figures = check_agreement(str(tmp_path / "index"), demo, model, records)

    query.clear_cache()  # a fresh process's first query: load the model and index, compile
    started = time.perf_counter()
    query.search("빨간 사과", k=10, index=str(tmp_path / "index"), model=demo)
    first = time.perf_counter() - started
    timings = []
    for text in ("웃는 얼굴", "강아지 얼굴", "빨간 사과", "하트", "비행기") * 4:
        started = time.perf_counter()
        query.search(text, k=10, index=str(tmp_path / "index"), model=demo)
        timings.append(time.perf_counter() - started)
    print(f"\ndemo model: first search() {first:.1f} s (load + compile), then median "
          f"{1000 * np.median(timings):.0f} ms per text query over {len(timings)} queries")
    print(f"\ndemo model {model.fingerprint}, emoji-ko test split: {len(records)} images, {built.meta['kind']} index; "
          f"each image first: {len(records)}/{len(records)}; search() = jobs.evaluate: "
          + ", ".join(f"{name} {figures[name]:.4f}" for name in ("t2i_mrr@10", "t2i_recall@1", "t2i_recall@10",
                                                                  "zeroshot_acc@1", "zeroshot_acc@5")))


# ---------------------------------------------------------------- command line


def test_cli_search_table(index_dir, tiny_ckpt_dir, model, capsys):
    assert query_cli.main(["빨간 사과", "강아지", "--index", index_dir, "--model", tiny_ckpt_dir, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = query.search("빨간 사과", k=3, index=index_dir, model=model)
    assert out[0] == "query: 빨간 사과" and out[1].split()[:5] == ["rank", "score", "id", "uri", "captions"]
    assert out[2].split()[:3] == ["1", f"{expected[0].score:.4f}", expected[0].id]
    assert expected[0].uri in out[2] and " / ".join(expected[0].captions) in out[2]
    assert "query: 강아지" in out and len(out) == 2 * (2 + 3) + 1


def test_cli_image_search_json_in_a_fresh_process(index_dir, tiny_ckpt_dir, records):
    proc = subprocess.run([sys.executable, "-m", "koclip.query", "--image", records[0].uri, "--index", index_dir,
                           "--model", tiny_ckpt_dir, "-k", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [answer] = json.loads(proc.stdout)
    assert answer["query"] == records[0].uri
    assert answer["hits"][0]["id"] == records[0].id and answer["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["rank"] for h in answer["hits"]] == [1, 2]


def test_cli_classify_and_patches(tiny_ckpt_dir, tmp_path, capsys):
    picture = tmp_path / "noise.png"
    _noise().save(picture)
    assert query_cli.main(["--classify", str(picture), "--labels", "사과, 고양이,강아지", "--model", tiny_ckpt_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", "probability"] and len(lines) == 4
    assert sum(float(line.split()[-1]) for line in lines[1:]) == pytest.approx(1.0, abs=2e-4)

    out = tmp_path / "heat.png"
    assert query_cli.main(["--patches", str(picture), "--text", "빨간", "사과", "--grid", "2x3", "--mode", "tokens",
                       "--model", tiny_ckpt_dir, "--out", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["text"] == "빨간 사과" and answer["grid"] == [2, 3] and len(answer["cells"]) == 6
    assert Image.open(out).size == (70, 50)


@pytest.mark.parametrize("argv,message", [
    (["사과", "--index", "{tmp}/no-index"], "python -m pipelines.index"),
    (["--image", "{tmp}/broken.png", "--index", "{index}"], "not_an_image: query image {tmp}/broken.png"),
    (["--image", "{tmp}/gone.png", "--index", "{index}"], "not_found: query image {tmp}/gone.png"),
    (["--index", "{index}"], "nothing to search for"),
    (["--classify", "{tmp}/broken.png"], "--labels"),
    (["--classify", "{tmp}/noise.png", "--labels", "사과", "--template", "사과"], "must contain"),
    (["--classify", "{tmp}/noise.png", "--labels", "사과", "--template", "{{}} 또는 {{}}"], "exactly once"),
    (["--classify", "{tmp}/noise.png", "--labels", "사과", "--template", "{{label}} 사진"], "exactly once"),
    (["--patches", "{tmp}/noise.png", "--text", "사과", "--grid", "3by3"], "grid"),
    (["사과", "--index", "{index}", "--model", "{tmp}/no-model"], "python -m jobs.train"),
])
def test_cli_errors_are_one_line(argv, message, index_dir, tiny_ckpt_dir, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    _noise().save(tmp_path / "noise.png")
    argv = [a.format(tmp=tmp_path, index=index_dir) for a in argv]
    if "--model" not in argv:
        argv += ["--model", tiny_ckpt_dir]
    assert query_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("koclip.query: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path, index=index_dir) in err
