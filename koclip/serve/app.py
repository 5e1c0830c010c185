"""The ASGI app (Starlette): clip-retrieval's routes over a `Service`, with limits, micro-batching,
hot swapping and metrics.

    POST /knn-service   clip_back's query: text | image (base64) | image_url | embedding_input
    POST /metadata      {"ids": [...], "indice_name": ...} -> [{"id", "metadata": {...}}]
    GET  /indices-list  the index names
    GET  /healthz       the process answers
    GET  /readyz        200 once the model is warmed up and every index loaded, else 503
    GET  /metrics       Prometheus text format

Threads: the model runs on one thread (one model per process, jitted once per shape), index
searches on another, image decoding and URL fetching on a small pool; the event loop only
parses, waits and answers. Every error is JSON {"error": kind, "message": ...}: 4xx for the
request's fault, 404 for an unknown index or route, 503 before ready and on a timeout, and 500
only for a bug (logged with its traceback).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from koclip.errors import ImageDecodeError
from koclip.processing import open_image
from koclip.serve.batcher import Direct, MicroBatcher
from koclip.serve.metrics import Metrics
from koclip.serve.protocol import Limits, RequestError, parse_json, parse_knn, parse_metadata
from koclip.serve.service import Service

log = logging.getLogger("koclip.serve")


@dataclass(frozen=True)
class Settings:
    batching: bool = True
    max_batch: int = 16  # the largest of the encoders' fixed batch shapes (batch_shapes)
    batch_wait: float = 0.0  # seconds a batch waits for more queries (0: what queued while the last ran)
    request_timeout: float = 30.0
    poll_seconds: float = 5.0  # how often CURRENT is read for a new version; 0: never
    allow_image_url: bool = False
    max_pixels: int | None = None  # None: the model's preprocessor's (the pipeline's bomb limit)
    limits: Limits = field(default_factory=Limits)


def batch_shapes(max_batch: int) -> list[int]:
    """The encoders' batch shapes: powers of 2, and 1.5 x powers of 2 from 12 on, up to max_batch,
    and max_batch (1, 2, 4, 8, 12, 16 for 16).

    Under steady load the batches alternate around half of max_batch (one gathers while the other
    runs); with powers of 4 a batch of 5 ran at shape 16 and cost a full one. An encoder call costs
    about its shape from 4 rows on, and with 16 clients half the batches held 9 to 16 queries: at
    shape 16, a batch of 9 paid for 7 empty rows; 12 halves that."""
    shapes, size = set(), 1
    while size < max_batch:
        shapes.add(size)
        if size >= 8 and size * 3 // 2 < max_batch:
            shapes.add(size * 3 // 2)
        size *= 2
    return sorted(shapes | {max_batch})


def single_threaded_search() -> None:
    """One OpenMP thread for the FAISS searches of the thread that calls it (OpenMP's thread count
    is per thread). A request searches one vector, which gains nothing from more, and OpenMP's
    idle threads spin after each search on the cores the encoder needs."""
    import faiss

    faiss.omp_set_num_threads(1)


BLAS_FROM = 4  # queries per FAISS call from which exhaustive distances are one matrix product


@contextlib.contextmanager
def matrix_product_search(queries: int):
    """FAISS computes exhaustive (flat, and IVF's coarse) distances query by query (one pass over
    the vectors each) by default, or as one BLAS matrix product over all the queries when told to:
    one pass over memory for them all. On a 20,000 x 128 flat index with one thread (faiss 1.15),
    query by query costs 0.4 ms a query (2.9 ms for 8); one product 1.0 ms for 1, 1.3 ms for 8 and
    1.8 ms for 16. So a batch of BLAS_FROM or more is searched as one product. The setting is the
    process's; only the index thread searches."""
    import faiss

    if queries < BLAS_FROM:
        yield
        return
    default = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = default


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.kind, "message": error.message}, status_code=error.status)


