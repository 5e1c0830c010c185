"""The query service: clip-retrieval's HTTP API (`/knn-service`, `/metadata`, `/indices-list`)
over koclip indexes, with micro-batching, hot swapping of published versions, limits and metrics.

    python -m koclip.serve --index NAME=DIR [--index NAME=CAPTION_DIR ...] --model DIR [--port 1234]

Modules: `cli` (the command), `app` (the Starlette app and its handlers), `service` (model,
indexes, swapping; no HTTP), `batcher` (micro-batching), `protocol` (request bodies), `metrics`
(Prometheus), `sample` (a random model and indexes to try it with). Starlette, uvicorn and
prometheus-client come with the `serve` extra; nothing outside this package imports them.
docs/serve.md is the guide.
"""
