"""The embedding pipeline end to end on Beam's local runner, with a tiny random checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koclip import fs, store
from koclip.checkpoint import load_checkpoint
from koclip.encoders import checkpoint_encoders
from koclip.processing import ImagePreprocessor
from koclip.errors import ManifestError
from pipelines import embed
from pipelines.listing import list_items
from pipelines.transforms.write import read_dead_letters
from corpus import write_corpus, write_manifest


def corpus_run_model(result) -> str:
    return json.loads(open(os.path.join(result.output, "_run.json")).read())["model"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("corpus"))
    records, expected = write_corpus(folder)
    return folder, write_manifest(os.path.join(folder, "manifest.jsonl"), records), records, expected


@pytest.fixture(scope="module")
def encoders(tiny_ckpt_dir):
    ckpt = load_checkpoint(tiny_ckpt_dir)
    return ckpt, checkpoint_encoders(ckpt, batch_size=4)


@pytest.fixture(scope="module")
def corpus_run(corpus, tiny_ckpt_dir, tmp_path_factory):
    _, manifest, _, _ = corpus
    output = str(tmp_path_factory.mktemp("embedded"))
    result = embed.run(["--input", manifest, "--output", output, "--model", tiny_ckpt_dir,
                        "--unit_size", "5", "--batch_size", "4"])
    return output, result


def test_every_bad_input_ends_in_exactly_one_outcome(corpus, corpus_run):
    _, _, records, expected = corpus
    output, result = corpus_run
    table = store.open_store(output).read_table()
    embedded = table.column("id").to_pylist()
    dead = {d["id"]: d for d in read_dead_letters(output)}
    assert sorted(embedded) == sorted(i for i, outcome in expected.items() if outcome == "embedded")
    assert {i: d["reason"] for i, d in dead.items()} == {i: o for i, o in expected.items() if o != "embedded"}
    assert not set(embedded) & set(dead)
    assert result.totals["items"] == len(records) == len(embedded) + len(dead)
    assert result.this_run["items_read"] == len(records)
    assert result.this_run["items_embedded"] == len(embedded)
    assert result.this_run["dead_letters"] == len(dead)
    assert result.this_run.get("recompiles", 0) == 0
    # One model per process, shared by both worker threads: one warm-up, one compile per shape.
    config = load_checkpoint(corpus_run_model(result)).config
    assert result.this_run["model_loads"] == 1
    assert result.this_run["warmup_compiles"] == 1 + len(config.text_length_buckets)
    assert dead["missing"]["stage"] == "read"
    assert result.totals["blank_captions"] == 1
    assert not os.path.exists(os.path.join(output, embed.UNITS_DIR))  # removed once every unit is done
    assert all(d["message"] for d in dead.values())


def test_embedded_rows_equal_the_bare_encoder(corpus, corpus_run, encoders):
    folder, _, records, expected = corpus
    output, _ = corpus_run
    ckpt, enc = encoders
    by_id = {r["id"]: r for r in records}
    rows = {r["id"]: r for r in store.open_store(output).read_table().to_pylist()}
    preprocess = ImagePreprocessor.from_config(ckpt.config)
    ids = sorted(rows)
    paths = [os.path.join(folder, by_id[i]["image"]) for i in ids]
    direct = enc.images(np.stack([preprocess(p) for p in paths]))
    stored = np.stack([np.asarray(rows[i]["image_embedding"], np.float32) for i in ids])
    np.testing.assert_allclose(stored, direct, atol=1e-5)
    for i, path in zip(ids, paths):
        row = rows[i]
        assert row["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert row["captions"] == [c for c in by_id[i]["captions"] if c.strip()]
        assert row["fingerprint"] == ckpt.fingerprint
        np.testing.assert_allclose(np.asarray(row["caption_embeddings"], np.float32),
                                   enc.texts(row["captions"]), atol=1e-5)
    assert (rows["exif_rotated"]["width"], rows["exif_rotated"]["height"]) == (30, 60)
    assert (rows["good0"]["width"], rows["good0"]["height"]) == (48, 40)


def test_shards_read_as_one_dataset_with_metadata(corpus_run, encoders):
    import duckdb
    import pandas as pd

    output, result = corpus_run
    ckpt, _ = encoders
    shards = sorted(f for f in os.listdir(output) if f.startswith("shard-"))
    assert len(shards) == result.units  # every unit of 5 items has at least one good image
    count = duckdb.sql(f"SELECT count(*) FROM '{output}/shard-*.parquet'").fetchall()[0][0]
    assert count == result.totals["embedded"]
    frame = pd.read_parquet(output)
    assert len(frame) == count and set(frame["fingerprint"]) == {ckpt.fingerprint}
    meta = pq.read_metadata(os.path.join(output, shards[0])).metadata
    assert meta[b"koclip.fingerprint"].decode() == ckpt.fingerprint
    assert json.loads(meta[b"koclip.config"])["projection_dim"] == ckpt.config.projection_dim
    assert not [f for f in os.listdir(output) if ".tmp" in f]


def test_rerun_skips_finished_units_and_overwrite_redoes_them(corpus, corpus_run, tiny_ckpt_dir, tmp_path):
    _, manifest, _, _ = corpus
    output = str(tmp_path / "copy")
    shutil.copytree(corpus_run[0], output)
    args = ["--input", manifest, "--output", output, "--model", tiny_ckpt_dir, "--unit_size", "5", "--batch_size", "4"]
    again = embed.run(args)
    assert (again.units_embedded, again.units_skipped) == (0, again.units)
    assert again.this_run == {} and again.totals == corpus_run[1].totals

    os.remove(os.path.join(output, "_done", "unit-00001.json"))
    partial = embed.run(args)
    assert (partial.units_embedded, partial.units_skipped) == (1, partial.units - 1)
    assert partial.this_run["items_read"] == 5

    redone = embed.run(args + ["--overwrite"])
    assert redone.units_embedded == redone.units and redone.totals == corpus_run[1].totals

    with pytest.raises(embed.PlanError, match="different unit_size"):
        embed.run(args[:-4] + ["--unit_size", "6", "--batch_size", "4"])

    # --strict --overwrite with a listing that turns out bad on its last row keeps the previous results.
    def results():
        return (sorted(f for f in os.listdir(output) if f.startswith("shard-")),
                sorted(os.listdir(os.path.join(output, "_done"))), open(os.path.join(output, "_run.json")).read())

    before = results()
    folder = os.path.dirname(manifest)
    records = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    # absolute image paths: the same items as the corpus manifest's, from another folder
    lines = [json.dumps({**r, "image": os.path.join(folder, r["image"])}, ensure_ascii=False) for r in records]
    bad = tmp_path / "repeats-an-id.jsonl"
    bad.write_text("\n".join(lines + [lines[0]]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="duplicate id"):
        embed.run(["--input", str(bad)] + args[2:] + ["--overwrite", "--strict"])
    assert results() == before

    # Without --strict the repeat is a listing dead letter: the planner lists the manifest again
    # without it, so the units are the original ones and stay done.
    lenient = embed.run(["--input", str(bad)] + args[2:])
    assert (lenient.units_embedded, lenient.units_skipped) == (0, lenient.units)
    [repeat] = [d for d in read_dead_letters(output) if d["stage"] == "listing"]
    assert (repeat["reason"], repeat["line"], repeat["id"]) == ("duplicate_id", len(lines) + 1, records[0]["id"])
    assert lenient.totals["rows"] == lenient.totals["items"] + 1 == corpus_run[1].totals["items"] + 1


def test_bfloat16_compute_and_float16_storage(corpus, tiny_ckpt_dir, corpus_run, tmp_path):
    _, manifest, _, _ = corpus
    output = str(tmp_path / "f16")
    embed.run(["--input", manifest, "--output", output, "--model", tiny_ckpt_dir, "--unit_size", "50",
               "--dtype", "bfloat16", "--embedding_dtype", "float16"])
    half = store.open_store(output)
    assert half.shards[0].embedding_dtype == "float16"
    full = store.open_store(corpus_run[0])
    ids_h, vec_h = next(half.iter_embeddings())
    ref = dict(zip(*[list(x) for x in zip(*[(i, v) for ids, vs in full.iter_embeddings() for i, v in zip(ids, vs)])]))
    cosine = np.sum(vec_h * np.stack([ref[i] for i in ids_h]), axis=1)
    assert cosine.min() > 0.99, cosine
    assert vec_h.dtype == np.float32


def test_folder_with_caption_sidecars_and_other_manifest_formats(tmp_path):
    import pyarrow as pa

    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "c.webp"):
        (images / name).write_bytes(b"x")
    (images / "a.txt").write_text("고양이 사진\n", encoding="utf-8")
    (images / "notes.md").write_text("ignored")
    items = list_items(str(images))
    assert [(i.id, i.caption_uri is not None) for i in items] == [("a.png", True), ("c.webp", False),
                                                                    ("sub/b.jpg", False)]
    (tmp_path / "m.csv").write_text('id,image,captions\n1,imgs/a.png,"[""하나"", ""둘""]"\n2,imgs/c.webp,셋\n',
                                    encoding="utf-8")
    pq.write_table(pa.table({"id": ["1", "2"], "uri": ["imgs/a.png", "imgs/c.webp"],
                             "captions": [["하나", "둘"], ["셋"]]}), tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        listed = list_items(str(tmp_path / name))
        assert [(i.id, i.uri, i.captions) for i in listed] == [
            ("1", str(images / "a.png"), ("하나", "둘")), ("2", str(images / "c.webp"), ("셋",))]


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_ckpt_dir, corpus):
    _, manifest, _, _ = corpus
    cases = [
        (["--no_such_flag"], "unknown option '--no_such_flag'"),
        (["--batch_size", "0", "--input", manifest], "--batch-size must be at least 1"),
        (["--input", str(tmp_path / "nope.jsonl"), "--model", tiny_ckpt_dir], "manifest not found"),
        (["--input", manifest], "train the demo model first: python -m jobs.train"),
        (["--input", manifest, "--model", str(tmp_path)], "no model at"),
    ]
    for argv, message in cases:
        assert embed.main(argv + ["--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_local_runs_use_one_worker_thread_per_core_unless_told():
    from apache_beam.options.pipeline_options import DirectOptions

    from pipelines.options import parse

    cores = len(os.sched_getaffinity(0))
    assert parse([])[1].view_as(DirectOptions).direct_num_workers == cores
    assert parse(["--direct_num_workers=1"])[1].view_as(DirectOptions).direct_num_workers == 1
    assert parse(["--direct_num_workers", "3"])[1].view_as(DirectOptions).direct_num_workers == 3


def test_gcs_end_to_end(corpus, tiny_ckpt_dir, gcs_bucket):
    folder, _, records, expected = corpus
    for name in os.listdir(folder):
        if name != "bomb.png":  # the bomb is covered locally; keep the emulator upload small
            fs.write_bytes(f"{gcs_bucket}/in/{name}", open(os.path.join(folder, name), "rb").read())
    kept = [r for r in records if r["id"] != "bomb"]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    fs.write_bytes(f"{gcs_bucket}/in/manifest.jsonl", lines.encode())
    output = f"{gcs_bucket}/out"
    result = embed.run(["--input", f"{gcs_bucket}/in/manifest.jsonl", "--output", output, "--model", tiny_ckpt_dir,
                        "--unit_size", "8", "--batch_size", "4"])
    read_back = store.open_store(output)
    embedded = sorted(read_back.read_table(["id"]).column("id").to_pylist())
    assert embedded == sorted(i for i in expected if expected[i] == "embedded")
    assert all(r["uri"].startswith(f"{gcs_bucket}/in/") for r in read_back.read_table(["uri"]).to_pylist())
    dead = {d["id"]: d["reason"] for d in read_dead_letters(output)}
    assert dead == {i: o for i, o in expected.items() if o != "embedded" and i != "bomb"}
    assert result.totals["items"] == len(kept) == len(embedded) + len(dead)
    again = embed.run(["--input", f"{gcs_bucket}/in/manifest.jsonl", "--output", output, "--model", tiny_ckpt_dir,
                       "--unit_size", "8", "--batch_size", "4"])
    assert again.units_embedded == 0


def test_sigkill_part_way_then_rerun_embeds_only_unfinished_units(tiny_ckpt_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(180):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"그림 {i}", encoding="utf-8")
    output = tmp_path / "out"
    args = ["--input", str(images), "--output", str(output), "--model", tiny_ckpt_dir,
            "--unit_size", "3", "--batch_size", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.embed", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = output / "_done"
    deadline = time.monotonic() + 300
    # wait for the first finished unit: a done marker under its final name (not NAME.tmp-PID)
    while not (done_dir.exists() and any(done_dir.glob("unit-*.json"))):
        assert proc.poll() is None, "the pipeline exited before finishing a unit"
        assert time.monotonic() < deadline, "no unit finished within 300 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(list(done_dir.glob("unit-*.json")))
    assert 1 <= finished_before < 60, f"{finished_before} of 60 units were done at the kill"

    result = embed.run(args)
    assert result.units_embedded == 60 - finished_before
    assert result.units_skipped == finished_before
    ids = store.open_store(str(output)).read_table(["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"{i:03d}.png" for i in range(180)]  # each id exactly once
    leftovers = [p for p in output.rglob("*") if ".tmp-" in p.name]
    assert not leftovers


def test_separate_worker_processes_give_the_same_result(corpus, corpus_run, tiny_ckpt_dir, tmp_path):
    """Workers in their own processes (as on Dataflow): DoFns pickle, and units stay whole."""
    _, manifest, _, _ = corpus
    output = str(tmp_path / "mp")
    result = embed.run(["--input", manifest, "--output", output, "--model", tiny_ckpt_dir, "--unit_size", "3",
                        "--batch_size", "2", "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert result.totals == corpus_run[1].totals
    reference = {r["id"]: r["image_embedding"] for r in store.open_store(corpus_run[0]).read_table().to_pylist()}
    rows = store.open_store(output).read_table().to_pylist()
    assert {r["id"] for r in rows} == set(reference)
    for r in rows:
        np.testing.assert_allclose(r["image_embedding"], reference[r["id"]], atol=1e-5)


def test_dataflow_job_builds_offline_with_the_package_staged(corpus, tiny_ckpt_dir, tmp_path, monkeypatch):
    """--dry_run translates the pipeline into a Dataflow job without submitting it: our transforms
    survive translation and setup.py is built into the sdist that workers install."""
    from apache_beam.portability.api import beam_runner_api_pb2

    _, manifest, _, _ = corpus
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = embed.run(["--input", manifest, "--output", str(tmp_path / "out"), "--model", tiny_ckpt_dir,
                        "--runner=DataflowRunner", "--project=koclip-test", "--region=us-central1",
                        "--temp_location=gs://koclip-test/tmp", "--setup_file=./setup.py", "--dry_run=True"])
    pipeline = result.job.proto_pipeline
    top_level = {t.unique_name.split("/")[0] for t in pipeline.components.transforms.values()}
    assert {"Units", "Items", "Decode", "Embed", "Write"} <= top_level
    staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
              for env in pipeline.components.environments.values() for d in env.dependencies}
    assert "workflow.tar.gz" in staged  # the sdist of setup.py
    assert not os.path.exists(tmp_path / "out" / "_done")


def test_job_graph_does_not_grow_with_the_listing(tiny_ckpt_dir, tmp_path, monkeypatch):
    """Units reach the workers as files, not inside the job: Dataflow refuses graphs over 10 MB."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sizes = {}
    for n in (2000, 100_000):
        manifest = tmp_path / f"items-{n}.jsonl"
        manifest.write_text("".join(json.dumps({"id": f"item-{i}", "image": f"gs://bucket/images/{i:08d}.jpg",
                                                "captions": [f"{i}번째 사진의 꽤 긴 한국어 설명문"]}, ensure_ascii=False) + "\n"
                                    for i in range(n)), encoding="utf-8")
        output = tmp_path / f"out-{n}"
        result = embed.run(["--input", str(manifest), "--output", str(output), "--model", tiny_ckpt_dir,
                            "--unit_size", "1000", "--runner=DataflowRunner", "--project=koclip-test",
                            "--region=us-central1", "--temp_location=gs://koclip-test/tmp",
                            "--setup_file=./setup.py", "--dry_run=True"])
        sizes[n] = len(result.job.proto_pipeline.SerializeToString())
        unit_files = sorted(os.listdir(output / "_units"))
        assert len(unit_files) == -(-n // 1000)
        assert sum(len((output / "_units" / f).read_text(encoding="utf-8").splitlines()) for f in unit_files) == n
        shutil.rmtree(output)
    # 50x the items: 98 more unit references of a few hundred bytes, not 12 MB of items.
    assert sizes[100_000] - sizes[2000] < 98 * 300, sizes


def test_a_poison_item_alone_is_dead_lettered_and_non_finite_embeddings_never_become_rows(tiny_ckpt_dir):
    """A batch that fails is encoded again item by item: only the item that fails alone is lost.
    NaN pixels give NaN embeddings: a dead letter, never a row."""
    from koclip.data.manifest import Item
    from pipelines.transforms.decode import DeadLetter, Decoded, UnitRef
    from pipelines.transforms.model_handler import Embedded, KoclipModelHandler

    handler = KoclipModelHandler(tiny_ckpt_dir, batch_size=4)
    model = handler.load_model()
    size = load_checkpoint(tiny_ckpt_dir).config.image_size
    rng = np.random.default_rng(0)

    def decoded(i, pixels):
        return Decoded(UnitRef(0, "k", 4), Item(f"i{i}", f"i{i}.png"), (f"캡션 {i}",), "0" * 64, 8, 8, pixels)

    batch = [decoded(i, rng.random((size, size, 3), dtype=np.float32)) for i in range(2)]
    batch.append(decoded(2, rng.random((size // 2, size // 2, 3), dtype=np.float32)))  # the wrong shape: poison
    batch.append(decoded(3, np.full((size, size, 3), np.nan, np.float32)))
    out = {o.decoded.item.id if isinstance(o, Embedded) else o.id: o for o in handler.run_inference(batch, model)}
    assert sorted(out) == ["i0", "i1", "i2", "i3"]
    assert all(isinstance(out[i], Embedded) and np.isfinite(out[i].image_embedding).all() for i in ("i0", "i1"))
    assert isinstance(out["i2"], DeadLetter) and (out["i2"].stage, out["i2"].reason) == ("embed", "inference_failed")
    assert isinstance(out["i3"], DeadLetter) and out["i3"].reason == "non_finite_embedding"


def test_a_redone_unit_leaves_no_stale_dead_letter(tmp_path, tiny_ckpt_dir, corpus):
    """A unit first written with a dead letter, then redone (as after a crash) with every item good,
    keeps no dead letter: each item is a row or a dead letter, once."""
    folder = corpus[0]
    rows = [{"id": f"good{i}", "image": os.path.join(folder, f"good{i}.png"), "captions": [f"그림 {i}"]}
            for i in range(3)]
    rows[0]["image"] = str(tmp_path / "arrives-later.png")
    manifest = write_manifest(str(tmp_path / "m.jsonl"), rows)
    output = str(tmp_path / "out")
    args = ["--input", manifest, "--output", output, "--model", tiny_ckpt_dir, "--unit-size", "3", "--batch-size", "4"]
    assert embed.run(args).totals["dead_letters"] == 1
    shutil.copy(os.path.join(folder, "good0.png"), tmp_path / "arrives-later.png")
    os.remove(os.path.join(output, "_done", "unit-00000.json"))
    result = embed.run(args)
    assert (result.totals["embedded"], result.totals["dead_letters"]) == (3, 0)
    assert read_dead_letters(output) == []
    assert len(pq.read_table(os.path.join(output, "shard-00000.parquet"))) == 3


def test_reads_are_bounded_and_caption_files_stay_inside_the_input(tmp_path, tiny_ckpt_dir, corpus):
    folder = corpus[0]
    inside = tmp_path / "data"
    inside.mkdir()
    for name in ("good0.png", "good1.png", "good2.png"):
        shutil.copy(os.path.join(folder, name), inside / name)
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(inside / "big.png")  # ~75 KB: random pixels do not compress
    (inside / "ok.txt").write_text("사과 한 개", encoding="utf-8")
    (inside / "huge.txt").write_text("가" * 70_000, encoding="utf-8")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the index", encoding="utf-8")
    big = os.path.getsize(inside / "big.png")
    limit = max(os.path.getsize(inside / f"good{i}.png") for i in range(3)) + 1
    assert big > limit
    rows = [{"id": "ok", "image": "good0.png", "caption_uri": "ok.txt"},
            {"id": "escape", "image": "good1.png", "caption_uri": str(secret)},
            {"id": "dotdot", "image": "good1.png", "caption_uri": "../secret.txt"},
            {"id": "long_caption", "image": "good2.png", "caption_uri": "huge.txt"},
            {"id": "too_big", "image": "big.png", "captions": ["큰 그림"]}]
    manifest = write_manifest(str(inside / "m.jsonl"), rows)
    output = str(tmp_path / "out")
    result = embed.run(["--input", manifest, "--output", output, "--model", tiny_ckpt_dir, "--max-bytes", str(limit)])
    dead = {d["id"]: d["reason"] for d in read_dead_letters(output)}
    assert dead == {"escape": "caption_outside_input", "dotdot": "caption_outside_input",
                    "long_caption": "caption_too_large", "too_big": "too_large"}
    table = store.open_store(output).read_table()
    assert table.column("id").to_pylist() == ["ok"] and table.column("captions").to_pylist() == [["사과 한 개"]]
    assert "not for the index" not in json.dumps(table.column("captions").to_pylist(), ensure_ascii=False)
    assert result.totals["items"] == 5
    # --caption-root widens where caption files may come from
    wide = embed.run(["--input", manifest, "--output", str(tmp_path / "out2"), "--model", tiny_ckpt_dir,
                      "--caption-root", str(tmp_path)])
    assert {d["id"] for d in read_dead_letters(str(tmp_path / "out2"))} == {"long_caption"}
    assert wide.totals["embedded"] == 4
