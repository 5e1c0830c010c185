"""A small Python client of a running `python -m koclip.serve` (standard library HTTP only).

    from koclip.client import ServiceClient
    client = ServiceClient("http://127.0.0.1:1234", index="emoji-ko")
    client.search("소파 위에 고양이", k=10)        # -> [Hit(rank, score, id, uri, captions, item_id), ...]
    client.search(pathlib.Path("cat.jpg"))       # an image (a Path, bytes or a PIL image)
    client.search(vector, min_similarity=0.3)    # every hit above a score (numpy vector or list)
    client.metadata(["item0001"]); client.indices(); client.ready()

The hits are koclip.query's `Hit`s, so code written against `koclip.query.search` works with a
service too. A refused request raises `ServiceError` (a KoclipError) with the service's status,
error kind and message; an unreachable service raises it with status 0.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from koclip.errors import KoclipError
from koclip.query.api import Hit


class ServiceError(KoclipError):
    """The service refused a request (`status` 4xx/5xx, `kind` its error field) or could not be reached (status 0)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"{kind} ({status}): {message}" if status else message)
        self.status, self.kind = status, kind


class ServiceClient:
    def __init__(self, url: str, index: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.index = index
        self.timeout = timeout

    # ------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())
                kind, message = error["error"], error["message"]
            except (ValueError, KeyError, TypeError):
                kind, message = f"http_{e.code}", e.reason
            raise ServiceError(e.code, kind, message) from None
        except (urllib.error.URLError, OSError) as e:
            raise ServiceError(0, "unreachable", f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None

    # ------------------------------------------------------------ the API

    def search(self, query=None, *, k: int = 10, modality: str = "image", min_similarity: float | None = None,
               dedup: float | bool | None = None, num_result_ids: int | None = None) -> list[Hit]:
        """The k nearest items to a text (str), an image (pathlib.Path, bytes, PIL image) or a
        vector (numpy array or list), best first. modality "text" searches the caption index."""
        body = {"indice_name": self.index, "modality": modality, "num_images": k,
                "num_result_ids": num_result_ids or k, "deduplicate": dedup or False,
                "min_similarity": min_similarity, **_query_field(query)}
        return [Hit(rank, float(h["similarity"]), str(h["id"]), str(h["url"]), list(h.get("captions") or
                    ([h["caption"]] if h.get("caption") else [])), str(h.get("item_id") or h["id"]))
                for rank, h in enumerate(self._call("POST", "/knn-service", body), start=1)]

    def metadata(self, ids: list) -> dict:
        """{id: {"url", "caption", "captions", "item_id"} or None} for the ids asked."""
        answer = self._call("POST", "/metadata", {"ids": list(ids), "indice_name": self.index})
        return {entry["id"]: entry["metadata"] for entry in answer}

    def indices(self) -> list[str]:
        return self._call("GET", "/indices-list")

    def ready(self) -> dict:
        """/readyz: {"ready", "model", "batching", "indexes": [...]}; ServiceError 503 while warming up."""
        return self._call("GET", "/readyz")

    def healthy(self) -> bool:
        try:
            return self._call("GET", "/healthz").get("status") == "ok"
        except ServiceError:
            return False


def _query_field(query) -> dict:
    if isinstance(query, str):
        return {"text": query}
    if isinstance(query, (pathlib.PurePath, os.PathLike)):
        return {"image": base64.b64encode(pathlib.Path(query).read_bytes()).decode()}
    if isinstance(query, (bytes, bytearray, memoryview)):
        return {"image": base64.b64encode(bytes(query)).decode()}
    if isinstance(query, Image.Image):
        buffer = io.BytesIO()
        query.convert("RGB").save(buffer, format="PNG")
        return {"image": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(query, (np.ndarray, list, tuple)):
        vector = np.asarray(query, dtype=np.float64).reshape(-1)
        return {"embedding_input": vector.tolist()}
    raise TypeError(f"a query is a str (text), a pathlib.Path, bytes or PIL image (image) or a vector, "
                    f"not {type(query).__name__}")
