"""jobs.reindex killed (SIGKILL, a separate process) after each of its steps, then run again with
the source unchanged or changed meanwhile, on local disk and on the GCS emulator: afterwards the
live store, the index and the state hold exactly the current items, once each
(jobs.reindex_check), and no committed run is left unapplied.

Every case starts from the same settled work dir (a first run over 5 items), copied; the killed
run applies a change (an item added, one recaptioned, one deleted); the "changed" rerun changes
the source again, deleting the item the killed run had just added among other things. The items
are images in a shared pool, listed by a per-case manifest, so that copies of a work dir stay
valid for another case (a signature holds the image's uri and stamp, not the manifest's)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from jobs import reindex
from jobs.reindex_check import violations
from koclip import fs

STEPS = ("embedded", "live_updated", "index_written", "published", "state_saved")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {f"p{i}": f"사진 {i}" for i in range(5)}  # id -> caption
KILLED = {**{k: v for k, v in BASE.items() if k != "p2"}, "p1": "고친 캡션", "p5": "새 사진"}
CHANGED = {**{k: v for k, v in KILLED.items() if k not in ("p5", "p4")}, "p3": "또 고친 캡션", "p6": "나중 사진"}


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_manifest(path: str, pool: str, captions: dict[str, str]) -> None:
    rows = [{"id": k, "image": fs.join(pool, f"{k}.png"), "captions": [v]} for k, v in sorted(captions.items())]
    fs.write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _copy_tree(src: str, dst: str) -> None:
    files = fs.glob(fs.join(src, "**"))
    data = fs.cat_many(files)
    fs.write_many({fs.join(dst, p[len(src.rstrip("/")) + 1:]): data[p] for p in files})


def _argv(case: str, model: str) -> list[str]:
    return ["--source", fs.join(case, "manifest.jsonl"), "--work", fs.join(case, "work"),
            "--index", fs.join(case, "index"), "--model", model, "--unit-size", "2", "--batch-size", "2"]


def _kill_at(step: str, case: str, model: str, env: dict) -> int:
    done = subprocess.run([sys.executable, "-m", "jobs.reindex_killed", step, *_argv(case, model)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run killed at {step} ended with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.returncode


def _scenario(root: str, model: str, steps=STEPS) -> dict[str, str]:
    """Kill one run at each of `steps` (two processes at a time); returns {step: case folder}."""
    pool = fs.join(root, "pool")
    fs.write_many({fs.join(pool, f"p{i}.png"): _png(i) for i in range(7)})
    base = fs.join(root, "base")
    _write_manifest(fs.join(base, "manifest.jsonl"), pool, BASE)
    reindex.reindex(reindex.parse_args(_argv(base, model)))
    assert violations(fs.join(base, "manifest.jsonl"), fs.join(base, "work"), fs.join(base, "index")) == []

    cases = {}
    for step in steps:
        case = fs.join(root, f"killed-{step}")
        _copy_tree(fs.join(base, "work"), fs.join(case, "work"))
        _copy_tree(fs.join(base, "index"), fs.join(case, "index"))
        _write_manifest(fs.join(case, "manifest.jsonl"), pool, KILLED)
        cases[step] = case
    env = {**os.environ, "PYTHONPATH": ROOT}
    with ThreadPoolExecutor(2) as workers:
        list(workers.map(lambda step: _kill_at(step, cases[step], model, env), steps))
    return cases


def _rerun_and_check(killed_case: str, variant: str, model: str) -> None:
    case = f"{killed_case}-{variant}"
    _copy_tree(killed_case, case)
    pool = fs.join(os.path.dirname(killed_case) if "://" not in killed_case else killed_case.rsplit("/", 1)[0],
                   "pool")
    captions = CHANGED if variant == "changed" else KILLED
    _write_manifest(fs.join(case, "manifest.jsonl"), pool, captions)
    result = reindex.reindex(reindex.parse_args(_argv(case, model)))
    found = violations(fs.join(case, "manifest.jsonl"), fs.join(case, "work"), fs.join(case, "index"))
    assert found == [], f"{case}: {found}"
    from koclip.index import load_index

    rows = load_index(fs.join(case, "index")).rows.to_pylist()
    assert sorted((r["id"], r["captions"][0]) for r in rows) == sorted(captions.items())
    again = reindex.reindex(reindex.parse_args(_argv(case, model)))
    assert again.published is None and result.live_rows == len(captions)  # settled


@pytest.fixture(scope="module")
def local_cases(tmp_path_factory, tiny_ckpt_dir):
    return _scenario(str(tmp_path_factory.mktemp("faults")), tiny_ckpt_dir)


@contextlib.contextmanager
def _gcs_scenario(emulator: str, model: str, steps=STEPS):
    """_scenario on the emulator that honours generation preconditions, as the locks need
    (tests/gcs_emulator.py)."""
    import gcsfs

    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield _scenario(f"gs://koclip-test/faults-{time.monotonic_ns()}", model, steps)
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.parametrize("variant", ["unchanged", "changed"])
@pytest.mark.parametrize("step", STEPS)
def test_local_reindex_recovers_from_a_kill(local_cases, step, variant, tiny_ckpt_dir):
    _rerun_and_check(local_cases[step], variant, tiny_ckpt_dir)


@pytest.fixture(scope="module")
def gcs_cases(gcs_emulator_with_preconditions, tiny_ckpt_dir):
    with _gcs_scenario(gcs_emulator_with_preconditions, tiny_ckpt_dir) as cases:
        yield cases


# The whole matrix on GCS takes minutes (every kill is a process loading JAX); by default one kill
# on GCS, after the publish: the step whose storage operations (conditional CURRENT write, version
# folder) differ most between GCS and local disk.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["unchanged", "changed"])
@pytest.mark.parametrize("step", STEPS)
def test_gcs_reindex_recovers_from_a_kill(gcs_cases, step, variant, tiny_ckpt_dir):
    _rerun_and_check(gcs_cases[step], variant, tiny_ckpt_dir)


def test_gcs_reindex_recovers_from_a_kill_after_publishing(gcs_emulator_with_preconditions, tiny_ckpt_dir):
    with _gcs_scenario(gcs_emulator_with_preconditions, tiny_ckpt_dir, steps=("published",)) as cases:
        _rerun_and_check(cases["published"], "changed", tiny_ckpt_dir)


HELD_RUN = """
import sys
from jobs import reindex

