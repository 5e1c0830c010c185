"""The request bodies of the service, checked field by field: clip-retrieval's `/knn-service` and
`/metadata` (the fields clip_back reads and ClipClient sends) plus our `min_similarity`.

Every problem is a `RequestError` with the HTTP status and a short `kind` (the `error` field of
the JSON answer and the label of the errors metric). Nothing here touches the model or an index.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

from koclip.errors import KoclipError

DEDUP_THRESHOLD = 0.94  # clip_back's get_non_uniques threshold
MAX_TEXT_CHARS = 2000
MAX_METADATA_IDS = 10_000


class RequestError(KoclipError):
    """A request the service cannot answer as asked: `status` (4xx, or 503), `kind`, a message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def bad(kind: str, message: str) -> RequestError:
    return RequestError(400, kind, message)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    max_num_images: int = 1000
    max_num_result_ids: int = 10_000


@dataclass(frozen=True)
class KnnRequest:
    query_kind: str  # "text" | "image" | "image_url" | "vector"
    query: object  # the text, the image's bytes, the URL, or the vector (list of floats)
    modality: str  # "image" | "text": which index of that name (image or caption embeddings)
    indice_name: str | None
    num_images: int
    num_result_ids: int
    dedup: float | None  # the similarity threshold, or None for no deduplication
    min_similarity: float | None


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad("bad_json", f"the request body is not JSON ({e})") from None
    except RecursionError:  # "[[[[...": nested deeper than Python's parser goes
        raise bad("bad_json", "the request body is JSON nested too deeply") from None


def _object(payload) -> dict:
    if not isinstance(payload, dict):
        raise bad("bad_request", f"the request body must be a JSON object, not {type(payload).__name__}")
    return payload


def _given(value) -> bool:
    """clip_back treats null and "" as not given (ClipClient sends every key)."""
    return value is not None and value != ""


def _flag(payload: dict, name: str) -> bool:
    value = payload.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad("bad_field", f"{name} must be true or false, got {value!r}")
    return value


def _count(payload: dict, name: str, default: int, cap: int) -> int:
    value = payload.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad("bad_field", f"{name} must be a positive integer, got {value!r}")
    if value > cap:
        raise bad("too_many_results", f"{name} is {value}; this service answers at most {cap}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad("bad_field", f"{name} must be a finite number, got {value!r}")
    return float(value)


def _unsupported(payload: dict) -> None:
    """Filters and re-weightings we have no model for are refused, never silently skipped."""
    for name, what in (("use_safety_model", "safety (NSFW) model"), ("use_violence_detector", "violence detector"),
                       ("use_mclip", "multilingual CLIP (mclip) text encoder, only the served model's")):
        if _flag(payload, name):
            raise RequestError(422, "unsupported_filter",
                               f"{name} is true, but this service has no {what}; its results would not be "
                               f"filtered. Send {name}: false (ClipClient({name}=False))")
    score, weight = payload.get("aesthetic_score"), payload.get("aesthetic_weight")
    if _given(score) and _given(weight) and _number_or_text(weight, "aesthetic_weight") != 0:
        raise RequestError(422, "unsupported_filter",
                           "aesthetic_score with a non-zero aesthetic_weight asks for aesthetic re-weighting, and this "
                           "service has no aesthetic embeddings. Send aesthetic_weight: 0 (ClipClient(aesthetic_weight=0))"
                           " or aesthetic_score: null")


def _number_or_text(value, name: str) -> float:
    """clip_back reads aesthetic_weight with float(), so "0.5" is accepted as 0.5."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad("bad_field", f"{name} must be a number, got {value!r}") from None
    return _number(value, name)


def _image_bytes(text) -> bytes:
    if not isinstance(text, str):
        raise bad("bad_image", f"image must be a base64 string, not {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad("bad_image", "image is not valid base64") from None


def _vector(value) -> list[float]:
    if not isinstance(value, list) or not value:
        raise bad("bad_embedding", "embedding_input must be a non-empty list of numbers")
    return [_number(x, "every embedding_input value") for x in value]


def parse_knn(payload, limits: Limits) -> KnnRequest:
    """A /knn-service body as a KnnRequest; RequestError for anything wrong with it."""
    payload = _object(payload)
    _unsupported(payload)
    given = [name for name in ("text", "image", "image_url", "embedding_input") if _given(payload.get(name))]
    if not given:
        raise bad("no_query", "give one of text, image (base64), image_url or embedding_input")
    if len(given) > 1:
        raise bad("several_queries", f"give only one of text, image, image_url and embedding_input, got {', '.join(given)}")
    field = given[0]
    value = payload[field]
    if field == "text":
        if not isinstance(value, str) or not value.strip():
            raise bad("bad_text", "text must be a non-empty string")
        if len(value) > MAX_TEXT_CHARS:
            raise bad("bad_text", f"text is {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
        kind, query = "text", value
    elif field == "image":
        kind, query = "image", _image_bytes(value)
        if not query:
            raise bad("bad_image", "image decodes to zero bytes")
    elif field == "image_url":
        if not isinstance(value, str) or not value.lower().startswith(("http://", "https://")):
            raise bad("bad_image_url", "image_url must be an http:// or https:// URL")
        kind, query = "image_url", value
    else:
        kind, query = "vector", _vector(value)

    modality = payload.get("modality", "image")
    modality = "image" if modality is None else modality
    if modality not in ("image", "text"):
        raise bad("bad_field", f"modality must be \"image\" or \"text\", got {modality!r}")
    name = payload.get("indice_name")
    if name is not None and not isinstance(name, str):
        raise bad("bad_field", f"indice_name must be a string, got {name!r}")
    num_images = _count(payload, "num_images", 40, limits.max_num_images)
    num_result_ids = _count(payload, "num_result_ids", num_images, limits.max_num_result_ids)

    dedup = payload.get("deduplicate", False)
    if dedup is None or dedup is False:
        dedup = None
    elif dedup is True:
        dedup = DEDUP_THRESHOLD
    else:  # our extension: the threshold itself
        dedup = _number(dedup, "deduplicate (true, false or a similarity threshold)")
    min_similarity = payload.get("min_similarity")
    if min_similarity is not None:
        min_similarity = _number(min_similarity, "min_similarity")
    return KnnRequest(kind, query, modality, name, num_images, num_result_ids, dedup, min_similarity)


def parse_metadata(payload) -> tuple[list, str | None]:
    """A /metadata body: (ids, indice_name)."""
    payload = _object(payload)
    ids = payload.get("ids")
    if not isinstance(ids, list):
        raise bad("bad_field", "ids must be a list of ids")
    if len(ids) > MAX_METADATA_IDS:
        raise bad("too_many_results", f"{len(ids)} ids; this service answers at most {MAX_METADATA_IDS} at once")
    if any(isinstance(i, bool) or not isinstance(i, (str, int)) for i in ids):
        raise bad("bad_field", "every id must be a string (or an integer row number)")
    name = payload.get("indice_name")
    if name is not None and not isinstance(name, str):
        raise bad("bad_field", f"indice_name must be a string, got {name!r}")
    return ids, name
