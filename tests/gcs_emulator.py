"""gcp-storage-emulator with GCS's generation preconditions added, for the tests of koclip.lock.

gcp-storage-emulator (checked on 2026.7.19) ignores `ifGenerationMatch` on uploads and deletes and
the `generation` of a read: a second create-only upload overwrites the first, and a delete guarded
by a stale generation deletes (tests/test_lock.py::test_the_stock_emulator_honours_preconditions, an xfail,
keeps checking that). Real GCS refuses both with 412 (or 404 for a generation that is gone):
https://cloud.google.com/storage/docs/request-preconditions

This runs the same emulator with those three checks put in front of its object handlers; all the
rest is the stock emulator's. Its HTTP server answers one request at a time, so a check and the
change it guards are one step, as on GCS. It is a test fixture, not a claim about the emulator:
koclip's gs:// lock is only as good as GCS's preconditions, which these checks stand in for.

    python tests/gcs_emulator.py --host 127.0.0.1 --port N --default-bucket B
"""
from __future__ import annotations

import argparse
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

GUARDED = (objects.insert, objects.delete, objects.get, objects.download)


def _first(query: dict, key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _object_name(request) -> str | None:
    name = (request.params or {}).get("object_id") or _first(request.query, "name")
    if name is None and _first(request.query, "uploadType") == "multipart":
        name = request.data["meta"].get("name")
    return name


def _live_generation(storage, bucket: str, name: str) -> str | None:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _refuse(response, status: HTTPStatus) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": status.phrase}})


def with_preconditions(handler):
    def guarded(request, response, storage, *args, **kwargs):
        wanted, pinned = _first(request.query, "ifGenerationMatch"), _first(request.query, "generation")
        soft_deleted = _first(request.query, "softDeleted") in ("1", "true", "yes")
        if (wanted is None and pinned is None) or soft_deleted or _first(request.query, "uploadType") == "resumable":
            return handler(request, response, storage, *args, **kwargs)
        live = _live_generation(storage, request.params["bucket_name"], _object_name(request))
        if pinned is not None and pinned != live:
            return _refuse(response, HTTPStatus.NOT_FOUND)  # that generation is not the live one
        if wanted is not None and (live or "0") != wanted:
            if live is None and handler is not objects.insert:
                return _refuse(response, HTTPStatus.NOT_FOUND)
            return _refuse(response, HTTPStatus.PRECONDITION_FAILED)
        return handler(request, response, storage, *args, **kwargs)

    return guarded


def install() -> None:
    """Put the checks in front of the emulator's object handlers (its routing table, in place)."""
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in GUARDED:
                methods[method] = with_preconditions(handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--default-bucket", required=True)
    args = parser.parse_args()
    install()
    server.create_server(args.host, args.port, in_memory=True, default_bucket=args.default_bucket).run()


if __name__ == "__main__":
    main()
