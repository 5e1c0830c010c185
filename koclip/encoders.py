"""The two embedding functions everything downstream of a checkpoint uses: images and texts.

`checkpoint_encoders(ckpt)` wraps a checkpoint's towers in `BatchEncoder`s (fixed batch shape,
padded tail, sharded over local devices, recompiles counted); evaluation, the embedding
pipeline and the query library all embed through it, so they rank identically.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoders:
    """The two embedding functions evaluate() uses; both return L2-normalised float32 [B, D].

    images: preprocessed pixels float32 [B, S, S, 3] (B <= batch_size) -> embeddings
    texts:  list of strings (any length) -> embeddings, in order
    compiles: how many times the jitted functions were traced, by tower (for the report)
    warmup:   compiles every shape the encoders will see (the image batch, each text length
              bucket), so that a job's first batches do not pay for compilation
    """

    images: Callable[[np.ndarray], np.ndarray]
    texts: Callable[[list[str]], np.ndarray]
    compiles: Callable[[], dict] = field(default=lambda: {})
    warmup: Callable[[], None] = field(default=lambda: None)


def checkpoint_encoders(ckpt, batch_size: int = 32, dtype: str = "float32") -> Encoders:
    """Encoders from a checkpoint: BatchEncoder (fixed batch shape, sharded over local devices)
    for both towers; texts sorted by token length and padded to the config's length buckets."""
    from koclip.modeling.parallel import BatchEncoder, data_mesh, replicate
    from koclip.processing import iter_batches, tokenize

    model = ckpt.model(dtype)
    config = ckpt.config
    tokenizer = ckpt.encoding_tokenizer()
    params = replicate(model.cast_params(ckpt.params), data_mesh())  # one device copy for both encoders
    image_encoder = BatchEncoder(model.encode_image, params, batch_size)
    text_encoder = BatchEncoder(model.encode_text, params, batch_size)

    def encode_texts(texts: list[str]) -> np.ndarray:
        texts = list(texts)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=config.max_text_length)["input_ids"]]
        # Similar lengths together, so most batches fit a short bucket.
        order = np.argsort(lengths, kind="stable")
        batches = list(iter_batches(order, text_encoder.batch_size))
        outputs = []
        for batch in batches:
            ids, mask = tokenize(tokenizer, [texts[i] for i in batch], config.text_length_buckets,
                                 config.max_text_length)
            outputs.append(text_encoder(ids, mask))
        embedded = np.concatenate(outputs)
        result = np.empty_like(embedded)
        result[np.concatenate(batches)] = embedded
        return result

    def warmup() -> None:
        size = config.image_size
        image_encoder(np.zeros((1, size, size, 3), np.float32))
        for length in sorted(set(config.text_length_buckets)):
            if length <= config.max_text_length:
                text_encoder(np.zeros((1, length), np.int32), np.ones((1, length), np.int32))

    return Encoders(
        images=image_encoder,
        texts=encode_texts,
        compiles=lambda: {"image": image_encoder.compiles, "text": text_encoder.compiles},
        warmup=warmup,
    )
