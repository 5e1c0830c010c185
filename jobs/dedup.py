"""`python -m jobs.dedup`: exact and near duplicates in an embedding store, as groups.

    python -m jobs.dedup --embeddings E --out D [--threshold 0.95] [--column image_embedding]
                         [--kept-manifest D/kept.jsonl] [--exact-max-rows 200000] [--nprobe 16]
                         [--distributed [Beam options]]

Two items are duplicates when
  - exact: their image bytes have the same stored `sha256`, or
  - near: the inner product of their embeddings (cosine: the store's vectors are unit length) is
    at least --threshold. With --column caption_embeddings an item's vector is the normalised
    mean of its captions' embeddings (items without captions take no part in near duplicates).
Near pairs come from range search: exact (faiss IndexFlatIP.range_search, every pair above the
threshold) up to --exact-max-rows items; above that from an IVF-Flat index (nlist 4*sqrt(N),
trained on a seeded sample, --nprobe lists searched per item; a pair whose two items fall in
lists the other never probes is missed: bench/dedup.py measures how many). Either way the
queries go shard by shard, so memory is the vectors once (4*N*D bytes) plus the pairs found,
never N x N. Duplicates are grouped by connected components of the pair graph (A~B and B~C put
A, B and C in one group, even when A and C are further apart than the threshold).

Outputs, in --out:
  groups.parquet   one row per item in a group of two or more: id, group (0, 1, ...; in store
                   order of the groups' first items), representative (the group's first item in
                   store order: the one kept), similarity (float32: its inner product with the
                   representative's vector; 1.0 for the representative), exact (bool: the same
                   sha256 as the representative);
  summary.json     the counts (items, groups, duplicate items, exact and near pairs, kept,
                   removed), threshold, method, seconds;
  kept manifest    with --kept-manifest PATH: a JSONL manifest (koclip.data.manifest) of every
                   item not removed (representatives and items without duplicates), with their
                   uris and captions: input for pipelines.embed or jobs.train.

--distributed runs the range searches as a Beam pipeline, one element per shard (on the
FnApiRunner here unless a --runner is given): the driver trains and fills the index and writes
it once to D/_work; each worker loads it and searches its shard's items.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from koclip import fs
from koclip.cli import ArgumentParser, run_cli
from koclip.errors import UsageError

log = logging.getLogger("jobs.dedup")

DEFAULT_THRESHOLD = 0.95
DEFAULT_EXACT_MAX_ROWS = 200_000
DEFAULT_NPROBE = 16
QUERY_BATCH = 4096
GROUPS_SCHEMA = pa.schema([("id", pa.string()), ("group", pa.int64()), ("representative", pa.string()),
                           ("similarity", pa.float32()), ("exact", pa.bool_())])


@dataclass
class Items:
    """The store's items in store order (shard by shard), and where each shard's items start."""
    ids: list[str]
    uris: list[str]
    captions: list[list[str]]
    sha256: list[str | None]
    shard_paths: list[str]
    shard_starts: list[int]


def read_items(store) -> Items:
    ids, uris, captions, sha, starts = [], [], [], [], []
    for shard in store.shards:
        with fs.open(shard.path) as f:
            table = pq.read_table(f, columns=["id", "uri", "captions", "sha256"])
        starts.append(len(ids))
        ids += table.column("id").to_pylist()
        uris += table.column("uri").to_pylist()
        captions += [c or [] for c in table.column("captions").to_pylist()]
        sha += table.column("sha256").to_pylist()
    return Items(ids, uris, captions, sha, [s.path for s in store.shards], starts)


def shard_vectors(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows within the shard that have a vector, their unit vectors float32 [n, D])."""
    from koclip.index import read_shard

    table, vectors = read_shard(path, column)
    if column == "image_embedding":
        return np.arange(len(vectors)), vectors
    with fs.open(path) as f:
        ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
    position = {item: i for i, item in enumerate(ids)}
    owner = np.array([position[i] for i in table.column("item_id").to_pylist()], dtype=np.int64)
    rows = np.unique(owner)
    sums = np.zeros((len(ids), vectors.shape[1]), np.float32)
    np.add.at(sums, owner, vectors)
    means = sums[rows]
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return rows, means


