"""What the evaluation job and its query report share: their error, and embedding a split's
images (the decodable ones embedded in fixed-size batches, the rest skipped with a reason)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from koclip.errors import KoclipError

log = logging.getLogger("jobs.evaluate")


class EvaluationError(KoclipError):
    """Inputs that cannot be evaluated (an empty split, no decodable image, a bad template)."""


def embed_images(records, preprocess, encode: Callable, batch_size: int, progress: bool):
    """Embeddings of the decodable images, their positions in `records`, and the skipped ones."""
    from tqdm import tqdm

    from koclip.processing import ImageDecodeError

    kept: list[int] = []
    skipped: list[dict] = []
    outputs: list[np.ndarray] = []
    pixels: list[np.ndarray] = []

    def flush():
        if pixels:
            outputs.append(np.asarray(encode(np.stack(pixels)), dtype=np.float32))
            pixels.clear()

    for position, record in enumerate(tqdm(records, desc="images", unit="img", disable=not progress)):
        try:
            pixels.append(preprocess(record.uri))
        except ImageDecodeError as e:
            skipped.append({"id": record.id, "image": record.uri, "reason": e.reason, "message": e.message})
        except Exception as e:  # bad input is never fatal: any other failure is its own reason
            skipped.append({"id": record.id, "image": record.uri, "reason": "preprocess_failed",
                            "message": f"{type(e).__name__}: {e}"})
        else:
            kept.append(position)
            if len(pixels) == batch_size:
                flush()
            continue
        log.warning("skipped image %s (%s): %s", record.id, skipped[-1]["reason"], skipped[-1]["message"])
    flush()
    embeddings = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    return embeddings, kept, skipped