class Server:
    """The app's state and handlers."""

    def __init__(self, service: Service, settings: Settings):
        self.service, self.settings = service, settings
        self.model = service.model
        # One compiled encoder per batch shape; a batch runs at the smallest shape that holds it,
        # so a lone query is not padded to a full batch. They share the checkpoint.
        from koclip.query.api import QueryModel

        self.models = {size: self.model if size == self.model.batch_size else QueryModel(self.model.checkpoint, size)
                       for size in (batch_shapes(settings.max_batch) if settings.batching else [1])}
        self.max_pixels = settings.max_pixels or self.model.preprocessor.max_pixels
        self.metrics = Metrics()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="koclip-model")
        self.index_thread = ThreadPoolExecutor(1, thread_name_prefix="koclip-index", initializer=single_threaded_search)
        self.reload_thread = ThreadPoolExecutor(1, thread_name_prefix="koclip-reload")
        self.work_threads = ThreadPoolExecutor(4, thread_name_prefix="koclip-decode")
        on_batch = self.metrics.batch_size.observe
        if settings.batching:
            self.embedder = MicroBatcher(self.embed, self.model_thread, on_batch, settings.max_batch, settings.batch_wait)
            # the searches of the queries an encoder call answered together are one FAISS call
            # (no wait: what queued while the last search ran)
            self.searcher = MicroBatcher(self.search, self.index_thread, self.metrics.search_batch_size.observe,
                                         settings.max_batch, 0.0)
        else:
            self.embedder = Direct(self.embed, self.model_thread, on_batch)
            self.searcher = None
        self.ready = False
        self._tasks: list[asyncio.Task] = []
        for served in service.served():
            self.metrics.set_index(served)

    # ------------------------------------------------------------ work off the event loop

    def embed(self, kind: str, items: list) -> np.ndarray:
        model = self.models[min(size for size in self.models if size >= len(items))]
        if kind == "text":
            return model.embed_texts(items)
        return np.asarray(model.encoders.images(np.stack(items)), dtype=np.float32)

    def search(self, key: tuple, items: list) -> list[list[dict]]:
        """The answers of queries with the same key (index version, num_result_ids, dedup,
        min_similarity): items are (served, vector, num_images)."""
        served, (_, num_result_ids, dedup, min_similarity) = items[0][0], key
        with matrix_product_search(len(items)):
            return self.service.knn_batch(served, np.stack([item[1] for item in items]),
                                          [item[2] for item in items], num_result_ids, dedup, min_similarity)

    def warm_up(self) -> None:
        for model in self.models.values():
            model.encoders.warmup()

    def compiles(self) -> dict:
        total: dict = {}
        for model in self.models.values():
            for tower, count in model.encoders.compiles().items():
                total[tower] = total.get(tower, 0) + count
        return total

    def pixels(self, data: bytes) -> np.ndarray:
        try:
            image = open_image(data, self.max_pixels)
        except ImageDecodeError as e:
            if e.reason == "too_many_pixels":
                raise RequestError(413, "too_many_pixels", f"image: {e.message}") from None
            raise RequestError(400, "bad_image", f"image: {e.reason}: {e.message}") from None
        return self.model.preprocessor.preprocess(image)

    def fetch(self, url: str) -> bytes:
        limit = self.settings.limits.max_body_bytes
        request = urllib.request.Request(url, headers={"User-Agent": "koclip-serve"})
        try:
            # the request timeout answers first (503 timeout); this one only ends the stuck thread
            with urllib.request.urlopen(request, timeout=self.settings.request_timeout + 5) as answer:
                data = answer.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RequestError(400, "image_url_failed", f"image_url could not be fetched: {e}") from None
        if len(data) > limit:
            raise RequestError(413, "too_large", f"image_url gave more than {limit} bytes")
        return data

    async def run(self, executor: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # ------------------------------------------------------------ lifespan

    async def start(self) -> None:
        self.embedder.start()
        if self.searcher is not None:
            self.searcher.start()
        self._tasks.append(asyncio.create_task(self._warm_up(), name="koclip-warm-up"))
        if self.settings.poll_seconds > 0:
            self._tasks.append(asyncio.create_task(self._poll(), name="koclip-poll-current"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.embedder.stop()
        if self.searcher is not None:
            await self.searcher.stop()
        for executor in (self.model_thread, self.index_thread, self.reload_thread, self.work_threads):
            executor.shutdown(wait=False, cancel_futures=True)

    async def _warm_up(self) -> None:
        await self.run(self.model_thread, self.warm_up)  # every batch shape compiled
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: model %s, indexes %s", self.model.fingerprint,
                 ", ".join(f"{s.name}/{s.modality}@{s.version}" for s in self.service.served()))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                swapped = await self.run(self.reload_thread, self.service.reload_changed)
            except Exception:  # a bug in reloading must not stop the polling or the serving
                log.exception("checking for new index versions failed")
                continue
            for old, new in swapped:
                self.metrics.set_index(new, old)
            self.metrics.reload_failures.set(self.service.reload_failures)

    # ------------------------------------------------------------ requests

    async def body(self, request: Request) -> bytes:
        """The body, at most max_body_bytes; a larger one is read to its end (bounded by the request
        timeout) and refused, so the client gets the 413 rather than a reset connection."""
        limit = self.settings.limits.max_body_bytes
        data, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                data += chunk
        if size > limit:
            raise RequestError(413, "too_large", f"the request body is {size} bytes; the limit is {limit}")
        return bytes(data)

    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, "not_ready", "the model is still warming up; see GET /readyz")

    async def knn(self, request: Request):
        self.require_ready()
        query = parse_knn(parse_json(await self.body(request)), self.settings.limits)
        served = self.service.get(query.indice_name, query.modality)  # the version this request uses
        if query.query_kind == "vector":
            vector = self.service.check_vector(query.query)
        elif query.query_kind == "text":
            vector = await self.embedder.submit("text", query.query)
        else:
            if query.query_kind == "image_url":
                if not self.settings.allow_image_url:
                    raise RequestError(422, "image_url_disabled", "this service does not fetch image_url (start it "
                                                                  "with --allow-image-url); send the image as base64")
                data = await self.run(self.work_threads, self.fetch, query.query)
            else:
                data = query.query
            pixels = await self.run(self.work_threads, self.pixels, data)
            vector = await self.embedder.submit("image", pixels)
        if self.searcher is not None:  # one search call for the queries that queued together
            # id(served): the version this request holds (alive while it waits, so its id is its own)
            key = (id(served), query.num_result_ids, query.dedup, query.min_similarity)
            return await self.searcher.submit(key, (served, vector, query.num_images))
        return await self.run(self.index_thread, self.service.knn, served, vector, query.num_images,
                              query.num_result_ids, query.dedup, query.min_similarity)

    async def metadata(self, request: Request):
        ids, name = parse_metadata(parse_json(await self.body(request)))
        entries = self.service.of_name(name)
        return await self.run(self.index_thread, self.service.metadata, entries, ids)

    async def indices_list(self, request: Request):
        return list(self.service.names)

    async def healthz(self, request: Request):
        return {"status": "ok"}

    async def readyz(self, request: Request):
        info = {"ready": self.ready, "model": self.model.fingerprint, "batching": self.settings.batching,
                "batch_shapes": sorted(self.models),
                "indexes": [{"name": s.name, "modality": s.modality, "version": s.version, "rows": len(s.index)}
                            for s in self.service.served()]}
        return JSONResponse(info, status_code=200 if self.ready else 503)

    async def metrics_text(self, request: Request):
        self.metrics.set_compiles(self.compiles())
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    def endpoint(self, name: str, handler, timed: bool = True):
        """handler wrapped: the request timeout, errors as JSON, and the request metrics."""
        async def route(request: Request) -> Response:
            started = time.perf_counter()
            try:
                work = handler(request)
                result = await (asyncio.wait_for(work, self.settings.request_timeout) if timed else work)
                response = result if isinstance(result, Response) else JSONResponse(result)
                kind = None
            except RequestError as e:
                response, kind = error_response(e), e.kind
            except asyncio.TimeoutError:
                kind = "timeout"
                response = error_response(RequestError(503, kind, "not answered within the request timeout "
                                                                  f"({self.settings.request_timeout:g}s)"))
            except Exception:
                log.exception("%s failed", name)
                kind = "internal"
                response = error_response(RequestError(500, kind, "the server failed on this request (a bug; its "
                                                                  "traceback is in the server's log)"))
            if kind is not None:
                self.metrics.errors.labels(kind).inc()
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
            return response
        return route


def create_app(service: Service, settings: Settings | None = None) -> Starlette:
    server = Server(service, settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "no_such_route", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        server.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": kind, "message": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    routes = [
        Route("/knn-service", server.endpoint("knn-service", server.knn), methods=["POST"]),
        Route("/metadata", server.endpoint("metadata", server.metadata), methods=["POST"]),
        Route("/indices-list", server.endpoint("indices-list", server.indices_list), methods=["GET"]),
        Route("/healthz", server.endpoint("healthz", server.healthz, timed=False), methods=["GET"]),
        Route("/readyz", server.endpoint("readyz", server.readyz, timed=False), methods=["GET"]),
        Route("/metrics", server.endpoint("metrics", server.metrics_text, timed=False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app

