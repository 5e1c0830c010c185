"""koclip.data: the manifest, the emoji-ko sample dataset and the Korean WordPiece vocabulary."""
from __future__ import annotations

import io
import json
import os
import re
import uuid

import numpy as np
import pytest

from koclip.data import Item, cache_dir, read_manifest, write_manifest
from koclip.errors import ManifestError, UsageError
from koclip.data import emoji_cldr, emoji_ko
from koclip.processing import open_image

HANGUL = re.compile("[\uac00-\ud7a3]")
LIMIT = 60
SIZE = 64


# --- cache dir ------------------------------------------------------------------------------

def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KOCLIP_CACHE", str(tmp_path))
    assert cache_dir() == str(tmp_path)
    monkeypatch.delenv("KOCLIP_CACHE")
    assert cache_dir() == os.path.expanduser(os.path.join("~", ".cache", "koclip"))


# --- manifest -------------------------------------------------------------------------------

def _records():
    return [
        Item("a", "images/a.png", ("빨간 사과",), "train", "g1"),
        Item("b", "sub/../images/b.png", ("벚꽃", "벚꽃 나무"), "val", "g2", extra={"source": "test"}),
        Item("c", "gs://bucket/c.png", ("소파 위에 고양이",)),
    ]


def _png_bytes(color=(255, 0, 0)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_manifest_round_trip_local_resolves_relative_images(tmp_path):
    path = str(tmp_path / "data" / "manifest.jsonl")
    write_manifest(path, _records())
    (tmp_path / "data" / "images").mkdir()
    (tmp_path / "data" / "images" / "a.png").write_bytes(_png_bytes())

    records = read_manifest(path)
    assert [r.id for r in records] == ["a", "b", "c"]
    assert records[0].uri == str(tmp_path / "data" / "images" / "a.png")
    assert records[1].uri == str(tmp_path / "data" / "images" / "b.png")
    assert records[2].uri == "gs://bucket/c.png"  # absolute URIs are kept
    assert records[1].captions == ("벚꽃", "벚꽃 나무")
    assert (records[0].split, records[0].group) == ("train", "g1")
    assert (records[2].split, records[2].group) == (None, None)
    assert records[1].extra == {"source": "test"}
    assert open_image(records[0].uri).size == (8, 6)
    # The file is UTF-8 JSONL with Hangul as is, and optional fields left out when unset.
    lines = (tmp_path / "data" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[2]) == {"id": "c", "image": "gs://bucket/c.png", "captions": ["소파 위에 고양이"]}
    assert "빨간 사과" in lines[0]

    assert [r.id for r in read_manifest(path, split="train")] == ["a"]
    assert [r.id for r in read_manifest(path, split="val")] == ["b"]
    assert read_manifest(path, split="test") == []
    with pytest.raises(UsageError, match="split"):
        read_manifest(path, split="dev")


def test_manifest_relative_path_of_the_manifest_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest("m.jsonl", _records()[:1])
    assert read_manifest("m.jsonl")[0].uri == str(tmp_path / "images" / "a.png")


def test_manifest_round_trip_memory_fs():
    import fsspec

    root = f"memory://koclip-test-{uuid.uuid4().hex}/data"
    path = f"{root}/manifest.jsonl"
    write_manifest(path, _records())
    with fsspec.open(f"{root}/images/a.png", "wb") as f:
        f.write(_png_bytes((0, 0, 255)))

    records = read_manifest(path)
    assert records[0].uri == f"{root}/images/a.png"
    assert records[1].uri == f"{root}/images/b.png"
    assert records[2].uri == "gs://bucket/c.png"
    assert np.asarray(open_image(records[0].uri))[0, 0].tolist() == [0, 0, 255]
    assert [r.id for r in read_manifest(path, split="val")] == ["b"]


def test_missing_manifest_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(missing)
    with pytest.raises(FileNotFoundError, match="memory://"):
        read_manifest(f"memory://koclip-test-{uuid.uuid4().hex}/nope.jsonl")


GOOD = '{"id": "ok1", "image": "a.png", "captions": ["강아지 얼굴"]}'


@pytest.mark.parametrize("line, reason", [
    ('{"id": "x", "image": "x.png", "captions": ["a"]', "not valid JSON"),
    ("this is not json", "not valid JSON"),
    ('["x", "x.png"]', "not a JSON object"),
    ('{"image": "x.png", "captions": ["a"]}', "missing field 'id'"),
    ('{"id": "x", "captions": ["a"]}', "missing field 'image'"),
    ('{"id": "x", "image": "", "captions": ["a"]}', "'image' must be a non-empty string"),
    ('{"id": "x", "image": "x.png"}', "no caption"),
    ('{"id": "x", "image": "x.png", "captions": []}', "no caption"),
    ('{"id": "x", "image": "x.png", "captions": ["", "   ", "\\t"]}', "no caption"),
    ('{"id": "x", "image": "x.png", "captions": "  "}', "no caption"),
    ('{"id": "x", "image": "x.png", "captions": [3]}', "captions"),
    ('{"id": "x", "image": "x.png", "captions": ["a"], "split": "dev"}', "'split' must be one of"),
])
def test_bad_line_is_rejected_with_its_line_number(tmp_path, line, reason):
    path = tmp_path / "manifest.jsonl"
    # Line 3 is bad: a good line, a blank line (still counted), then the bad one, then a good one.
    path.write_text(f"{GOOD}\n\n{line}\n" + GOOD.replace("ok1", "ok2") + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert reason in message
    assert "\n" not in message
    assert info.value.errors == [message]


def test_duplicate_id_is_rejected(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(f"{GOOD}\n" + GOOD.replace("ok1", "ok2") + f"\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=re.escape(f"{path}:3: duplicate id 'ok1' (first at {path}:1)")):
        read_manifest(str(path))


def test_several_bad_lines_in_one_message(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(f'{GOOD}\n{{"id": "b"}}\nnot json\n{{"id": "c", "image": "c.png", "captions": [""]}}\n',
                    encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert str(info.value).startswith(f"{path}:2: missing field 'image'")
    assert "2 more bad line(s)" in str(info.value)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_plain_string_caption_and_stripping(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": 7, "image": "x.png", "captions": "  벚꽃  "}\n'
                    '{"id": "8", "image": "y.png", "captions": ["", " 빨간 사과 "]}\n', encoding="utf-8")
    records = read_manifest(str(path))
    assert [(r.id, r.captions) for r in records] == [("7", ("벚꽃",)), ("8", ("빨간 사과",))]


def test_write_manifest_refuses_duplicates_and_captionless(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_manifest(str(tmp_path / "m.jsonl"), [Item("a", "a.png", ("x",)), Item("a", "b.png", ("y",))])
    with pytest.raises(ValueError, match="no caption"):
        write_manifest(str(tmp_path / "m.jsonl"), [Item("a", "a.png", (" ",))])


# --- emoji-ko: grouping (no font needed) ----------------------------------------------------

def _require_emoji():
    pytest.importorskip("emoji", reason=f"emoji-ko needs the emoji package: {emoji_ko.EMOJI_INSTALL}")


@pytest.mark.parametrize("variants", [
    ["👍", "👍🏽", "👍🏿"],  # skin tones
    ["👮", "👮‍♀️", "👮‍♂️", "👮🏿", "👮🏻‍♀️"],  # gender (ZWJ with ♀/♂) and skin tone
    ["🧑", "👨", "👩", "👩‍🦰", "👨🏿‍🦲", "🧑🏽‍🦳", "🧑‍🦱"],  # gender and hair of the base person
    ["👩‍⚕️", "👨‍⚕️", "🧑🏽‍⚕️"],  # gendered professions
    ["❤️", "❤"],  # variation selector
    ["🏃", "🏃‍♀️‍➡️", "🏃🏾‍➡️"],  # facing right
    ["👦", "👧", "🧒🏼"],
    ["🎅", "🤶🏻", "🧑‍🎄"],
    ["💏", "👩‍❤️‍💋‍👨", "🧑🏻‍❤️‍💋‍🧑🏿"],
    ["👪", "👨‍👩‍👧‍👦", "👩‍👦"],
    ["🤝", "🫱🏼‍🫲🏻"],
])
def test_variants_share_their_base_group(variants):
    assert len({emoji_ko.group_key(v) for v in variants}) == 1, [(v, emoji_ko.group_key(v)) for v in variants]


def test_distinct_emoji_have_distinct_groups():
    keys = [emoji_ko.group_key(e) for e in ["🐶", "🐱", "🍎", "👍", "👎", "🇰🇷", "🇯🇵", "#️⃣", "❤️‍🔥", "🏳️‍🌈", "👮", "🧑‍⚕️"]]
    assert len(set(keys)) == len(keys)
    assert emoji_ko.group_key("👍🏽") == "1f44d"
    assert emoji_ko.emoji_id("👍🏽") == "1f44d-1f3fd"


def test_split_is_a_stable_function_of_the_group():
    assert emoji_ko.split_of("1f436") == emoji_ko.split_of("1f436")
    counts = {s: 0 for s in ("train", "val", "test")}
    for i in range(2000):
        counts[emoji_ko.split_of(f"g{i}")] += 1
    assert 0.75 < counts["train"] / 2000 < 0.85 and counts["val"] > 140 and counts["test"] > 140


def test_candidates_have_korean_captions():
    _require_emoji()
    items = emoji_ko.candidates()
    assert len(items) > 3500
    assert dict(items)["🐶"] == "강아지 얼굴"
    captions = {text: emoji_cldr.captions(text, name) for text, name in items}
    # The label (the emoji package's Korean name) first, then the CLDR keywords from emojibase-data.
    assert captions["🐶"] == ("강아지 얼굴", "강아지", "개", "개띠", "동물", "사랑스러운", "애완동물")
    assert captions["🍎"][0] == "빨간 사과"
    assert {"사과", "과일", "음식"} <= set(captions["🍎"])
    assert {"고양이", "동물"} <= set(captions["🐱"]) and captions["🐱"][0] == "고양이 얼굴"
    assert captions["🇧🇹"] == ("깃발 부탄", "BT", "깃발")  # the CLDR label `깃발: 부탄` normalised is the name
    # A skin-tone variant has its own label and its base's label and keywords.
    assert captions["👋🏽"][0] == "흔드는 손 갈색 피부" and {"흔드는 손", "안녕"} <= set(captions["👋🏽"])
    assert "키 캡" in captions["#️⃣"]  # code points with leading zeros (U+0023) are found too
    labels = [c[0] for c in captions.values()]
    assert sum(bool(HANGUL.search(c)) for c in labels) / len(labels) > 0.99
    assert sum(len(c) > 1 for c in captions.values()) / len(captions) > 0.9  # 93%: some ZWJ variants have none
    assert all(len(set(c)) == len(c) for c in captions.values())
    assert not any(":" in c or "_" in c for cs in captions.values() for c in cs)


def test_shipped_cldr_table_is_whole_and_licensed():
    meta, rows = emoji_cldr.table()
    assert meta["emoji"] == len(rows) > 1900 and "emojibase-data" in meta["source"]
    assert sum(bool(HANGUL.search(row["label"])) for row in rows.values()) >= len(rows) - 2  # ATM, DNA
    assert sum(bool(row["tags"]) for row in rows.values()) / len(rows) > 0.98
    assert rows["1f431"]["label"] == "고양이 얼굴" and "새끼 고양이" in rows["1f431"]["tags"]
    assert all("fe0f" not in key and not key.startswith("0") for key in rows)
    licence = os.path.join(os.path.dirname(emoji_cldr.DATA_PATH), "emoji_cldr_ko.LICENSE")
    assert "MIT License" in open(licence, encoding="utf-8").read()
    assert emoji_cldr.entry("🫠") is not None and emoji_cldr.entry("x") is None


# --- emoji-ko: a small build ----------------------------------------------------------------

def _require_build_deps():
    _require_emoji()
    if not os.path.isfile(emoji_ko.FONT_PATH):
        pytest.skip(f"no emoji font at {emoji_ko.FONT_PATH}: {emoji_ko.FONT_INSTALL}")


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    _require_build_deps()
    out = str(tmp_path_factory.mktemp("emoji-ko"))
    info = emoji_ko.build_emoji_ko(out, size=SIZE, limit=LIMIT, workers=1)
    return out, info


def test_small_build_counts_add_up(small_build):
    out, info = small_build
    c = info["counts"]
    assert c["candidates"] == LIMIT
    assert c["rendered"] + sum(c["skipped"].values()) == LIMIT
    records = read_manifest(os.path.join(out, "manifest.jsonl"))
    assert len(records) == c["rendered"] > 0.9 * LIMIT
    assert sum(c["splits"].values()) == len(records)
    assert c["groups"] == len({r.group for r in records})
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(f"{r.id}.png" for r in records)


def test_small_build_images_decode_at_the_declared_size_and_are_not_blank(small_build):
    out, _ = small_build
    for record in read_manifest(os.path.join(out, "manifest.jsonl")):
        assert record.uri == os.path.join(out, "images", f"{record.id}.png")
        image = open_image(record.uri)
        assert image.size == (SIZE, SIZE)
        pixels = np.asarray(image)
        assert pixels.min() < 200, record  # some ink on the white background
        assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all(), record  # white corners


def test_small_build_captions_are_the_korean_names(small_build):
    out, _ = small_build
    names = dict(emoji_ko.candidates())
    for record in read_manifest(os.path.join(out, "manifest.jsonl")):
        text = record.extra["emoji"]
        assert record.captions == emoji_cldr.captions(text, names[text]) and record.captions[0] == names[text]
        assert HANGUL.search(record.captions[0]), record
        assert record.id == emoji_ko.emoji_id(record.extra["emoji"])


def test_small_build_groups_stay_in_one_split_and_variants_share_a_group(small_build):
    out, _ = small_build
    records = read_manifest(os.path.join(out, "manifest.jsonl"))
    split_of_group: dict[str, set] = {}
    for r in records:
        split_of_group.setdefault(r.group, set()).add(r.split)
        assert r.split == emoji_ko.split_of(r.group)
    assert all(len(splits) == 1 for splits in split_of_group.values())
    # The sample holds skin-tone (and gender) variants, each in its base emoji's group.
    by_emoji = {r.extra["emoji"]: r for r in records}
    toned = [e for e in by_emoji if any(0x1F3FB <= ord(ch) <= 0x1F3FF for ch in e)]
    assert len(toned) >= 5
    for e in toned:
        base = "".join(ch for ch in e if not 0x1F3FB <= ord(ch) <= 0x1F3FF)
        base = base if base in by_emoji else base + "\ufe0f"
        if base in by_emoji:
            assert by_emoji[e].group == by_emoji[base].group, (e, base)
    assert max(len([r for r in records if r.group == g]) for g in split_of_group) >= 6

    # The per-split files hold exactly the manifest's records of that split.
    for split in ("train", "val", "test"):
        ids = [r.id for r in read_manifest(os.path.join(out, f"{split}.jsonl"))]
        assert ids == [r.id for r in records if r.split == split]
        assert ids == [r.id for r in read_manifest(os.path.join(out, "manifest.jsonl"), split=split)]


def test_build_is_deterministic_and_idempotent(small_build, tmp_path):
    out, info = small_build
    names = ["manifest.jsonl", "train.jsonl", "val.jsonl", "test.jsonl"]
    before = {n: open(os.path.join(out, n), "rb").read() for n in names}
    image = os.path.join(out, "images", sorted(os.listdir(os.path.join(out, "images")))[0])
    image_bytes = open(image, "rb").read()

    other = str(tmp_path / "again")
    again = emoji_ko.build_emoji_ko(other, size=SIZE, limit=LIMIT, workers=1)
    assert again["counts"] == info["counts"]
    for n in names:
        assert open(os.path.join(other, n), "rb").read() == before[n], n
    assert open(os.path.join(other, "images", os.path.basename(image)), "rb").read() == image_bytes

    # Rebuilding into the same folder with fewer emoji leaves no stale image behind.
    emoji_ko.build_emoji_ko(other, size=SIZE, limit=10, workers=1)
    records = read_manifest(os.path.join(other, "manifest.jsonl"))
    assert sorted(os.listdir(os.path.join(other, "images"))) == sorted(f"{r.id}.png" for r in records)
    assert len(records) <= 10


def test_ensure_reuses_a_complete_build_and_repairs_an_incomplete_one(small_build, tmp_path):
    _require_build_deps()
    out = str(tmp_path / "ensure")
    manifest = emoji_ko.ensure_emoji_ko(out, size=SIZE, limit=20)
    assert manifest == os.path.join(out, "manifest.jsonl")
    stamp = os.stat(manifest).st_mtime_ns
    assert emoji_ko.ensure_emoji_ko(out, size=SIZE, limit=20) == manifest
    assert os.stat(manifest).st_mtime_ns == stamp  # reused, not rebuilt

    victim = read_manifest(manifest)[0].uri
    os.remove(victim)
    assert not emoji_ko.is_complete(out, SIZE, 20)
    emoji_ko.ensure_emoji_ko(out, size=SIZE, limit=20)
    assert os.path.isfile(victim) and emoji_ko.is_complete(out, SIZE, 20)
    assert not emoji_ko.is_complete(out, SIZE + 1, 20)  # another size is another build


def test_cli_prints_counts(tmp_path, capsys):
    _require_build_deps()
    assert emoji_ko.main([str(tmp_path / "cli"), "--limit", "12", "--size", "32", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for word in ("rendered:", "skipped:", "missing_glyph", "train", "val", "test", "groups:"):
        assert word in printed
    assert (tmp_path / "cli" / "manifest.jsonl").is_file()


def test_cli_help():
    with pytest.raises(SystemExit) as info:
        emoji_ko.main(["--help"])
    assert info.value.code == 0


def test_missing_font_is_one_clear_line(tmp_path, capsys):
    _require_emoji()
    code = emoji_ko.main([str(tmp_path / "x"), "--font", str(tmp_path / "NoSuchFont.ttf")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "apt-get install fonts-noto-color-emoji" in err


def test_missing_emoji_package_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "emoji", None)  # import emoji -> ImportError
    code = emoji_ko.main([str(tmp_path / "x"), "--limit", "3"])
    err = capsys.readouterr().err
    if os.path.isfile(emoji_ko.FONT_PATH):
        assert code == 2
        assert err.count("\n") == 1 and "pip install emoji" in err
    else:
        assert code == 2 and "fonts-noto-color-emoji" in err


def test_skipped_emoji_are_counted_by_reason():
    _require_build_deps()
    font = emoji_ko.load_font()
    image, reason = emoji_ko.render("🐶", font, SIZE)
    assert reason is None and image.size == (SIZE, SIZE)
    assert emoji_ko.render("\U0010FFFD", font, SIZE) == (None, "missing_glyph")  # no glyph in the font
    assert emoji_ko.render("🐶🐱", font, SIZE) == (None, "not_one_glyph")  # two glyphs side by side


# --- Korean vocabulary ----------------------------------------------------------------------

def test_clean_line_keeps_hangul_and_ascii_words():
    from koclip.data.korean_vocab import clean_line

    assert clean_line("대한민국 憲法 제1조 ①") == "대한민국 제1조"
    assert clean_line("only english") == ""
    assert clean_line("소파   위에\t고양이") == "소파 위에 고양이"


def test_korean_tokenizer_on_a_small_corpus(tmp_path):
    _require_emoji()
    from koclip.data.korean_vocab import INFO_NAME, build_korean_tokenizer, caption_stats
    from koclip.processing import load_tokenizer

    out = str(tmp_path / "tok")
    tokenizer = build_korean_tokenizer(out, vocab_size=1500, sources=("kolaw", "emoji"))
    tokens = tokenizer.tokenize("강아지 얼굴")
    assert tokens and "[UNK]" not in tokens
    ids = tokenizer("강아지 얼굴")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) <= 1500

    with open(os.path.join(out, INFO_NAME), encoding="utf-8") as f:
        info = json.load(f)
    assert info["sources"] == ["kolaw", "emoji"] and info["corpus"]["kolaw"]["lines"] > 100
    stamp = os.stat(os.path.join(out, "tokenizer.json")).st_mtime_ns
    again = build_korean_tokenizer(out, vocab_size=1500, sources=("kolaw", "emoji"))
    assert os.stat(os.path.join(out, "tokenizer.json")).st_mtime_ns == stamp  # reused
    assert again.tokenize("강아지 얼굴") == tokens
    assert load_tokenizer(out).tokenize("빨간 사과") == tokenizer.tokenize("빨간 사과")

    stats = caption_stats(tokenizer, [c for _, c in emoji_ko.candidates()[:200]])
    assert stats["unk_rate"] == 0.0 and 1 <= stats["tokens_per_caption"] < 20


def test_korean_corpus_sources_read():
    from koclip.data.korean_vocab import korean_corpus

    corpus = korean_corpus(("kolaw", "okt_chunks", "kkma_morph"))
    assert any("대한민국" in line for line in corpus["kolaw"])
    assert len(corpus["okt_chunks"]) > 10_000
    assert len(corpus["kkma_morph"]) > 10_000
    with pytest.raises(UsageError, match="unknown corpus source"):
        korean_corpus(("nope",))


def test_csv_errors_name_the_line_a_record_starts_on(tmp_path):
    """A quoted caption may span lines and blank lines are skipped: the line is the file's."""
    path = tmp_path / "manifest.csv"
    path.write_text('id,image,captions,split\na,a.png,"두 줄\n캡션",train\n\n'
                    'b,b.png,,train\nc,c.png,"x, y",val,extra\n', encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert [e.split(": ", 1)[0] for e in info.value.errors] == [f"{path}:5", f"{path}:6"]
    assert "no caption" in info.value.errors[0] and "5 fields, the header has 4" in info.value.errors[1]