def on_step(name):
    if name == "embedded":  # holding WORK/LOCK and INDEX/LOCK: tell the test, wait for its word
        print("holding", flush=True)
        sys.stdin.readline()

print(reindex.reindex(reindex.parse_args(sys.argv[1:]), on_step=on_step).summary(), flush=True)
"""


def test_a_second_run_on_a_gcs_work_dir_exits_naming_the_first(gcs_lock_bucket, tiny_ckpt_dir):
    """Two jobs.reindex processes on one gs:// work dir: while the first holds the locks (stopped
    after embedding, on a pipe), the second exits 2 with one line naming the first's pid; then the
    first finishes and the invariants hold."""
    pool, case = fs.join(gcs_lock_bucket, "pool"), fs.join(gcs_lock_bucket, "case")
    fs.write_many({fs.join(pool, f"p{i}.png"): _png(i) for i in range(5)})
    _write_manifest(fs.join(case, "manifest.jsonl"), pool, BASE)
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, *_argv(case, tiny_ckpt_dir)], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()[-3000:]
        second = subprocess.run([sys.executable, "-m", "jobs.reindex", *_argv(case, tiny_ckpt_dir)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("jobs.reindex: error: ") and "is locked by jobs.reindex" in last
        assert f"(pid {first.pid})" in last
        first.stdin.write("go on\n")
        first.stdin.flush()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert "5 new" in out
    assert violations(fs.join(case, "manifest.jsonl"), fs.join(case, "work"), fs.join(case, "index")) == []
    assert not fs.exists(fs.join(case, "work", "LOCK")) and not fs.exists(fs.join(case, "index", "LOCK"))
