"""Check a reindex work dir and its index against the source: what jobs.reindex promises after
every completed run.

  python -m jobs.reindex_check --source gs://b/photos/ --work gs://b/koclip-work --index gs://b/index

- no committed run is left unapplied (WORK/pending/);
- the state holds each current item once, with its current signature;
- the live store holds each item the state calls embedded exactly once, and no other, with the
  item's current captions, all by one model: the one WORK/model.json names;
- the published index holds the same items exactly once each (for a caption index: each of an
  item's captions once), with the same captions, made by the same model.
Prints each violation and exits 1 if there is any (bench/soak.py and the fault tests use it).
"""
from __future__ import annotations

import json
import sys
from collections import Counter

from jobs.reindex_state import LIVE_DIR, MODEL_FILE, load_pending, load_state, signatures
from koclip import fs, store
from koclip.cli import ArgumentParser, run_cli
from pipelines.listing import list_items


def _current_captions(item) -> list[str]:
    if item.caption_uri is None:
        return [c.strip() for c in item.captions if c.strip()]
    try:
        text = fs.read_bytes(item.caption_uri).decode("utf-8-sig").strip()
    except FileNotFoundError:
        return []
    return [text] if text else []


def _repeated(ids) -> list[str]:
    return sorted(i for i, n in Counter(ids).items() if n > 1)


def violations(source: str, work: str, index_root: str, content_hash: bool = False) -> list[str]:
    from koclip.index import current_version, load_index

    found: list[str] = []
    items = {i.id: i for i in list_items(source, rejects=[])}
    sigs = signatures(list(items.values()), content_hash=content_hash)
    if load_pending(work) is not None:
        found.append("a committed run is not applied yet (WORK/pending/run.json)")
    state = load_state(work)
    if set(state) != set(items):
        found.append(f"state ids differ from the source: missing {sorted(set(items) - set(state))[:5]}, "
                     f"extra {sorted(set(state) - set(items))[:5]}")
    stale = sorted(i for i in state if i in sigs and state[i]["signature"] != sigs[i])
    if stale:
        found.append(f"{len(stale)} state rows have an old signature: {stale[:5]}")
    embedded = {i for i, row in state.items() if row["status"] == "embedded"}

    live = store.open_store(fs.join(work, LIVE_DIR)) if store.list_shards(fs.join(work, LIVE_DIR)) else None
    live_rows = live.read_table(["id", "captions"]).to_pylist() if live else []
    live_ids = [r["id"] for r in live_rows]
    if _repeated(live_ids):
        found.append(f"the live store holds ids more than once: {_repeated(live_ids)[:5]}")
    if set(live_ids) != embedded:
        found.append(f"the live store differs from the state: missing {sorted(embedded - set(live_ids))[:5]}, "
                     f"extra {sorted(set(live_ids) - embedded)[:5]}")
    wrong = sorted(r["id"] for r in live_rows if r["id"] in items and r["captions"] != _current_captions(items[r["id"]]))
    if wrong:
        found.append(f"{len(wrong)} live rows have old captions: {wrong[:5]}")

    model_path = fs.join(work, MODEL_FILE)
    model = json.loads(fs.read_bytes(model_path))["fingerprint"] if fs.exists(model_path) else None
    if live is not None and live.fingerprint != model:
        found.append(f"the live store was made by model {live.fingerprint}, {MODEL_FILE} names {model}")
    if current_version(index_root) is None:
        found.append(f"no index version is published in {index_root}")
        return found
    index = load_index(index_root)
    rows = index.rows.select(["id", "item_id", "captions"]).to_pylist()
    if _repeated(r["id"] for r in rows):
        found.append(f"the index holds rows more than once: {_repeated(r['id'] for r in rows)[:5]}")
    if {r["item_id"] for r in rows} != embedded:
        indexed = {r["item_id"] for r in rows}
        found.append(f"the index differs from the state: missing {sorted(embedded - indexed)[:5]}, "
                     f"extra {sorted(indexed - embedded)[:5]}")
    if index.meta["column"] == "image_embedding":
        by_id = {r["id"]: r["captions"] for r in live_rows}
        wrong = sorted(r["id"] for r in rows if r["id"] in by_id and r["captions"] != by_id[r["id"]])
        if wrong:
            found.append(f"{len(wrong)} index rows have other captions than the live store: {wrong[:5]}")
    if index.fingerprint != model:
        found.append(f"the index was made by model {index.fingerprint}, {MODEL_FILE} names {model}")
    return found


def main(argv=None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m jobs.reindex_check", description=head)
    p.add_argument("--source", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--content-hash", action="store_true", help="as given to jobs.reindex")
    args = p.parse_args(argv)

    def body() -> int:
        found = violations(args.source, args.work, args.index, args.content_hash)
        for line in found:
            print(line)
        print(f"{len(found)} violations")
        return 1 if found else 0

    return run_cli("jobs.reindex_check", body)


if __name__ == "__main__":
    sys.exit(main())