def exact_pairs(items: Items) -> np.ndarray:
    """int64 [P, 2] (first item, later item) of items with the same sha256, first in store order."""
    first: dict[str, int] = {}
    pairs = []
    for i, digest in enumerate(items.sha256):
        if digest:
            j = first.setdefault(digest, i)
            if j != i:
                pairs.append((j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def range_pairs(index: faiss.Index, queries: np.ndarray, rows: np.ndarray, threshold: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(pairs int64 [P, 2] (query item, found item) with query item < found item, scores float32 [P])
    of every indexed item within `threshold` of each query; `rows` are the queries' item numbers
    and the index's ids are item numbers."""
    pairs, scores = [], []
    for start in range(0, len(queries), QUERY_BATCH):
        batch = np.ascontiguousarray(queries[start:start + QUERY_BATCH])
        lims, dist, found = index.range_search(batch, float(threshold))
        query = np.repeat(rows[start:start + len(batch)], np.diff(lims.astype(np.int64)))
        keep = query < found  # each pair once, and not an item with itself
        pairs.append(np.stack([query[keep], found[keep]], axis=1))
        scores.append(dist[keep])
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    return np.concatenate(pairs).astype(np.int64), np.concatenate(scores).astype(np.float32)


def build_search_index(items: Items, column: str, dim: int, exact_max_rows: int, nprobe: int, seed: int
                       ) -> tuple[faiss.Index, str]:
    """The index the near-duplicate queries search (module docstring), filled with every item's
    vector under its item number, and the method's name."""
    from koclip.index.plan import ivf_nlist

    n = len(items.ids)
    if n <= exact_max_rows:
        index, method = faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "exact"
    else:
        nlist = ivf_nlist(n)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)  # an IndexIVFFlat
        sample = _training_sample(items, column, min(n, max(39 * nlist, 100_000)), seed)
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
        method = f"ivf (IVF{nlist},Flat, nprobe {index.nprobe})"
    for path, start in zip(items.shard_paths, items.shard_starts):
        rows, vectors = shard_vectors(path, column)
        index.add_with_ids(np.ascontiguousarray(vectors), (rows + start).astype(np.int64))
    return index, method


def _training_sample(items: Items, column: str, size: int, seed: int) -> np.ndarray:
    picked = np.sort(np.random.default_rng(seed).choice(len(items.ids), size, replace=False))
    parts = []
    for k, (path, start) in enumerate(zip(items.shard_paths, items.shard_starts)):
        end = items.shard_starts[k + 1] if k + 1 < len(items.shard_starts) else len(items.ids)
        rows, vectors = shard_vectors(path, column)
        want = np.isin(rows + start, picked[(picked >= start) & (picked < end)])
        parts.append(vectors[want])
    return np.ascontiguousarray(np.concatenate(parts))


def near_pairs(index: faiss.Index, items: Items, column: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's items searched against the index, one shard at a time."""
    found = [shard_pairs(index, path, start, column, threshold)
             for path, start in zip(items.shard_paths, items.shard_starts)]
    return _concat(found)


def shard_pairs(index: faiss.Index, path: str, start: int, column: str, threshold: float):
    rows, vectors = shard_vectors(path, column)
    return range_pairs(index, vectors, rows + start, threshold)


def _concat(found: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not found:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    return (np.concatenate([p for p, _ in found]).reshape(-1, 2).astype(np.int64),
            np.concatenate([s for _, s in found]).astype(np.float32))


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The connected component of each of n items (scipy.sparse.csgraph), numbered by first item."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


@dataclass
class DedupResult:
    groups: pa.Table
    summary: dict
    kept: np.ndarray  # bool per item, store order
    items: Items


def find_duplicates(store, threshold: float = DEFAULT_THRESHOLD, column: str = "image_embedding",
                    exact_max_rows: int = DEFAULT_EXACT_MAX_ROWS, nprobe: int = DEFAULT_NPROBE, seed: int = 0,
                    search=None) -> DedupResult:
    """Groups of duplicates in an opened koclip.store (module docstring). `search(index, items)`
    replaces the shard-by-shard near-pair search (the Beam one: run_distributed)."""
    started = time.perf_counter()
    items = read_items(store)
    n = len(items.ids)
    exact = exact_pairs(items)
    index, method = build_search_index(items, column, store.dim, exact_max_rows, nprobe, seed)
    near, _ = (search or (lambda ix, it: near_pairs(ix, it, column, threshold)))(index, items)
    labels = components(n, np.concatenate([exact, near]))
    sizes = np.bincount(labels, minlength=labels.max() + 1 if n else 0)
    in_group = sizes[labels] > 1
    members = np.flatnonzero(in_group)
    first_of = np.full(len(sizes), n, np.int64)
    np.minimum.at(first_of, labels, np.arange(n))
    representative = first_of[labels]
    group_numbers = np.unique(representative[members], return_inverse=True)[1] if len(members) else members
    similarity = member_similarity(index, members, representative[members])
    exact_match = np.array([items.sha256[i] is not None and items.sha256[i] != ""
                            and items.sha256[i] == items.sha256[r] for i, r in zip(members, representative[members])],
                           dtype=bool)
    groups = pa.table([pa.array([items.ids[i] for i in members], pa.string()),
                       pa.array(group_numbers, pa.int64()),
                       pa.array([items.ids[r] for r in representative[members]], pa.string()),
                       pa.array(similarity, pa.float32()), pa.array(exact_match, pa.bool_())], schema=GROUPS_SCHEMA)
    kept = ~in_group | (representative == np.arange(n))
    summary = {"items": n, "groups": int((sizes > 1).sum()), "items_in_groups": int(len(members)),
               "kept": int(kept.sum()), "removed": int(n - kept.sum()), "exact_pairs": int(len(exact)),
               "near_pairs": int(len(near)), "threshold": threshold, "column": column, "method": method,
               "store": store.root, "fingerprint": store.fingerprint,
               "seconds": round(time.perf_counter() - started, 2)}
    return DedupResult(groups, summary, kept, items)


def member_similarity(index: faiss.Index, members: np.ndarray, representatives: np.ndarray) -> np.ndarray:
    """Inner product of each member's vector with its representative's, from the index's own
    copies (1.0 for a representative; 0 when either has no vector, e.g. no captions)."""
    out = np.zeros(len(members), np.float32)
    if not len(members):
        return out
    have = _vectors_by_id(index, np.union1d(members, representatives))
    for k, (m, r) in enumerate(zip(members.tolist(), representatives.tolist())):
        if m in have and r in have:
            out[k] = float(have[m] @ have[r])
    return out


def _vectors_by_id(index: faiss.Index, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Vectors of the given item numbers as stored in the search index (flat: IndexIDMap2; IVF-Flat:
    the inverted lists' codes are the raw float32 vectors)."""
    from faiss.contrib.inspect_tools import get_invlist

    wanted, out = set(ids.tolist()), {}
    if isinstance(index, faiss.IndexIDMap2):
        for i in wanted:
            try:
                out[i] = index.reconstruct(int(i))
            except RuntimeError:  # no vector (an item without captions)
                pass
        return out
    for list_no in range(index.nlist):
        if index.invlists.list_size(list_no):
            list_ids, codes = get_invlist(index.invlists, list_no)
            hit = np.flatnonzero(np.isin(list_ids, ids))
            if len(hit):
                vectors = codes.view(np.float32).reshape(len(list_ids), index.d)
                out.update({int(list_ids[h]): vectors[h].copy() for h in hit})
    return out


def write_outputs(result: DedupResult, out: str, kept_manifest: str | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(result.groups, buffer, compression="zstd")
    fs.write_bytes(fs.join(out, "groups.parquet"), buffer.getvalue())
    if kept_manifest:
        from koclip.data.manifest import Item, dumps_manifest

        items = result.items
        kept = [Item(items.ids[i], items.uris[i], tuple(items.captions[i])) for i in np.flatnonzero(result.kept)]
        fs.write_bytes(kept_manifest, dumps_manifest(kept).encode())
        result.summary["kept_manifest"] = kept_manifest
    fs.write_bytes(fs.join(out, "summary.json"), json.dumps(result.summary, indent=2, ensure_ascii=False).encode())


# ---------------------------------------------------------------- on Beam


def _save_pairs(path: str, pairs: np.ndarray, scores: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, pairs=pairs, scores=scores)
    fs.write_bytes(path, buffer.getvalue())


def _search_shard_dofn(column: str, threshold: float, work: str):
    import apache_beam as beam

    class SearchShard(beam.DoFn):
        """(shard_no, path, first item number) -> WORK/pairs-NNNNN.npz: its items' near pairs."""

        def setup(self):
            from koclip.index import read_index_file

            self.index = read_index_file(fs.join(work, "search.faiss"))

        def process(self, element):
            number, path, start = element
            pairs, scores = shard_pairs(self.index, path, start, column, threshold)
            _save_pairs(fs.join(work, f"pairs-{number:05d}.npz"), pairs, scores)
            yield number

    return SearchShard()


def run_distributed(column: str, threshold: float, work: str, pipeline_args: list[str]):
    """A `search` for find_duplicates: the index written once to `work`, one Beam element per shard."""

    def search(index: faiss.Index, items: Items):
        from pipelines.index_beam import run

        fs.write_bytes(fs.join(work, "search.faiss"), faiss.serialize_index(index).tobytes())
        elements = [(k, path, start) for k, (path, start) in enumerate(zip(items.shard_paths, items.shard_starts))]
        run(elements, _search_shard_dofn(column, threshold, work), list(pipeline_args), "Search")
        found = []
        for number, *_ in elements:
            with np.load(io.BytesIO(fs.read_bytes(fs.join(work, f"pairs-{number:05d}.npz")))) as data:
                found.append((data["pairs"], data["scores"]))
        fs.remove_tree(work)
        return _concat(found)

    return search


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m jobs.dedup", description=head, epilog=rest,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, metavar="DIR", help="the store (shard-*.parquet), local or gs://")
    p.add_argument("--out", required=True, metavar="DIR", help="where groups.parquet and summary.json go")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"inner product (cosine) at or above which two items are near duplicates "
                        f"(default {DEFAULT_THRESHOLD})")
    p.add_argument("--column", choices=["image_embedding", "caption_embeddings"], default="image_embedding")
    p.add_argument("--kept-manifest", metavar="PATH", help="write a JSONL manifest of the items kept")
    p.add_argument("--exact-max-rows", type=int, default=DEFAULT_EXACT_MAX_ROWS, metavar="N",
                   help=f"exact range search up to N items, an IVF index above (default {DEFAULT_EXACT_MAX_ROWS})")
    p.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE, help="IVF lists searched per item (large stores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the IVF training sample")
    p.add_argument("--distributed", action="store_true", help="the range searches on Beam, one element per shard")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    def body():
        from koclip.store import open_store

        if beam_args and not args.distributed:
            raise UsageError(f"unknown option {beam_args[0]!r} (Beam options need --distributed; see --help)")
        if not -1 <= args.threshold <= 1:
            raise UsageError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
        if args.nprobe < 1:
            raise UsageError(f"--nprobe must be at least 1, got {args.nprobe}")
        if not fs.exists(args.embeddings):
            raise UsageError(f"embedding folder not found: {args.embeddings}")
        store = open_store(args.embeddings)
        search = (run_distributed(args.column, args.threshold, fs.join(args.out, "_work"), beam_args)
                  if args.distributed else None)
        result = find_duplicates(store, args.threshold, args.column, args.exact_max_rows, args.nprobe, args.seed,
                                 search=search)
        write_outputs(result, args.out, args.kept_manifest)
        s = result.summary
        print(f"{s['items']} items: {s['groups']} groups of duplicates holding {s['items_in_groups']} items "
              f"({s['exact_pairs']} exact pairs by sha256, {s['near_pairs']} near pairs at >= {s['threshold']}, "
              f"{s['method']}); kept {s['kept']}, removed {s['removed']} in {s['seconds']:.1f} s")
        print(f"wrote {fs.join(args.out, 'groups.parquet')}, {fs.join(args.out, 'summary.json')}"
              + (f", {args.kept_manifest}" if args.kept_manifest else ""))

    return run_cli("jobs.dedup", body)


if __name__ == "__main__":
    sys.exit(main())
