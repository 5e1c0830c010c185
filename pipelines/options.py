"""Command-line options of the embedding pipeline, as a Beam `PipelineOptions` subclass.

Our flags come first in `--help`; every other Beam flag (--runner, --project, --region,
--temp_location, --setup_file, --machine_type, --dataflow_service_options, ...) passes through
to Beam. An unknown flag is refused with one line, rather than silently ignored as Beam does.
"""
from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from koclip.errors import UsageError
from koclip.processing import DEFAULT_MAX_PIXELS
from pipelines.transforms.decode import DEFAULT_MAX_BYTES

DESCRIPTION = """Embed images and their captions with a KoCLIP model into Parquet shards.

With no arguments: the emoji-ko sample (built on first use) with the demo model
(`python -m jobs.train`), into ~/.cache/koclip/embeddings/emoji-ko, on the local runner.
Rerunning continues where a crashed or killed run stopped: finished units are skipped."""

EPILOG = """Any Beam pipeline option is accepted too. Locally (no --runner): Beam's FnApiRunner,
multi-threaded, nothing downloaded. On Dataflow, e.g.:
  --runner=DataflowRunner --project=P --region=us-central1 --temp_location=gs://B/tmp
  --setup_file=./setup.py --machine_type=n1-standard-8
  --dataflow_service_options="worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
(see the README for the full recipe)."""


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", default=None,
                            help="a manifest (.jsonl/.csv/.parquet with id, image, captions) or a folder / "
                                 "glob of images with optional x.txt caption sidecars; local or gs:// "
                                 "(default: the emoji-ko sample)")
        parser.add_argument("--input-format", "--input_format", dest="input_format", default=None,
                            choices=("manifest", "images", "manifests", "webdataset", "parquet", "files"),
                            help="what --input is (default: told from the path; docs/inputs.md): one manifest, "
                                 "a folder/glob of images, of manifest shards, of WebDataset tars, of Parquet "
                                 "with image bytes, or img2dataset's files output")
        parser.add_argument("--id-column", "--id_column", dest="id_column", default=None, metavar="NAME",
                            help="the column (sidecar / Parquet) or .json field (tars) that holds the ids "
                                 "(default: img2dataset's key)")
        parser.add_argument("--caption-field", "--caption_field", dest="caption_field", default=None, metavar="NAME",
                            help="take captions from this .json field of a tar sample or Parquet column "
                                 "(default: the .txt member, or the caption / txt column)")
        parser.add_argument("--image-column", "--image_column", dest="image_column", default=None, metavar="NAME",
                            help="the Parquet column of image bytes or {bytes, path} structs "
                                 "(default: jpg, png, webp, image, ...)")
        parser.add_argument("--keep-columns", "--keep_columns", dest="keep_columns", default=None, metavar="A,B",
                            help="input columns (manifest keys, sidecar / Parquet columns, .json fields) kept "
                                 "into the shards as string columns")
        parser.add_argument("--output", default=None,
                            help="folder for the shards, dead letters and run state, local or gs:// "
                                 "(default: ~/.cache/koclip/embeddings/emoji-ko)")
        parser.add_argument("--model", default=None,
                            help="checkpoint folder, local or gs:// (default: the demo model from "
                                 "`python -m jobs.train`)")
        # Both spellings are registered (not only normalised, as koclip.cli does): Beam parses these
        # flags again itself, on the driver and on every worker.
        parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, metavar="N",
                            help="images per model call (fixed shape)")
        parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                            help="compute dtype of the encoders")
        parser.add_argument("--embedding-dtype", "--embedding_dtype", dest="embedding_dtype", choices=("float32", "float16"), default="float32",
                            help="storage dtype of the embeddings in Parquet")
        parser.add_argument("--unit-size", "--unit_size", dest="unit_size", type=int, default=1000, metavar="N",
                            help="items per work unit; each unit is one shard and one resume step")
        parser.add_argument("--max-pixels", "--max_pixels", dest="max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            metavar="N",
                            help="images with more pixels are dead-lettered (decompression bombs)")
        parser.add_argument("--max-bytes", "--max_bytes", dest="max_bytes", type=int, default=DEFAULT_MAX_BYTES,
                            metavar="N", help="images larger than N bytes are dead-lettered, read no further "
                                              f"(default {DEFAULT_MAX_BYTES // 1024**2} MiB)")
        parser.add_argument("--caption-root", "--caption_root", dest="caption_root", default=None, metavar="DIR",
                            help="caption_uri files must lie under DIR (default: the input's folder)")
        parser.add_argument("--compilation-cache", "--compilation_cache", dest="compilation_cache", default=None,
                            metavar="DIR",
                            help="folder for XLA's persistent compilation cache, so reruns skip compiling "
                                 "(default: ~/.cache/koclip/xla locally, none on remote runners; '' disables)")
        parser.add_argument("--overwrite", action="store_true",
                            help="delete this output's previous results and embed everything again")
        parser.add_argument("--strict", action="store_true",
                            help="refuse the run at the first manifest row that is not an item (not JSON, "
                                 "no id or image, a repeated id, ...), instead of writing it to "
                                 "_dead_letters/listing.jsonl and embedding the other rows")


def _all_option_classes(cls=PipelineOptions):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_option_classes(sub)


def _beam_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for cls in _all_option_classes():
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # the same flag registered by two classes
    return parser


def help_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.embed", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    EmbedOptions._add_argparse_args(parser)
    return parser


def parse(argv: list[str]) -> tuple[EmbedOptions, PipelineOptions]:
    """argv -> (our options, all pipeline options). Exits with --help; UsageError on bad flags."""
    ours = help_parser()
    ours.error = _raise_options_error  # argparse would print usage and exit(2) itself
    if "-h" in argv or "--help" in argv:
        help_parser().parse_args(["--help"])
    known, rest = ours.parse_known_args(argv)
    parser = _beam_parser()
    parser.error = _raise_options_error
    _, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} (see python -m pipelines.embed --help)")
    if known.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {known.batch_size}")
    if known.unit_size < 1:
        raise UsageError(f"--unit-size must be at least 1, got {known.unit_size}")
    options = PipelineOptions(argv)
    if not any(a == "--direct_num_workers" or a.startswith("--direct_num_workers=") for a in rest):
        # Beam's default is 1 worker thread, which leaves a core idle while one item decodes.
        options.view_as(DirectOptions).direct_num_workers = default_workers()
    return options.view_as(EmbedOptions), options


def _raise_options_error(message: str):
    raise UsageError(message.strip().replace("\n", " "))


def default_workers() -> int:
    """Local worker threads: one per core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
