"""Beam pipelines (the `pipeline` extra): embed and index. Nothing in koclip imports this package."""
import sys

try:
    import apache_beam  # noqa: F401
except ImportError as e:
    _HINT = "the pipelines need Apache Beam: pip install 'koclip-index[pipeline]' (or -e '.[pipeline]')"
    if "-m" in sys.orig_argv and sys.orig_argv[sys.orig_argv.index("-m") + 1].startswith("pipelines"):
        print(f"{sys.orig_argv[sys.orig_argv.index('-m') + 1]}: error: {_HINT}", file=sys.stderr)
        raise SystemExit(2) from None  # `python -m pipelines.X`: one line, no traceback
    from koclip.errors import MissingDependency

    raise MissingDependency(_HINT) from e
