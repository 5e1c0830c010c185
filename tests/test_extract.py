"""jobs.extract on a real store (pipelines.embed of generated pictures with the tiny checkpoint), a
real flat index and real query embeddings: a range query returns exactly the items numpy's exact
scores put at or above the threshold, and its manifest goes through pipelines.embed unchanged.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.extract import main
from koclip import store
from koclip.data import Item, iter_manifest, write_manifest
from koclip.index import build_index
from pipelines import embed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_ckpt_dir):
    """30 pictures (random colour fields) embedded by pipelines.embed, and a flat index of them."""
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    items = []
    for i in range(30):
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        path = root / f"p{i:02d}.png"
        Image.fromarray(pixels).resize((64, 64)).save(path)
        items.append(Item(f"p{i:02d}", str(path), (f"그림 {i}",)))
    manifest = write_manifest(str(root / "manifest.jsonl"), items)
    embeddings = str(root / "embeddings")
    embed.run(["--input", manifest, "--output", embeddings, "--model", tiny_ckpt_dir, "--batch_size", "8"])
    index = str(root / "index")
    build_index(embeddings, index, kind="flat")
    table = store.open_store(embeddings).read_table()
    ids = table.column("id").to_pylist()
    vectors = store.vectors_to_numpy(table.column("image_embedding").combine_chunks(), table.schema.field(
        "image_embedding").type.list_size)
    return {"root": root, "index": index, "ids": ids, "vectors": vectors, "items": items}


def text_vector(ckpt: str, text: str) -> np.ndarray:
    from koclip.query import load_model

    return load_model(ckpt).embed_texts([text])[0]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_a_range_query_returns_exactly_the_items_at_or_above_the_threshold(corpus, tiny_ckpt_dir, tmp_path, capsys):
    query = "빨간 그림"
    scores = corpus["vectors"] @ text_vector(tiny_ckpt_dir, query)
    ranked = np.sort(scores)[::-1]
    threshold = float((ranked[11] + ranked[12]) / 2)  # between the 12th and 13th best: 12 items above
    out = tmp_path / "hits.jsonl"
    assert main(["--index", corpus["index"], "--query", query, "--min-similarity", str(threshold),
                 "--out", str(out), "--model", tiny_ckpt_dir]) == 0
    rows = read_jsonl(out)
    expected = {corpus["ids"][i] for i in np.flatnonzero(scores >= threshold)}
    assert {r["id"] for r in rows} == expected and len(rows) == 12
    by_id = dict(zip(corpus["ids"], scores))
    for r in rows:
        assert r["score"] == pytest.approx(float(by_id[r["id"]]), abs=1e-5) and r["queries"] == [0]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert "1 queries matched 12 items (score >= " in capsys.readouterr().out
    capped = tmp_path / "capped.jsonl"  # --k caps a range query at the best k
    assert main(["--index", corpus["index"], "--query", query, "--min-similarity", str(threshold), "--k", "5",
                 "--out", str(capped), "--model", tiny_ckpt_dir]) == 0
    assert [r["id"] for r in read_jsonl(capped)] == [r["id"] for r in rows[:5]]


def test_the_top_k_of_many_queries_once_per_item_as_parquet(corpus, tiny_ckpt_dir, tmp_path):
    queries = tmp_path / "queries.jsonl"
    texts = ["파란 그림", "초록 그림"]
    picture = corpus["items"][7].uri
    queries.write_text("\n".join([json.dumps({"text": texts[0]}, ensure_ascii=False),
                                  json.dumps({"text": texts[1]}, ensure_ascii=False),
                                  json.dumps({"image": picture})]) + "\n", encoding="utf-8")
    out = tmp_path / "top.parquet"
    assert main(["--index", corpus["index"], "--queries", str(queries), "--k", "4", "--out", str(out),
                 "--model", tiny_ckpt_dir]) == 0
    table = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids))  # an item matched twice is written once
    query_vectors = [text_vector(tiny_ckpt_dir, t) for t in texts] + [corpus["vectors"][7]]  # p07 embeds as itself
    expected: dict[str, list[int]] = {}
    for number, vector in enumerate(query_vectors):
        for i in np.argsort(-(corpus["vectors"] @ vector), kind="stable")[:4]:
            expected.setdefault(corpus["ids"][i], []).append(number)
    assert {r["id"]: r["queries"] for r in table} == expected
    assert max((r for r in table if 2 in r["queries"]), key=lambda r: r["score"])["id"] == "p07"


def test_the_extracted_manifest_feeds_pipelines_embed_unchanged(corpus, tiny_ckpt_dir, tmp_path):
    out = tmp_path / "subset.jsonl"
    assert main(["--index", corpus["index"], "--query", "그림", "--k", "9", "--out", str(out),
                 "--model", tiny_ckpt_dir]) == 0
    picked = [item.id for item in iter_manifest(str(out))]
    result = embed.run(["--input", str(out), "--output", str(tmp_path / "subset"), "--model", tiny_ckpt_dir,
                        "--batch_size", "8"])
    assert result.totals["items"] == 9
    table = store.open_store(str(tmp_path / "subset")).read_table()
    assert sorted(table.column("id").to_pylist()) == sorted(picked)
    again = store.vectors_to_numpy(table.column("image_embedding").combine_chunks(),
                                   table.schema.field("image_embedding").type.list_size)
    original = dict(zip(corpus["ids"], corpus["vectors"]))
    for item_id, vector in zip(table.column("id").to_pylist(), again):
        assert np.allclose(vector, original[item_id], atol=1e-5)


def test_wrong_flags_are_one_line_errors(corpus, tmp_path, capsys):
    for argv, message in [(["--query", "x", "--k", "0"], "--k must be at least 1"),
                          (["--query", "x", "--min-similarity", "2"], "--min-similarity is a cosine"),
                          (["--queries", str(tmp_path / "none.txt")], "queries file not found"),
                          (["--image", str(tmp_path / "none.png")], "image not found")]:
        assert main(["--index", corpus["index"], "--out", str(tmp_path / "o.jsonl")] + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jobs.extract: error: ") and message in err
