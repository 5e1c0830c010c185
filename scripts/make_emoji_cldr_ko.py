"""Regenerate koclip/data/emoji_cldr_ko.jsonl (+ its licence) from npm's emojibase-data.

  python scripts/make_emoji_cldr_ko.py [--version 17.0.0] [--package DIR]

Without --package it runs `npm pack emojibase-data@VERSION` in a temporary folder (the npm
registry is the only network it needs) and reads `package/ko/data.json` (Korean CLDR labels,
keywords as `tags`, group/subgroup numbers) and `package/ko/messages.json` (the group and
subgroup names). It writes one JSON line of metadata, then one line per top-level emoji:
  {"key": "1f34e", "label": "빨간 사과", "tags": [...], "group": "음식 및 음료", "subgroup": "과일"}
`key` is the emoji's code points in lowercase hex (no leading zeros, as emoji-ko's ids) joined by "-", variation selectors (FE0E,
FE0F) dropped; skin-tone variants are not listed (they share their base's keywords, and
koclip.data.emoji_cldr looks them up by their base). Rows are sorted by key; same input, same bytes.
Not imported at run time: the committed file is what koclip reads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, os.pardir, "koclip", "data")
OUT_NAME = "emoji_cldr_ko.jsonl"
LICENSE_NAME = "emoji_cldr_ko.LICENSE"
VARIATION_SELECTORS = {"FE0E", "FE0F"}


def key_of(hexcode: str) -> str:
    return "-".join(f"{int(part, 16):x}" for part in hexcode.split("-") if part not in VARIATION_SELECTORS)


def npm_pack(version: str, work: str) -> str:
    if shutil.which("npm") is None:
        sys.exit("npm is not installed; or pass --package DIR (an unpacked emojibase-data package)")
    subprocess.run(["npm", "pack", "--silent", f"emojibase-data@{version}"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(os.path.join(work, f"emojibase-data-{version}.tgz")) as tar:
        tar.extractall(work, filter="data")
    return os.path.join(work, "package")


def rows(package: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(package, "ko", "data.json"), encoding="utf-8") as f:
        data = json.load(f)
    with open(os.path.join(package, "ko", "messages.json"), encoding="utf-8") as f:
        messages = json.load(f)
    with open(os.path.join(package, "package.json"), encoding="utf-8") as f:
        version = json.load(f)["version"]
    groups = {g["order"]: g["message"] for g in messages["groups"]}
    subgroups = {g["order"]: g["message"] for g in messages["subgroups"]}
    out = {}
    for entry in data:
        key = key_of(entry["hexcode"])
        out[key] = {"key": key, "label": entry["label"], "tags": sorted(set(entry.get("tags", []))),
                    "group": groups.get(entry.get("group"), ""), "subgroup": subgroups.get(entry.get("subgroup"), "")}
    meta = {"source": f"npm emojibase-data@{version}, ko/data.json + ko/messages.json (MIT; derived from Unicode CLDR)",
            "emoji": len(out)}
    return meta, [out[k] for k in sorted(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="17.0.0", help="emojibase-data version (default %(default)s)")
    parser.add_argument("--package", help="an unpacked emojibase-data package folder (skips npm)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        package = args.package or npm_pack(args.version, work)
        meta, entries = rows(package)
        with open(os.path.join(DATA_DIR, OUT_NAME), "w", encoding="utf-8") as f:
            for record in [meta, *entries]:
                f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        shutil.copyfile(os.path.join(package, "LICENSE"), os.path.join(DATA_DIR, LICENSE_NAME))
    print(f"wrote {len(entries)} emoji to {os.path.normpath(os.path.join(DATA_DIR, OUT_NAME))}")


if __name__ == "__main__":
    main()
