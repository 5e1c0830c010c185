"""KoCLIP as a Beam `ModelHandler`: load_model / run_inference / batch_elements_kwargs.

RunInference keeps one loaded model per worker process (Beam's `shared.Shared`) and hands it
to every thread. `load_model` reads the checkpoint, builds the jitted encoders with a fixed
batch shape (a short last batch is padded) and compiles every shape up front: the image batch
and each text length bucket. After that, any further compile is a *recompile*, counted in the
`recompiles` metric; a healthy run reports 0.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from pipelines.transforms.decode import NAMESPACE, DeadLetter, Decoded, UnitRef


@dataclass
class Embedded:
    unit: UnitRef
    decoded: Decoded  # pixels dropped (set to None) once embedded
    image_embedding: np.ndarray  # float32 [D]
    caption_embeddings: np.ndarray  # float32 [len(captions), D]


class LoadedModel:
    def __init__(self, encoders, fingerprint: str):
        self.encoders = encoders
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._compiles_seen = self._total_compiles()
        self._load_reported = False

    def _total_compiles(self) -> int:
        return sum(self.encoders.compiles().values())

    def report_load_once(self) -> None:
        """Count this load and its warm-up compiles, once (setup runs outside any bundle's metrics)."""
        with self._lock:
            if self._load_reported:
                return
            self._load_reported = True
        Metrics.counter(NAMESPACE, "model_loads").inc()
        Metrics.counter(NAMESPACE, "warmup_compiles").inc(self._compiles_seen)

    def new_compiles(self) -> int:
        """Compiles since the last call (the first call counts from the end of warm-up)."""
        with self._lock:
            total = self._total_compiles()
            new, self._compiles_seen = total - self._compiles_seen, total
            return new


class KoclipModelHandler(ModelHandler[Decoded | DeadLetter, Embedded | DeadLetter, LoadedModel]):
    """Embeds the Decoded items of a batch; dead letters pass through untouched. A batch whose
    encoding raises is encoded again item by item (the same fixed batch shape, padded), so only the
    items that fail alone become dead letters (stage "embed", reason inference_failed); an item whose
    embeddings are not finite is a dead letter too (non_finite_embedding), never a row."""

    def __init__(self, model_path: str, batch_size: int = 32, dtype: str = "float32",
                 compilation_cache: str | None = None):
        self.model_path = model_path
        self.batch_size = batch_size
        self.dtype = dtype
        self.compilation_cache = compilation_cache

    def load_model(self) -> LoadedModel:
        import jax

        from koclip.checkpoint import load_checkpoint
        from koclip.encoders import checkpoint_encoders

        if self.compilation_cache:
            # XLA's persistent cache: a rerun (after a crash, or the next scheduled run) loads the
            # compiled encoders instead of compiling them again.
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

        ckpt = load_checkpoint(self.model_path)
        encoders = checkpoint_encoders(ckpt, batch_size=self.batch_size, dtype=self.dtype)
        encoders.warmup()
        return LoadedModel(encoders, ckpt.fingerprint)

    def run_inference(self, batch: Sequence[Decoded | DeadLetter], model: LoadedModel,
                      inference_args=None) -> list[Embedded | DeadLetter]:
        decoded = [d for d in batch if isinstance(d, Decoded)]
        passed = [d for d in batch if isinstance(d, DeadLetter)]
        model.report_load_once()
        if not decoded:
            return passed
        started = time.perf_counter()
        # min/max of the start times: when the first batch began, i.e. the end of start-up.
        Metrics.distribution(NAMESPACE, "batch_start_unix_ms").update(int(time.time() * 1000))
        try:
            embedded = self._embed(decoded, model)
        except Exception:  # one poison item must not take its 31 neighbours with it
            Metrics.counter(NAMESPACE, "batches_retried_item_by_item").inc()
            embedded = [self._embed_alone(d, model) for d in decoded]
        embedded = [self._finite_or_dead(e) for e in embedded]
        for reason in ("inference_failed", "non_finite_embedding"):
            count = sum(isinstance(e, DeadLetter) and e.reason == reason for e in embedded)
            if count:
                Metrics.counter(NAMESPACE, "dead_letters").inc(count)
                Metrics.counter(NAMESPACE, f"dead_letters_{reason}").inc(count)
        Metrics.distribution(NAMESPACE, "batch_latency_ms").update(int((time.perf_counter() - started) * 1000))
        rows = [e for e in embedded if isinstance(e, Embedded)]
        Metrics.counter(NAMESPACE, "items_embedded").inc(len(rows))
        Metrics.counter(NAMESPACE, "captions_embedded").inc(sum(len(e.decoded.captions) for e in rows))
        Metrics.counter(NAMESPACE, "batches").inc()
        recompiles = model.new_compiles()
        if recompiles:
            Metrics.counter(NAMESPACE, "recompiles").inc(recompiles)
        return passed + embedded

    def _embed_alone(self, decoded: Decoded, model: LoadedModel) -> Embedded | DeadLetter:
        try:
            return self._embed([decoded], model)[0]
        except Exception as e:
            # transient: an item that fails alone may be a poison item or a device fault; a later
            # run tries it again (jobs.reindex caps the attempts)
            return DeadLetter(decoded.unit, decoded.item.id, decoded.item.uri, "embed", "inference_failed",
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                              transient=True)

    @staticmethod
    def _finite_or_dead(embedded: Embedded | DeadLetter) -> Embedded | DeadLetter:
        if isinstance(embedded, DeadLetter):
            return embedded
        if np.isfinite(embedded.image_embedding).all() and np.isfinite(embedded.caption_embeddings).all():
            return embedded
        what = "image" if not np.isfinite(embedded.image_embedding).all() else "caption"
        d = embedded.decoded
        return DeadLetter(d.unit, d.item.id, d.item.uri, "embed", "non_finite_embedding",
                          f"the {what} embedding holds NaN or inf")

    @staticmethod
    def _embed(batch: list[Decoded], model: LoadedModel) -> list[Embedded]:
        images = model.encoders.images(np.stack([d.pixels for d in batch]))
        captions = [c for d in batch for c in d.captions]
        texts = model.encoders.texts(captions) if captions else np.zeros((0, images.shape[1]), np.float32)
        results, offset = [], 0
        for decoded, image in zip(batch, images):
            n = len(decoded.captions)
            decoded.pixels = None
            results.append(Embedded(decoded.unit, decoded, image, texts[offset:offset + n]))
            offset += n
        return results

    def batch_elements_kwargs(self) -> dict:
        # Exactly batch_size items per call (the encoders pad a bundle's short last batch).
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE
