"""koclip.serve's parts without a server: the request checking (protocol) and the micro-batcher
(on a real asyncio loop and thread, with an embedding function that records its batches)."""
from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from koclip.serve.batcher import Direct, MicroBatcher
from koclip.serve.protocol import DEDUP_THRESHOLD, Limits, RequestError, parse_json, parse_knn, parse_metadata

LIMITS = Limits(max_body_bytes=1024, max_num_images=50, max_num_result_ids=200)


def test_clip_client_body_with_its_filters_off_parses():
    body = {"text": "빨간 사과", "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": False, "use_violence_detector": False, "indice_name": "laion", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0, "modality": "image", "num_images": 40, "num_result_ids": 40}
    query = parse_knn(body, LIMITS)
    assert (query.query_kind, query.query, query.modality, query.indice_name) == ("text", "빨간 사과", "image", "laion")
    assert (query.num_images, query.num_result_ids, query.dedup, query.min_similarity) == (40, 40, DEDUP_THRESHOLD, None)


def test_defaults_and_our_fields():
    query = parse_knn({"image": base64.b64encode(b"\x89PNG").decode()}, LIMITS)
    assert query.query_kind == "image" and query.query == b"\x89PNG"
    assert (query.modality, query.indice_name, query.num_images, query.num_result_ids, query.dedup) == \
        ("image", None, 40, 40, None)
    query = parse_knn({"embedding_input": [1, 0.5], "num_images": 5, "deduplicate": 0.9, "min_similarity": 0.2,
                       "aesthetic_score": "", "aesthetic_weight": ""}, LIMITS)
    assert (query.query_kind, query.query, query.dedup, query.min_similarity) == ("vector", [1.0, 0.5], 0.9, 0.2)
    assert parse_knn({"image": "data:image/png;base64," + base64.b64encode(b"abc").decode()}, LIMITS).query == b"abc"
    assert parse_knn({"text": "", "image_url": "https://x/y.png"}, LIMITS).query_kind == "image_url"  # "" is absent
    assert parse_metadata({"ids": ["a", 3], "indice_name": "x"}) == (["a", 3], "x")


@pytest.mark.parametrize("body, status, kind", [
    ({"text": "x", "use_safety_model": True}, 422, "unsupported_filter"),
    ({"text": "x", "aesthetic_score": 9, "aesthetic_weight": "0.5"}, 422, "unsupported_filter"),
    ({"text": "x", "aesthetic_weight": "heavy", "aesthetic_score": 9}, 400, "bad_field"),
    ({"text": "x", "num_images": 51}, 400, "too_many_results"),
    ({"text": "x", "num_images": 2.0}, 400, "bad_field"),
    ({"text": "x", "deduplicate": float("nan")}, 400, "bad_field"),
    ({"embedding_input": []}, 400, "bad_embedding"),
    ({"image": 5}, 400, "bad_image"),
    ({"image": "===="}, 400, "bad_image"),
    ({"text": "x", "modality": None, "indice_name": ["a"]}, 400, "bad_field"),
])
def test_bad_bodies(body, status, kind):
    with pytest.raises(RequestError) as refused:
        parse_knn(body, LIMITS)
    assert (refused.value.status, refused.value.kind) == (status, kind)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"{", b"[" * 100_000 + b"]" * 100_000])
def test_bodies_that_are_not_json(body):
    with pytest.raises(RequestError) as refused:
        parse_json(body)
    assert (refused.value.status, refused.value.kind) == (400, "bad_json")


class Recorder:
    """An embedding function for the batcher: row i of a batch is [batch number, the item]."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, kind: str, items: list) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        if self.fail_on in items:
            raise RuntimeError("this batch fails")
        return np.array([[len(self.batches), item] for item in items], dtype=np.float32)


def run_batcher(recorder, submit_all, max_batch=4, max_wait=0.05, direct=False):
    async def main():
        with ThreadPoolExecutor(1, thread_name_prefix="model") as executor:
            sizes = []
            batcher = (Direct(recorder, executor, sizes.append) if direct else
                       MicroBatcher(recorder, executor, sizes.append, max_batch, max_wait))
            batcher.start()
            try:
                return await submit_all(batcher), sizes
            finally:
                await batcher.stop()
    return asyncio.run(main())


def test_concurrent_queries_fill_batches_up_to_the_maximum():
    recorder = Recorder()

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit("text", i) for i in range(10)))

    vectors, sizes = run_batcher(recorder, submit_all)
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and sizes == [4, 4, 2]
    assert [int(v[1]) for v in vectors] == list(range(10))  # each query gets its own row back
    assert recorder.threads == {"model_0"}


def test_texts_and_images_of_a_batch_are_embedded_apart():
    recorder = Recorder()

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit("text" if i % 2 else "image", i) for i in range(6)))

    vectors, _ = run_batcher(recorder, submit_all, max_batch=8)
    assert recorder.batches == [[1, 3, 5], [0, 2, 4]]
    assert [int(v[1]) for v in vectors] == list(range(6))


def test_a_failing_batch_fails_its_queries_only_and_timed_out_ones_are_skipped():
    recorder = Recorder(fail_on=2)

    async def submit_all(batcher):
        first = await asyncio.gather(*(batcher.submit("text", i) for i in range(4)), return_exceptions=True)
        late = asyncio.ensure_future(batcher.submit("text", 99))
        late.cancel()  # a request that timed out before its batch ran
        second = await asyncio.gather(batcher.submit("text", 7), late, return_exceptions=True)
        return first, second

    (first, second), _ = run_batcher(recorder, submit_all, max_batch=2)
    assert isinstance(first[2], RuntimeError) and isinstance(first[3], RuntimeError)
    assert [int(first[0][1]), int(first[1][1])] == [0, 1]
    assert int(second[0][1]) == 7 and isinstance(second[1], asyncio.CancelledError)
    assert [99] not in recorder.batches and all(99 not in b for b in recorder.batches)


def test_a_lone_query_waits_at_most_max_wait_and_direct_never_batches():
    recorder = Recorder()

    async def submit_one(batcher):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit("text", 1)
        return loop.time() - started

    waited, sizes = run_batcher(recorder, submit_one, max_wait=0.05)
    assert sizes == [1] and 0.04 <= waited < 2.0

    recorder = Recorder()

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit("text", i) for i in range(5)))

    _, sizes = run_batcher(recorder, submit_all, direct=True)
    assert sizes == [1] * 5 and recorder.batches == [[i] for i in range(5)]


def test_batch_shapes_fill_the_gap_above_8():
    from koclip.serve.app import batch_shapes

    assert batch_shapes(4) == [1, 2, 4]
    assert batch_shapes(16) == [1, 2, 4, 8, 12, 16]  # a batch of 9 runs at 12, not 16
    assert batch_shapes(10) == [1, 2, 4, 8, 10]
    assert batch_shapes(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def test_entries_of_other_keys_are_grouped_by_key_in_arrival_order():
    recorder = Recorder()
    keys = [("index-a", 10), ("index-b", 10), ("index-a", 10), ("index-a", 20), ("index-b", 10)]

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit(key, i) for i, key in enumerate(keys)))

    vectors, sizes = run_batcher(recorder, submit_all, max_batch=8)
    assert recorder.batches == [[0, 2], [1, 4], [3]] and sizes == [2, 2, 1]
    assert [int(v[1]) for v in vectors] == list(range(5))
