"""Query an index from Python or the shell: search, zero-shot classification, text-to-patch ranking.

  python -m koclip.query "빨간 사과" [--index DIR] [--model DIR] [-k 10] [--json]
  python -m koclip.query --image photo.jpg                   images most like a picture
  python -m koclip.query --classify photo.jpg --labels 사과,배,고양이 [--template "이것은 {} 이다."]
  python -m koclip.query --patches photo.jpg --text "빨간 사과" [--grid 3x3] [--mode tokens] [--out heat.png]

Without --index/--model the demo index (`python -m pipelines.index`) and the demo model
(`python -m jobs.train`) in ~/.cache/koclip are used. In Python:

  from koclip.query import search, classify, rank_patches
  search("소파 위에 고양이", k=10)          # -> [Hit(rank, score, id, uri, captions, item_id), ...]

A `str` query is always text; an image is a `pathlib.Path`, `bytes` or a `PIL.Image.Image`; a
numpy vector [D] (or [N, D]) is searched as it is, after L2 normalisation. A list is a batch and
gets a list of hit lists. Models and indexes given by path are loaded once per process and
reused (`cache_info()`, `clear_cache()`); queries are embedded through
koclip.encoders.checkpoint_encoders, the functions evaluation and the embedding pipeline use.
"""
from koclip.errors import FingerprintMismatch, QueryError, QueryImageError
from koclip.query.api import (DEFAULT_BATCH_SIZE, Hit, QueryModel, cache_info, check_compatible, classify,
                              clear_cache, embed_queries, load_index, load_model, rank_patches, search)
from koclip.query.prompts import DEFAULT_TEMPLATE, check_template

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_TEMPLATE", "FingerprintMismatch", "Hit", "QueryError", "QueryImageError",
           "QueryModel", "cache_info", "check_compatible", "check_template", "classify", "clear_cache",
           "embed_queries", "load_index", "load_model", "rank_patches", "search"]
