"""`python -m koclip.serve`: serve indexes over clip-retrieval's HTTP API (docs/serve.md).

    python -m koclip.serve [--index NAME=DIR ...] [--model DIR] [--host 127.0.0.1] [--port 1234]

Without --index/--model: the emoji-ko demo index (as NAME emoji-ko) and the demo model under the
koclip cache. The model and every index are loaded before the port opens, so a wrong path or an
index of another model is one line and exit status 2; /readyz turns 200 once the encoders are
compiled for every batch shape.
"""
from __future__ import annotations

import argparse
import logging
import sys

from koclip.cli import ArgumentParser, run_cli
from koclip.data import demo_index_dir, demo_model_dir
from koclip.errors import MissingDependency, UsageError

DEFAULT_PORT = 1234  # clip_back's


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m koclip.serve",
                       description="Serve koclip indexes over clip-retrieval's HTTP API (POST /knn-service, "
                                   "POST /metadata, GET /indices-list) with /healthz, /readyz and /metrics.")
    p.add_argument("--index", metavar="NAME=DIR", action="append", default=None,
                   help="an index root (or version folder) served as NAME; give a NAME twice for its image and its "
                        f"caption index (default: emoji-ko={demo_index_dir()})")
    p.add_argument("--model", metavar="DIR", default=None,
                   help=f"the checkpoint that embedded the indexes (default: {demo_model_dir()})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}, as clip_back)")
    p.add_argument("--no-batching", action="store_true",
                   help="embed each query alone, at batch shape 1 (default: micro-batching)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="most queries per encoder call (and per index search); the encoders are compiled at batch "
                        "shapes 1, 2, 4, 8, 12, 16, 24, ... up to N, and a batch runs at the smallest that holds it "
                        "(default: 16)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, metavar="MS",
                   help="how long a batch waits for more queries (default: 0: a batch is what queued while the last "
                        "one ran)")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="a request not answered in S seconds gets 503 timeout (default: 30)")
    p.add_argument("--poll-seconds", type=float, default=5.0, metavar="S",
                   help="read each index root's CURRENT every S seconds and swap in a new version; 0: never (default: 5)")
    p.add_argument("--allow-image-url", action="store_true",
                   help="fetch image_url queries from the network (default: refused with 422)")
    p.add_argument("--max-body", default="16MB", metavar="SIZE",
                   help="largest request body, also the largest image_url download (default: 16MB)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest query image in pixels (default: the embedding pipeline's limit, 8192x8192)")
    p.add_argument("--max-num-images", type=int, default=1000, metavar="N", help="num_images cap (default: 1000)")
    p.add_argument("--max-result-ids", type=int, default=10_000, metavar="N",
                   help="num_result_ids cap: candidates searched before deduplication (default: 10000)")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache, so a restart does not recompile the encoders "
                        "(default: ~/.cache/koclip/xla, as pipelines.embed; '' disables)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def settings_from(args: argparse.Namespace):
    from koclip.index import parse_memory
    from koclip.serve.app import Settings
    from koclip.serve.protocol import Limits

    for name in ("max_batch", "max_num_images", "max_result_ids"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("batch_wait_ms", "poll_seconds"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.request_timeout <= 0:
        raise UsageError(f"--request-timeout must be positive, got {args.request_timeout}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UsageError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    limits = Limits(max_body_bytes=parse_memory(args.max_body), max_num_images=args.max_num_images,
                    max_num_result_ids=args.max_result_ids)
    return Settings(batching=not args.no_batching, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000,
                    request_timeout=args.request_timeout, poll_seconds=args.poll_seconds,
                    allow_image_url=args.allow_image_url, max_pixels=args.max_pixels, limits=limits)


def load_service(index_specs: list[str] | None, model_dir: str | None, batch_size: int):
    from koclip.query.api import load_model
    from koclip.serve.service import Service, parse_index_spec

    specs = [parse_index_spec(s) for s in index_specs] if index_specs else [("emoji-ko", demo_index_dir())]
    return Service(load_model(model_dir, batch_size=batch_size), specs)


def use_compilation_cache(folder: str | None) -> None:
    import os

    import jax

    from koclip.data import cache_dir

    folder = os.path.join(cache_dir(), "xla") if folder is None else folder
    if folder:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from koclip.serve.app import create_app
    except ImportError as e:
        raise MissingDependency(f"{e.name} is not installed; pip install 'koclip-index[serve]' "
                                "(starlette, uvicorn, prometheus-client)") from None
    settings = settings_from(args)
    use_compilation_cache(args.compilation_cache)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = load_service(args.index, args.model, settings.max_batch if settings.batching else 1)
    served = ", ".join(f"{s.name} ({s.modality}, {s.version}, {len(s.index)} rows)" for s in service.served())
    print(f"koclip.serve: serving {served} with model {service.model.fingerprint} on http://{args.host}:{args.port} "
          f"(batching {'on' if settings.batching else 'off'})", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(service, settings), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("koclip.serve", lambda: serve(args))
