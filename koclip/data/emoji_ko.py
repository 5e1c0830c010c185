"""emoji-ko: every fully-qualified emoji drawn with Noto Color Emoji, with several Korean captions.

Sources (all offline):
- captions: first the PyPI `emoji` package's Korean (CLDR) name, `:강아지_얼굴:` -> `강아지 얼굴`
  (the label: zero-shot and the test split's label queries use it); then, from the shipped
  CLDR table (koclip.data.emoji_cldr, derived from npm's emojibase-data), the CLDR label where
  it differs and the Korean keywords: 🐶 `강아지 얼굴`, `강아지`, `개`, `개띠`, `동물`, `사랑스러운`,
  `애완동물`. Training samples one caption per step. English names are deliberately not used.
- images: Debian's `fonts-noto-color-emoji` (a CBDT bitmap font whose only strike is size 109;
  each glyph is a 136x128 bitmap). The glyph cell is drawn with Pillow (`embedded_color=True`,
  libraqm layout so ZWJ, skin-tone, keycap and flag sequences become one glyph), composited
  onto white, centred in a 136x136 square and resized (Lanczos) to `--size` px (default 128):
  RGB PNG. The whole cell is scaled, not the ink's bounding box, so small emoji (▪️) stay small
  and large ones (⬛) large.

An emoji is skipped, and counted by reason, when the font cannot draw it:
- `missing_glyph`: the font has no glyph for it (draws nothing; emoji newer than the font);
- `not_one_glyph`: the font has no ligature for the sequence and would draw its parts side by
  side (e.g. a newer ZWJ sequence or a skin tone the font lacks);
- `blank`: drawn, but nothing visible on white.

Split: train/val/test ~80/10/10 by a stable hash of each record's GROUP key, so all variants of
one base emoji land in the same split. The group key is the emoji's code points after
1. dropping variation selectors (U+FE0E, U+FE0F) and skin-tone modifiers (U+1F3FB..U+1F3FF);
2. cutting ZWJ (U+200D) sequences into parts and dropping the parts that only vary a base:
   gender signs (♀ U+2640, ♂ U+2642), hair styles (U+1F9B0..U+1F9B3), and a trailing
   direction arrow (➡ U+27A1, "facing right");
3. mapping gendered people to their neutral base (man 👨/woman 👩 -> person 🧑, boy/girl ->
   child, old man/old woman -> older person, prince/princess -> person with crown, pregnant
   man/woman -> pregnant person, Santa/Mrs. Claus -> Mx Claus, man/woman dancing -> one group),
   and multi-person sequences to their single-code-point emoji (kiss 💏, couple with heart 💑,
   holding hands, family 👪, handshake 🤝, bunny ears 👯, wrestling 🤼);
written as lowercase hex code points joined by "-" (ZWJ parts joined by "-200d-"). So 👍🏽 and 👍
share group `1f44d`; 👮‍♀️, 👮🏿 and 👮 share `1f46e`; 👩‍🦰, 👨🏿 and 🧑 share `1f9d1`; 👩‍⚕️ and 🧑🏽‍⚕️
share `1f9d1-200d-2695`. Item ids are the emoji's own code points in the same notation
(`1f468-1f3fd-200d-2695-fe0f`). A group's split is `sha256("emoji-ko/" + group)` read as a
fraction of 2**64: < 0.8 train, < 0.9 val, else test; it depends on nothing but the group key,
so it does not change when emoji are added or `--limit` is used.

Output (OUT defaults to `cache_dir()/emoji-ko`):
    OUT/images/<id>.png
    OUT/manifest.jsonl                 all records, with split and group
    OUT/train.jsonl, val.jsonl, test.jsonl
    OUT/build_info.json                settings, versions and counts of the build

    python -m koclip.data.emoji_ko [OUT] [--size 128] [--limit N] [--workers N]

`ensure_emoji_ko()` returns the manifest of a finished build, building it first if needed.
A build renders every image again (~10-20 s for ~3.8k emoji on 2 cores; spawned worker
processes) but rewrites only files whose bytes changed, deletes images no longer listed, and
writes the manifest last, so an interrupted build is never taken for a finished one. Same
inputs give byte-identical manifests; PNG bytes depend on the Pillow/zlib versions.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from koclip.cli import ArgumentParser, run_cli
from koclip.data import cache_dir
from koclip.data import emoji_cldr
from koclip.data.emoji_groups import caption_of, emoji_id, group_key, split_of
from koclip.data.manifest import SPLITS, Item, read_manifest, write_manifest
from koclip.errors import MissingDependency, UsageError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the only bitmap strike of Noto Color Emoji
CELL = (136, 128)  # Noto Color Emoji's glyph bitmap, width x height
DEFAULT_SIZE = 128
FORMAT_VERSION = 2  # 2: several captions per emoji (CLDR keywords)
SKIP_REASONS = ("missing_glyph", "not_one_glyph", "blank")

FONT_INSTALL = "apt-get install fonts-noto-color-emoji"
EMOJI_INSTALL = "pip install emoji"


# --- candidates -----------------------------------------------------------------------------

def _import_emoji():
    try:
        import emoji
    except ImportError:
        raise MissingDependency(f"emoji-ko needs the `emoji` package for Korean names: {EMOJI_INSTALL}") from None
    return emoji


def candidates() -> list[tuple[str, str]]:
    """(emoji, Korean name) for every fully-qualified emoji with a Korean name, in id order."""
    emoji = _import_emoji()
    emoji.config.load_language("ko")
    fully = emoji.STATUS["fully_qualified"]
    out = [(text, caption_of(data["ko"])) for text, data in emoji.EMOJI_DATA.items()
           if data.get("status") == fully and caption_of(data.get("ko", ""))]
    return sorted(out, key=lambda item: [ord(ch) for ch in item[0]])


def emoji_package_version() -> str:
    return getattr(_import_emoji(), "__version__", "unknown")


# --- rendering ------------------------------------------------------------------------------

def check_font(font_path: str = FONT_PATH) -> None:
    from PIL import features

    if not os.path.isfile(font_path):
        raise MissingDependency(f"emoji font not found: {font_path}; install it with: {FONT_INSTALL}")
    if not features.check("raqm"):
        raise MissingDependency("Pillow has no libraqm layout (needed to draw emoji sequences as one glyph); "
                                "install libraqm/fribidi: apt-get install libfribidi0 libraqm0")


def load_font(font_path: str = FONT_PATH):
    from PIL import ImageFont

    check_font(font_path)
    return ImageFont.truetype(font_path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render(text: str, font, size: int = DEFAULT_SIZE):
    """(RGB image of size x size, None), or (None, skip reason)."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = CELL
    if font.getlength(text) > 1.5 * width:
        return None, "not_one_glyph"
    glyph = Image.new("RGBA", CELL, (255, 255, 255, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return None, "missing_glyph"
    square = Image.new("RGBA", (width, width), (255, 255, 255, 255))
    square.alpha_composite(glyph, (0, (width - height) // 2))
    image = square.convert("RGB")
    if size != width:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    if np.asarray(image).min() >= 250:
        return None, "blank"
    return image, None


_worker_font = None


def _init_worker(font_path: str) -> None:
    global _worker_font
    _worker_font = load_font(font_path)


def _render_to_file(job: tuple[str, str, int]) -> str | None:
    text, path, size = job
    image, reason = render(text, _worker_font, size)
    if image is None:
        return reason
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return None  # unchanged: leave the file (and its mtime) alone
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return None


# --- build ----------------------------------------------------------------------------------

def default_out() -> str:
    return os.path.join(cache_dir(), "emoji-ko")


def select(items: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """The first `limit` emoji in group-hash order (whole groups together), or all."""
    if limit is None:
        return items
    ranked = sorted(items, key=lambda item: (hashlib.sha256(group_key(item[0]).encode()).digest(),
                                             [ord(ch) for ch in item[0]]))
    chosen = {text for text, _ in ranked[:max(0, limit)]}
    return [item for item in items if item[0] in chosen]


def build_emoji_ko(out: str | None = None, size: int = DEFAULT_SIZE, limit: int | None = None,
                   workers: int | None = None, font_path: str = FONT_PATH, progress: bool = False) -> dict:
    """Build (or rebuild in place) emoji-ko into `out`; returns the build info with its counts."""
    out = os.path.abspath(out or default_out())
    if size < 16:
        raise UsageError(f"size must be at least 16 px, got {size}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    check_font(font_path)
    items = select(candidates(), limit)
    started = time.perf_counter()
    images_dir = os.path.join(out, "images")
    os.makedirs(images_dir, exist_ok=True)
    # The manifest goes last: its presence with a matching build_info marks a complete build.
    for name in ("manifest.jsonl", "build_info.json"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))

    jobs = [(text, os.path.join(images_dir, f"{emoji_id(text)}.png"), size) for text, _ in items]
    workers = max(1, min(workers or os.cpu_count() or 1, 8))
    if workers == 1 or len(jobs) < 200:
        _init_worker(font_path)
        results = [_render_to_file(job) for job in _progress(jobs, progress)]
    else:
        # spawn, not fork: the caller may already run threads (JAX, tokenizers) that fork would copy.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(font_path,)) as pool:
            results = list(_progress(pool.map(_render_to_file, jobs, chunksize=64), progress, total=len(jobs)))

    records, skipped = [], Counter()
    for (text, name), reason in zip(items, results):
        if reason is not None:
            skipped[reason] += 1
            continue
        group = group_key(text)
        rid = emoji_id(text)
        records.append(Item(rid, f"images/{rid}.png", emoji_cldr.captions(text, name), split_of(group), group, extra={"emoji": text}))

    keep = {f"{r.id}.png" for r in records}
    for name in os.listdir(images_dir):  # images of an earlier, larger or different build
        if name.endswith(".png") and name not in keep:
            os.remove(os.path.join(images_dir, name))

    for split in SPLITS:
        write_manifest(os.path.join(out, f"{split}.jsonl"), [r for r in records if r.split == split])
    per_split = Counter(r.split for r in records)
    groups_per_split = {s: len({r.group for r in records if r.split == s}) for s in SPLITS}
    info = {
        "format": FORMAT_VERSION,
        "size": size,
        "limit": limit,
        "emoji_package": emoji_package_version(),
        "cldr_keywords": emoji_cldr.source(),
        "font": {"path": font_path, "bytes": os.path.getsize(font_path)},
        "counts": {
            "candidates": len(items),
            "rendered": len(records),
            "captions": sum(len(r.captions) for r in records),
            "with_cldr_keywords": sum(len(r.captions) > 1 for r in records),
            "skipped": {reason: skipped.get(reason, 0) for reason in SKIP_REASONS},
            "splits": {s: per_split.get(s, 0) for s in SPLITS},
            "groups": len({r.group for r in records}),
            "groups_per_split": groups_per_split,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(out, "build_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    write_manifest(os.path.join(out, "manifest.jsonl"), records)
    info["out"] = out
    return info


def _progress(iterable, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="rendering", unit="emoji", file=sys.stderr)


def is_complete(out: str, size: int = DEFAULT_SIZE, limit: int | None = None) -> bool:
    """True if `out` holds a finished build with these settings, for this emoji package, all images present."""
    try:
        with open(os.path.join(out, "build_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        if (info.get("format"), info.get("size"), info.get("limit")) != (FORMAT_VERSION, size, limit):
            return False
        if info.get("emoji_package") != emoji_package_version():
            return False
        records = read_manifest(os.path.join(out, "manifest.jsonl"))
    except (OSError, ValueError, KeyError, TypeError, MissingDependency):
        return False
    return len(records) == info["counts"]["rendered"] and all(os.path.isfile(r.uri) for r in records)


def ensure_emoji_ko(out: str | None = None, size: int = DEFAULT_SIZE, limit: int | None = None) -> str:
    """The manifest path of a complete emoji-ko build in `out` (default `cache_dir()/emoji-ko`).

    Reuses a finished build with the same size and limit (all images present, same `emoji`
    package version); otherwise builds it first. Raises MissingDependency if it must build and
    the font or the `emoji` package is missing.
    """
    out = os.path.abspath(out or default_out())
    if not is_complete(out, size, limit):
        build_emoji_ko(out, size=size, limit=limit)
    return os.path.join(out, "manifest.jsonl")


def format_counts(info: dict) -> str:
    c = info["counts"]
    skipped = sum(c["skipped"].values())
    lines = [
        f"emoji-ko in {info['out']} (size {info['size']} px, emoji {info['emoji_package']}"
        + (f", limit {info['limit']}" if info["limit"] is not None else "") + ")",
        f"candidates:  {c['candidates']} fully-qualified emoji with a Korean name",
        f"rendered:    {c['rendered']}",
        f"captions:    {c['captions']} ({c['with_cldr_keywords']} emoji with CLDR keywords)",
        f"skipped:     {skipped} (" + ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) + ")",
        "splits:      " + ", ".join(f"{s} {c['splits'][s]}" for s in SPLITS)
        + "  (records)",
        "groups:      " + f"{c['groups']} distinct; "
        + ", ".join(f"{s} {c['groups_per_split'][s]}" for s in SPLITS),
        f"time:        {info['seconds']} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m koclip.data.emoji_ko",
        description="Build the emoji-ko dataset: fully-qualified emoji drawn with Noto Color Emoji, "
                    "captioned with their Korean names and CLDR keywords, split train/val/test by emoji group.")
    parser.add_argument("out", nargs="?", default=None, help=f"output folder (default: {default_out()})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only N emoji (whole groups, chosen by group hash): for quick builds")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    parser.add_argument("--font", default=FONT_PATH, help="Noto Color Emoji font file (default %(default)s)")
    args = parser.parse_args(argv)

    def run():
        info = build_emoji_ko(args.out, size=args.size, limit=args.limit, workers=args.workers,
                              font_path=args.font, progress=sys.stderr.isatty())
        print(format_counts(info))
        print(f"manifest:    {os.path.join(info['out'], 'manifest.jsonl')}")

    return run_cli("koclip.data.emoji_ko", run)


if __name__ == "__main__":
    sys.exit(main())
