"""FAISS indexes over an embedding store: choose, build, tune, publish, load, extend.

    build_index(embeddings, out, column="image_embedding", kind="auto", max_memory="4GB",
                target_recall=0.95, keep=3) -> BuildResult     # a new version, published
    extend_index(out, add=STORE, remove=["item-id", ...]) -> BuildResult
    load_index(out, expect_fingerprint=None) -> Index            # .search(vectors, k), .records(rows)
    candidates(n, dim, max_memory, kind="auto") -> [Plan]         # what build_index tries, in order
    choose_index(n, dim, max_memory, kind="auto") -> Plan         # the first of those

The modules, in the order they depend on each other:
    plan       which index fits N x D vectors in the memory budget (no files, no training)
    faiss_ops  new/trained indexes, adding rows under explicit ids, removing rows, copying
    tuning     recall@10 on held-out corpus rows; the cheapest search parameter reaching the target,
               and its single-query latency
    versions   the files of an index root: versions/<v>/, meta.json, CURRENT (the atomic publish)
    corpus     what a build indexes: a store's rows and vectors shard by shard; Corpus builds a plan
    load       load_index and the loaded Index (search, records)
    build      build_index and extend_index: read a koclip.store, try the candidates, publish the
               fastest reaching the target (or refuse)
pipelines.index_beam builds the same ivfpq index with its per-shard work on Beam workers, from
the public names below.
"""
from koclip.errors import IndexBuildError, IndexFolderError
from koclip.index.build import Attempt, BuildResult, build_index, extend_index, refusal, write_and_publish
from koclip.index.corpus import read_shard
from koclip.index.faiss_ops import add_truth, add_vectors, copy_index, in_memory, ivf_part, train
from koclip.index.load import Index, load_index, read_index_file, resolve
from koclip.index.plan import (DEFAULT_MAX_MEMORY, DEFAULT_QUERIES, DEFAULT_TARGET_RECALL, IVF_KINDS, KINDS,
                               RECALL_K, Plan, candidates, choose_index, estimate_memory, format_bytes, parse_memory,
                               plan_of)
from koclip.index.tuning import Tuning, query_rows, train_rows, tune
from koclip.index.versions import (ROWS_SCHEMA, current_version, list_versions, make_meta, new_version, publish,
                                   publish_written, removed_on_failure, write_meta)

resolve_version = resolve  # the version folder a path means (an index root: the one CURRENT names)

__all__ = ["Attempt", "BuildResult", "DEFAULT_MAX_MEMORY", "DEFAULT_QUERIES", "DEFAULT_TARGET_RECALL", "Index",
           "IndexBuildError", "IndexFolderError", "IVF_KINDS", "KINDS", "Plan", "RECALL_K", "ROWS_SCHEMA", "Tuning",
           "add_truth", "add_vectors", "build_index", "candidates", "choose_index", "copy_index", "current_version",
           "estimate_memory", "extend_index", "format_bytes", "in_memory", "ivf_part", "list_versions", "load_index",
           "make_meta", "new_version", "parse_memory", "plan_of", "publish", "publish_written", "query_rows",
           "read_index_file", "read_shard", "refusal", "removed_on_failure", "resolve", "resolve_version", "train",
           "train_rows", "tune", "write_and_publish", "write_meta"]
