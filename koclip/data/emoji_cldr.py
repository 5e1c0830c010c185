"""Korean CLDR labels and keywords of every emoji, from the shipped `emoji_cldr_ko.jsonl`.

The file is derived from npm's `emojibase-data` (`ko/data.json`, MIT, itself derived from Unicode
CLDR; licence in `emoji_cldr_ko.LICENSE`) by `scripts/make_emoji_cldr_ko.py`, so a fresh machine
needs no npm. One row per base emoji: label (`빨간 사과`), keywords (`건강 과일 다이어트 빨간 사과
식품 음식`), group and subgroup names. Skin-tone variants are looked up by their base.

`captions(text, name)` gives emoji-ko's captions of one emoji: its name from the `emoji` package
first (the label the test split is queried with), then the CLDR label where it differs, then
the keywords; duplicates dropped, order kept.
"""
from __future__ import annotations

import functools
import json
import os

DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji_cldr_ko.jsonl")
_VARIATION_SELECTORS = {0xFE0E, 0xFE0F}
_SKIN_TONES = set(range(0x1F3FB, 0x1F400))


@functools.lru_cache(maxsize=1)
def table() -> tuple[dict, dict[str, dict]]:
    """(metadata, key -> row) of the shipped file."""
    with open(DATA_PATH, encoding="utf-8") as f:
        lines = f.read().splitlines()
    meta = json.loads(lines[0])
    rows = {row["key"]: row for row in map(json.loads, lines[1:])}
    return meta, rows


def _key(text: str, drop: set[int]) -> str:
    return "-".join(f"{ord(ch):x}" for ch in text if ord(ch) not in drop)


def entry(text: str) -> dict | None:
    """The CLDR row of an emoji (its own, else its base without skin tones), or None."""
    rows = table()[1]
    return rows.get(_key(text, _VARIATION_SELECTORS)) or rows.get(_key(text, _VARIATION_SELECTORS | _SKIN_TONES))


def normalise(caption: str) -> str:
    """`깃발: 부탄` -> `깃발 부탄`: the CLDR label's separators as the emoji package writes them."""
    return " ".join(caption.replace(":", " ").replace("_", " ").split())


def captions(text: str, name: str) -> tuple[str, ...]:
    found = entry(text)
    out = [name]
    if found is not None:
        out += [normalise(found["label"]), *(normalise(tag) for tag in found["tags"])]
    return tuple(dict.fromkeys(c for c in out if c))


def source() -> str:
    return table()[0]["source"]
