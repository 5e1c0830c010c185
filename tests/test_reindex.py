"""jobs.reindex: add, change and delete source files; the published index follows exactly."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jobs import reindex
from koclip import fs, store
from koclip.checkpoint import load_checkpoint
from koclip.encoders import checkpoint_encoders
from koclip.index import current_version, list_versions, load_index
from koclip.processing import ImagePreprocessor


def _png(seed: int) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _put(root: str, name: str, seed: int, caption: str | None = None) -> None:
    fs.write_bytes(fs.join(root, f"{name}.png"), _png(seed))
    if caption is not None:
        fs.write_bytes(fs.join(root, f"{name}.txt"), caption.encode())


def _delete(root: str, name: str) -> None:
    fs.remove(fs.join(root, name))


def _args(source, work, index, model, *extra):
    return reindex.parse_args(["--source", source, "--work", work, "--index", index, "--model", model,
                               "--unit-size", "4", "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def encode_image(tiny_ckpt_dir):
    ckpt = load_checkpoint(tiny_ckpt_dir)
    encoders = checkpoint_encoders(ckpt, batch_size=4)
    preprocess = ImagePreprocessor.from_config(ckpt.config)
    return lambda data: encoders.images(preprocess(data)[None])[0]


def _indexed_ids(index_root: str) -> set[str]:
    return set(load_index(index_root).rows.column("id").to_pylist())


def _check_cycle(source, work, index, model, encode_image):
    for i in range(6):
        _put(source, f"img{i}", seed=i, caption=f"그림 {i}")
    first = reindex.reindex(_args(source, work, index, model))
    assert (first.new, first.embedded, first.published is not None) == (6, 6, True)
    assert _indexed_ids(index) == {f"img{i}.png" for i in range(6)}

    version = current_version(index)
    again = reindex.reindex(_args(source, work, index, model))
    assert (again.new, again.changed, again.deleted, again.embedded, again.published) == (0, 0, 0, 0, None)
    assert current_version(index) == version

    _put(source, "img6", seed=6, caption="새 그림")
    _put(source, "img7", seed=7)  # no caption sidecar
    _put(source, "img2", seed=102)  # changed content
    _delete(source, "img4.png")
    _delete(source, "img4.txt")
    third = reindex.reindex(_args(source, work, index, model))
    assert (third.new, third.changed, third.deleted, third.unchanged, third.embedded) == (2, 1, 1, 4, 3)
    expected = {f"img{i}.png" for i in (0, 1, 2, 3, 5, 6, 7)}
    assert _indexed_ids(index) == expected

    loaded = load_index(index)
    scores, rows = loaded.search(encode_image(_png(102))[None], 1)
    assert loaded.records(rows[0])[0]["id"] == "img2.png" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert set(reindex.load_state(work)) == expected
    return loaded


def test_local_add_change_delete_and_idempotent_rerun(tmp_path, tiny_ckpt_dir, encode_image):
    source, work, index = str(tmp_path / "src"), str(tmp_path / "work"), str(tmp_path / "index")
    os.makedirs(source)
    _check_cycle(source, work, index, tiny_ckpt_dir, encode_image)
    assert len(list_versions(index)) == 2  # first build + the change; the no-change run published nothing
    live = reindex.store.open_store(os.path.join(work, reindex.LIVE_DIR))
    assert sorted(live.read_table(["id"]).column("id").to_pylist()) == sorted(_indexed_ids(index))


def test_crash_between_build_and_publish_keeps_the_previous_version(tmp_path, tiny_ckpt_dir):
    source, work, index = str(tmp_path / "src"), str(tmp_path / "work"), str(tmp_path / "index")
    os.makedirs(source)
    for i in range(3):
        _put(source, f"a{i}", seed=i, caption=f"캡션 {i}")
    reindex.reindex(_args(source, work, index, tiny_ckpt_dir))
    served = current_version(index)
    _put(source, "a3", seed=3, caption="추가")

    def crash(step: str):
        if step == "index_written":  # built and written, not yet published
            raise RuntimeError("killed before publishing")

    with pytest.raises(RuntimeError, match="killed before publishing"):
        reindex.reindex(_args(source, work, index, tiny_ckpt_dir), on_step=crash)
    assert current_version(index) == served
    assert _indexed_ids(index) == {"a0.png", "a1.png", "a2.png"}

    recovered = reindex.reindex(_args(source, work, index, tiny_ckpt_dir))  # finishes the committed run
    assert recovered.new == 0 and recovered.published is not None and recovered.live_rows == 4
    assert _indexed_ids(index) == {f"a{i}.png" for i in range(4)}


def test_gcs_source_work_and_index(gcs_bucket, tiny_ckpt_dir, encode_image):
    loaded = _check_cycle(f"{gcs_bucket}/src", f"{gcs_bucket}/work", f"{gcs_bucket}/index", tiny_ckpt_dir,
                          encode_image)
    assert loaded.meta["count"] == 7


def test_errors_are_one_line(tmp_path, capsys, tiny_ckpt_dir):
    args = ["--work", str(tmp_path / "w"), "--index", str(tmp_path / "i"), "--model", tiny_ckpt_dir]
    assert reindex.main(["--source", str(tmp_path / "missing"), *args]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    assert reindex.main(["--source", str(tmp_path / "bad"), *args]) == 2
    err = capsys.readouterr().err
    assert "nothing to index" in err and err.count("\n") == 1


def test_a_rerun_keeps_the_published_index_settings_unless_told(tmp_path, tiny_ckpt_dir):
    source, work, index = (str(tmp_path / n) for n in ("source", "work", "index"))
    for i in range(3):
        _put(source, f"img{i}", seed=i, caption=f"그림 {i}")
    reindex.reindex(_args(source, work, index, tiny_ckpt_dir, "--kind", "flat", "--max-memory", "1GB",
                          "--target-recall", "0.9"))
    _put(source, "img3", seed=3, caption="새 그림")
    reindex.reindex(_args(source, work, index, tiny_ckpt_dir))
    meta = load_index(index).meta
    assert (meta["kind_requested"], meta["max_memory"], meta["target_recall"], meta["count"]) == (
        "flat", 1024**3, 0.9, 4)
    _put(source, "img4", seed=4, caption="또 새 그림")
    reindex.reindex(_args(source, work, index, tiny_ckpt_dir, "--max-memory", "2GB"))
    meta = load_index(index).meta
    assert (meta["kind_requested"], meta["max_memory"], meta["target_recall"]) == ("flat", 2 * 1024**3, 0.9)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from koclip.cli.main import main

    out = str(tmp_path_factory.mktemp("ckpt") / "other")
    assert main(["init", out, "--tiny", "tiny-bert-clip", "--seed", "1"]) == 0
    return out


def test_a_model_change_reembeds_everything_and_going_back_works(tmp_path, tiny_ckpt_dir, other_model_dir):
    """Changing --model with no source change re-embeds every item into a fresh live store and a
    rebuilt index (one model in each); so does going back, and --reembed with the same model."""
    source, work, index = (str(tmp_path / n) for n in ("source", "work", "index"))
    for i in range(5):
        _put(source, f"img{i}", seed=i, caption=f"그림 {i}")
    first = reindex.reindex(_args(source, work, index, tiny_ckpt_dir))
    a, b = (load_checkpoint(p).fingerprint for p in (tiny_ckpt_dir, other_model_dir))
    assert first.embedded == 5 and load_index(index).fingerprint == a
    for model, fingerprint in ((other_model_dir, b), (tiny_ckpt_dir, a)):
        switched = reindex.reindex(_args(source, work, index, model))
        assert (switched.embedded, switched.published is not None) == (5, True)
        assert load_index(index).fingerprint == fingerprint
        assert _indexed_ids(index) == {f"img{i}.png" for i in range(5)}
        live = store.open_store(fs.join(work, reindex.LIVE_DIR))  # one model only, each item once
        assert live.fingerprint == fingerprint and sorted(live.read_table().column("id").to_pylist()) == sorted(
            f"img{i}.png" for i in range(5))
        assert reindex.reindex(_args(source, work, index, model)).published is None  # settled: nothing to do
    _put(source, "img5", seed=5, caption="새 그림")
    forced = reindex.reindex(_args(source, work, index, tiny_ckpt_dir, "--reembed"))
    assert forced.embedded == 6 and len(load_index(index)) == 6


def test_a_read_that_times_out_once_is_retried_on_the_next_run(tmp_path, tiny_ckpt_dir, monkeypatch):
    """A transient dead letter (an injected read timeout) is tried again by the next run although
    the item did not change; a permanent one (bytes that are no image) is not, unless
    --retry-dead-letters; a transient one that keeps failing stops after --max-attempts runs."""
    from koclip import faults

    source, work, index, injected = (str(tmp_path / n) for n in ("source", "work", "index", "faults"))
    monkeypatch.setenv(faults.FAULTS_ENV, injected)
    for i in range(4):
        _put(source, f"img{i}", seed=i, caption=f"그림 {i}")
    fs.write_bytes(fs.join(source, "broken.png"), b"not a png")
    faults.inject_read_faults(injected, fs.join(source, "img1.png"))
    faults.inject_read_faults(injected, fs.join(source, "img2.png"), times=5)
    args = _args(source, work, index, tiny_ckpt_dir, "--max-attempts", "2")

    first = reindex.reindex(args)
    assert (first.embedded, first.dead_letters) == (2, 3)
    state = reindex.load_state(work)
    assert [state[i]["transient"] for i in ("img1.png", "img2.png", "broken.png")] == [True, True, False]
    assert _indexed_ids(index) == {"img0.png", "img3.png"}

    second = reindex.reindex(args)  # img1 now reads; img2 times out again (its 2nd attempt)
    assert (second.retried, second.embedded, second.dead_letters) == (2, 1, 1)
    assert _indexed_ids(index) == {"img0.png", "img1.png", "img3.png"}
    assert reindex.load_state(work)["img2.png"]["attempts"] == 2

    third = reindex.reindex(args)  # img2 has had its 2 attempts, broken.png is permanent
    assert (third.retried, third.published) == (0, None)

    forced = reindex.reindex(_args(source, work, index, tiny_ckpt_dir, "--retry-dead-letters"))
    assert (forced.retried, forced.embedded, forced.dead_letters) == (2, 0, 2)  # img2's 3rd fault; broken
    assert reindex.load_state(work)["broken.png"]["attempts"] == 2


def test_a_malformed_manifest_row_is_a_dead_letter_not_a_refusal(tmp_path, tiny_ckpt_dir):
    import json

    source, work, index = str(tmp_path / "m.jsonl"), str(tmp_path / "work"), str(tmp_path / "index")
    images = tmp_path / "images"
    rows = []
    for i in range(3):
        _put(str(images), f"img{i}", seed=i)
        rows.append(json.dumps({"id": f"img{i}", "image": f"images/img{i}.png", "captions": [f"그림 {i}"]},
                               ensure_ascii=False))
    rows.insert(1, '{"id": "half a line')
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    result = reindex.reindex(_args(source, work, index, tiny_ckpt_dir))
    assert (result.new, result.embedded, result.rejected_rows) == (3, 3, 1)
    assert "1 manifest rows rejected" in result.summary()
    rejected = [json.loads(line) for line in (tmp_path / "work" / reindex.LISTING_DEAD_LETTERS).read_text().splitlines()]
    assert [(r["stage"], r["reason"], r["line"]) for r in rejected] == [("listing", "not_json", 2)]
    assert _indexed_ids(index) == {"img0", "img1", "img2"}

    (tmp_path / "m.jsonl").write_text("\n".join(rows[:1] + rows[2:]) + "\n")  # the bad line mended away
    assert reindex.reindex(_args(source, work, index, tiny_ckpt_dir)).rejected_rows == 0
    assert not (tmp_path / "work" / reindex.LISTING_DEAD_LETTERS).exists()
