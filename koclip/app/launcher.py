"""The demo web app: text→image search, image→text zero-shot labels and text→patch ranking.

    python -m koclip.app [--index DIR] [--model DIR] [--port 8501] [--host 127.0.0.1]
    python -m koclip.app --service http://127.0.0.1:1234 [--service-index NAME] [--model DIR]

starts a Streamlit server on http://HOST:PORT over an index that `python -m pipelines.index`
published and a checkpoint that `python -m jobs.train` wrote (defaults: the emoji-ko sample
index and the demo model under the koclip cache). Both are checked before the server starts: a
missing one is reported in one line and the command exits with status 2.

With --service, text-to-image search goes to a running `python -m koclip.serve` (its index
NAME, default its first) instead of an index loaded in the app; the pickers list that index's
items through the service's /metadata. The model is still loaded here, for the zero-shot and
patch tabs (the service answers searches only), and must be the service's (its fingerprint).

The page itself is `koclip/app/page.py`. The screenshots in docs/app.md are taken by the
browser tests' harness: `python tests/app_harness.py docs/screenshots`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from koclip import fs
from koclip.cli import ArgumentParser, run_cli
from koclip.data import demo_index_dir, demo_model_dir
from koclip.errors import MissingDependency, NotFoundError

PAGE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.py")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m koclip.app",
        description="Serve the KoCLIP demo (text→image, image→text, text→patch) with Streamlit.",
    )
    parser.add_argument("--index", metavar="DIR", default=None,
                        help=f"index folder from `python -m pipelines.index` (default: {demo_index_dir()})")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help=f"checkpoint folder from `python -m jobs.train` (default: {demo_model_dir()})")
    parser.add_argument("--service", metavar="URL", default=None,
                        help="search through a running `python -m koclip.serve` at URL instead of a local --index")
    parser.add_argument("--service-index", metavar="NAME", default=None,
                        help="the service's index to search (default: its first)")
    parser.add_argument("--port", metavar="N", type=int, default=8501, help="port to listen on (default: 8501)")
    parser.add_argument("--host", metavar="ADDR", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 serves other machines)")
    return parser


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    args.index = args.index or demo_index_dir()
    args.model = args.model or demo_model_dir()
    return args


def find_problem(index: str, model: str, service: str | None = None) -> str | None:
    """One line saying what is missing and which command makes it, or None when both look usable."""
    if not fs.is_dir(model) or not fs.exists(fs.join(model, "config.json")):
        return (f"no model at {model} (a checkpoint folder with config.json); "
                "train one with `python -m jobs.train` or pass --model DIR")
    if service:
        return service_problem(service)
    is_index = fs.exists(fs.join(index, "CURRENT")) or fs.exists(fs.join(index, "meta.json"))
    if not fs.is_dir(index) or not is_index:
        return (f"no index at {index} (an index root with CURRENT, or a version folder with meta.json); "
                "build one with `python -m pipelines.index` or pass --index DIR")
    return None


def service_problem(url: str) -> str | None:
    """None when the koclip.serve service at url answers /readyz with ready, else one line."""
    from koclip.client import ServiceClient, ServiceError

    try:
        ServiceClient(url, timeout=10).ready()
    except ServiceError as e:
        return f"the service at {url} is not ready ({e}); start it with `python -m koclip.serve` or fix --service"
    return None


def streamlit_argv(args: argparse.Namespace) -> list[str]:
    """`streamlit run` arguments for the page; what follows "--" reaches the page as sys.argv."""
    return [
        "run", PAGE_SCRIPT,
        "--server.port", str(args.port),
        "--server.address", args.host,
        "--server.headless", "true",  # print the URL instead of opening a browser
        "--server.fileWatcherType", "none",  # a served demo, not a development session
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
        "--",
        "--index", args.index,
        "--model", args.model,
    ] + (["--service", args.service] if args.service else []) + (
        ["--service-index", args.service_index] if args.service_index else [])


def main(argv: list[str] | None = None) -> int:
    args = resolve_paths(build_parser().parse_args(argv))
    return run_cli("koclip.app", lambda: serve(args))


def serve(args: argparse.Namespace) -> None:
    problem = find_problem(args.index, args.model, args.service)
    if problem:
        raise NotFoundError(problem)
    try:
        from streamlit.web import cli as streamlit_cli
    except ImportError:
        raise MissingDependency("streamlit is not installed; pip install -e '.[app]' (or 'koclip-index[app]')") from None
    # The page logs through "koclip.*" loggers (model and index loads, failed requests).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"koclip.app: serving {args.service or args.index} with model {args.model} on http://{args.host}:{args.port}",
          file=sys.stderr)
    streamlit_cli.main(args=streamlit_argv(args), prog_name="streamlit")  # serves until interrupted
