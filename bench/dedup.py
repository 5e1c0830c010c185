"""jobs.dedup on planted duplicates: seconds, peak memory, and precision/recall of duplicate pairs.

Synthetic (default): N x D unit vectors (bench.index.clustered_vectors, the index benchmark's
"current" data) in which --groups originals each get one or two planted copies at a cosine
similarity drawn uniformly from [--copy-min, 1) to their original (original + Gaussian noise
orthogonal to it, renormalised), plus --near-misses copies at [0.80, 0.90): similar, but below
the threshold. They are written as a koclip.store (8 shards) and jobs.dedup.find_duplicates runs
on it (exact range search up to --exact-max-rows items, IVF-Flat with --nprobe above).

  pair recall     planted (original, copy) pairs whose two items land in one group;
  pair precision  of all pairs of items sharing a found group, those planted together;
                  near misses grouped with their original count against it;
  seconds         find_duplicates (reading the store, the index, the range search, components);
  peak RSS        the process's peak resident memory (Linux VmHWM, reset before the run) minus
                  its resident memory before it; the store is on disk, the corpus array freed.

Images (--images N): N emoji-ko pictures (koclip.data.emoji_ko.render, Noto Color Emoji; a
sample of the whole set drawn with --seed) and one altered copy of each, cycling through: re-encoded as JPEG quality 40, resized to half size,
cropped by 6% on every side, colour-shifted (+24 red, -16 green, +16 blue), and a byte-identical
copy (found by sha256). Both are embedded by --model through pipelines.embed (the real pipeline)
and jobs.dedup runs on the store. Pairs are (original, its copy); the table gives pair
precision/recall at --threshold per alteration, and by plain similarity (sim >= t, no grouping)
for a sweep of thresholds. With no --model a random-init tiny checkpoint (`koclip init --tiny
tiny-bert-clip`) embeds them: its figures say how far pixel-level closeness carries in an
untrained network, not what a trained KoCLIP would do. No pretrained image weights exist offline.

    python -m bench.dedup                       # 1M x 512, IVF: a few minutes on 2 cores
    python -m bench.dedup --n 20000             # a smoke run (exact)
    python -m bench.dedup --images 300          # emoji-ko with altered copies
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/dedup.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import load_average, machine_info, print_table, write_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dedup.json"


def copy_at(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly `cosine` to the unit `vector`."""
    noise = rng.standard_normal(len(vector)).astype(np.float32)
    noise -= (noise @ vector) * vector
    noise /= np.linalg.norm(noise)
    return (cosine * vector + np.sqrt(max(0.0, 1 - cosine**2)) * noise).astype(np.float32)


def plant(base: np.ndarray, groups: int, near_misses: int = 0, copy_min: float = 0.96, seed: int = 0):
    """(vectors, planted, misses): `base` with copies appended then everything shuffled;
    `planted` lists each original's group as sorted row numbers (original first before the
    shuffle, so any order after), `misses` (original row, near-miss row) pairs."""
    rng = np.random.default_rng(seed)
    n = len(base)
    originals = rng.choice(n, groups + near_misses, replace=False)
    extra, members, misses = [], [], []
    for k, o in enumerate(originals[:groups]):
        copies = 1 + (k % 3 == 0)  # every third original has two copies
        group = [int(o)]
        for _ in range(copies):
            extra.append(copy_at(base[o], rng.uniform(copy_min, 1.0), rng))
            group.append(n + len(extra) - 1)
        members.append(group)
    for o in originals[groups:]:
        extra.append(copy_at(base[o], rng.uniform(0.80, 0.90), rng))
        misses.append((int(o), n + len(extra) - 1))
    vectors = np.concatenate([base, np.stack(extra)]) if extra else base
    order = rng.permutation(len(vectors))  # new row r holds old row order[r]
    new_row = np.empty_like(order)
    new_row[order] = np.arange(len(order))
    planted = [sorted(int(new_row[i]) for i in g) for g in members]
    return vectors[order], planted, [(int(new_row[a]), int(new_row[b])) for a, b in misses]


def pair_scores(found_groups: list[list[int]], planted: list[list[int]]) -> dict:
    """Pair precision and recall of found groups (lists of rows) against planted groups."""
    truth = {frozenset((a, b)) for g in planted for i, a in enumerate(g) for b in g[i + 1:]}
    found = {frozenset((a, b)) for g in found_groups for i, a in enumerate(g) for b in g[i + 1:]}
    hits = len(truth & found)
    return {"planted_pairs": len(truth), "found_pairs": len(found), "true_pairs_found": hits,
            "pair_recall": round(hits / len(truth), 4) if truth else 1.0,
            "pair_precision": round(hits / len(found), 4) if found else 1.0}


def write_vectors_store(root: str, vectors: np.ndarray, shards: int = 8, sha256=None) -> str:
    """A koclip.store of `vectors`, items "item{row}" (rows in order), captions empty."""
    from koclip import fs
    from koclip.store import Row, rows_to_table, write_shard

    dim = vectors.shape[1]
    for s, part in enumerate(np.array_split(np.arange(len(vectors)), shards)):
        rows = [Row(f"item{i}", f"gs://bench/{i}.jpg", sha256[i] if sha256 else f"{i:064x}", 8, 8, [],
                    vectors[i], np.zeros((0, dim), np.float32)) for i in part]
        write_shard(fs.join(root, f"shard-{s:05d}.parquet"), rows_to_table(rows, "bench", {"projection_dim": dim}, dim))
    return root


def found_groups(result) -> list[list[int]]:
    """jobs.dedup's groups as lists of rows (items are "item{row}")."""
    ids = result.groups.column("id").to_pylist()
    groups = result.groups.column("group").to_pylist()
    out: dict[int, list[int]] = {}
    for item, g in zip(ids, groups):
        out.setdefault(g, []).append(int(item[4:]))
    return list(out.values())


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


ALTERATIONS = ("jpeg", "resize", "crop", "colour", "same_bytes")


def altered(image, how: str, original_png: bytes) -> tuple[bytes, str]:
    """(file bytes, extension) of an altered copy of a PIL RGB image."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    if how == "same_bytes":
        return original_png, "png"
    if how == "jpeg":
        image.save(buffer, "JPEG", quality=40)
        return buffer.getvalue(), "jpg"
    if how == "resize":
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
    elif how == "crop":
        m = round(image.width * 0.06)
        image = image.crop((m, m, image.width - m, image.height - m))
    elif how == "colour":
        shifted = np.asarray(image).astype(np.int16) + np.array([24, -16, 16], np.int16)
        image = Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))
    image.save(buffer, "PNG")
    return buffer.getvalue(), "png"


def image_benchmark(args) -> dict:
    import io
    import json

    from jobs.dedup import find_duplicates
    from koclip.data import emoji_ko
    from koclip.store import open_store, vectors_to_numpy
    from pipelines import embed

    with tempfile.TemporaryDirectory(prefix="bench-dedup-images-") as tmp:
        model = args.model
        if model is None:
            from koclip.cli.main import main as koclip_main

            model = f"{tmp}/tiny"
            koclip_main(["init", model, "--tiny", "tiny-bert-clip"])
        font = emoji_ko.load_font()
        rows, pairs, kinds = [], [], {}
        # a seeded sample of the whole set: in code point order the first few hundred are keycaps and
        # arrows, blue squares alike at the demo model's 32 px, which no embedder tells apart
        everything = emoji_ko.candidates()
        order = np.random.default_rng(args.seed).permutation(len(everything))
        for text, name in (everything[i] for i in order):
            if len(pairs) >= args.images:
                break
            image, _ = emoji_ko.render(text, font)
            if image is None:
                continue
            k = len(pairs)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            how = ALTERATIONS[k % len(ALTERATIONS)]
            copy, ext = altered(image, how, buffer.getvalue())
            Path(f"{tmp}/o{k}.png").write_bytes(buffer.getvalue())
            Path(f"{tmp}/c{k}.{ext}").write_bytes(copy)
            rows += [{"id": f"o{k}", "image": f"{tmp}/o{k}.png", "captions": [name]},
                     {"id": f"c{k}", "image": f"{tmp}/c{k}.{ext}", "captions": [name]}]
            pairs.append((f"o{k}", f"c{k}"))
            kinds[f"c{k}"] = how
        Path(f"{tmp}/manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        start = time.perf_counter()
        embed.run(["--input", f"{tmp}/manifest.jsonl", "--output", f"{tmp}/emb", "--model", model,
                   "--batch_size", "16"])
        embed_s = time.perf_counter() - start
        store = open_store(f"{tmp}/emb")
        result = find_duplicates(store, args.threshold)
        table = store.read_table()
        ids = table.column("id").to_pylist()
        vectors = vectors_to_numpy(table.column("image_embedding").combine_chunks(),
                                   table.schema.field("image_embedding").type.list_size)
    row_of = {i: r for r, i in enumerate(ids)}
    groups = {}
    for item, g in zip(result.groups.column("id").to_pylist(), result.groups.column("group").to_pylist()):
        groups[item] = g
    per_kind = []
    for how in ALTERATIONS:
        mine = [(o, c) for o, c in pairs if kinds[c] == how]
        found = sum(1 for o, c in mine if o in groups and groups.get(o) == groups.get(c))
        per_kind.append({"alteration": how, "pairs": len(mine), "found_at_threshold": found,
                         "recall": round(found / len(mine), 3) if mine else None,
                         "median_similarity": round(float(np.median([vectors[row_of[o]] @ vectors[row_of[c]]
                                                                     for o, c in mine])), 4) if mine else None})
    sims = vectors @ vectors.T
    truth = np.zeros_like(sims, dtype=bool)
    for o, c in pairs:
        truth[row_of[o], row_of[c]] = truth[row_of[c], row_of[o]] = True
    upper = np.triu(np.ones_like(truth), 1)
    sweep = []
    for t in (0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.99):
        hit = (sims >= t) & upper
        tp = int((hit & truth).sum())
        sweep.append({"threshold": t, "pairs_at_or_above": int(hit.sum()), "true": tp,
                      "precision": round(tp / hit.sum(), 3) if hit.sum() else None,
                      "recall": round(tp / len(pairs), 3)})
    group_pairs = pair_scores([[row_of[i] for i in ids if groups.get(i) == g] for g in set(groups.values())],
                              [[row_of[o], row_of[c]] for o, c in pairs])
    print_table(["alteration", "pairs", f"found at {args.threshold}", "recall", "median similarity"],
                [[r["alteration"], r["pairs"], r["found_at_threshold"], r["recall"], r["median_similarity"]]
                 for r in per_kind])
    print_table(["threshold", "pairs >= t", "true", "precision", "recall"],
                [[r["threshold"], r["pairs_at_or_above"], r["true"], r["precision"], r["recall"]] for r in sweep])
    print(f"groups at {args.threshold}: pair precision {group_pairs['pair_precision']}, pair recall "
          f"{group_pairs['pair_recall']}; model {args.model or 'random-init tiny-bert-clip (koclip init --tiny)'}; "
          f"embedded {len(ids)} images in {embed_s:.1f}s")
    return {"benchmark": "dedup-images", "model": args.model or "random-init tiny-bert-clip (koclip init --tiny)",
            "images": len(pairs), "threshold": args.threshold, "groups": group_pairs, "per_alteration": per_kind,
            "sweep": sweep, "embed_s": round(embed_s, 1), "machine": machine_info()}


def main(argv=None) -> dict:
    from bench.index import clustered_vectors
    from jobs.dedup import DEFAULT_EXACT_MAX_ROWS, DEFAULT_NPROBE, find_duplicates
    from koclip.store import open_store

    parser = argparse.ArgumentParser(prog="python -m bench.dedup", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in all, copies included (default 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--groups", type=int, default=None, help="originals with planted copies (default n/100)")
    parser.add_argument("--near-misses", type=int, default=None, help="copies below the threshold (default n/1000)")
    parser.add_argument("--copy-min", type=float, default=0.96, help="lowest planted copy similarity")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--exact-max-rows", type=int, default=DEFAULT_EXACT_MAX_ROWS)
    parser.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=0, help="emoji-ko images with altered copies instead")
    parser.add_argument("--model", default=None, help="checkpoint for --images (default: a random-init tiny one)")
    parser.add_argument("--out", default=None, help="JSON (default: bench/results/dedup.json, dedup-images.json)")
    args = parser.parse_args(argv)
    if args.images:
        data = image_benchmark(args)
        print(f"wrote {write_json(args.out or DEFAULT_OUT.with_name('dedup-images.json'), data)}")
        return data
    groups = args.groups if args.groups is not None else args.n // 100
    misses = args.near_misses if args.near_misses is not None else args.n // 1000
    copies = sum(1 + (k % 3 == 0) for k in range(groups)) + misses
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        vectors, planted, near = plant(clustered_vectors(args.n - copies, args.dim, seed=args.seed), groups, misses,
                                       args.copy_min, args.seed)
        write_vectors_store(tmp, vectors)
        del vectors
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        before = _status_kb("VmRSS")
        start = time.perf_counter()
        result = find_duplicates(open_store(tmp), args.threshold, exact_max_rows=args.exact_max_rows,
                                 nprobe=args.nprobe, seed=args.seed)
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM")
    scores = pair_scores(found_groups(result), planted)
    grouped = {i for g in found_groups(result) for i in g}
    misses_grouped = sum(1 for a, b in near if a in grouped and b in grouped)
    row = {"n": args.n, "dim": args.dim, "method": result.summary["method"], "threshold": args.threshold,
           "seconds": round(seconds, 1), "peak_rss_mb": round((peak - before) / 1024, 1) if peak and before else None,
           **scores, "near_misses": len(near), "near_misses_grouped": misses_grouped,
           "groups_found": result.summary["groups"], "near_pairs": result.summary["near_pairs"]}
    print_table(["n", "dim", "method", "threshold", "seconds", "peak MB", "planted pairs", "pair recall",
                 "pair precision", "near misses grouped"],
                [[row["n"], row["dim"], row["method"], row["threshold"], row["seconds"], row["peak_rss_mb"],
                  row["planted_pairs"], row["pair_recall"], row["pair_precision"],
                  f"{misses_grouped}/{len(near)}"]])
    data = {"benchmark": "dedup", "data": "bench.index.clustered_vectors + planted copies", "copy_min": args.copy_min,
            "seed": args.seed, "load_average_start": load_start, "load_average_end": load_average(),
            "machine": machine_info(), "rows": [row]}
    print(f"wrote {write_json(args.out or DEFAULT_OUT, data)}")
    return data


if __name__ == "__main__":
    main()
