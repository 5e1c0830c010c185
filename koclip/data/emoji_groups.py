"""emoji-ko's group keys and splits: every variant of one base emoji (skin tones, genders,
hair) gets the same group key, and a group's split depends on nothing but its key, so test
emoji and their variants are never trained on (koclip.data.emoji_ko's docstring has the rules).
"""
from __future__ import annotations

import hashlib

SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.9), ("test", 1.0))
ZWJ = 0x200D
_DROP = {0xFE0E, 0xFE0F} | set(range(0x1F3FB, 0x1F400))
_VARYING_PARTS = {0x2640, 0x2642} | set(range(0x1F9B0, 0x1F9B4))
_ARROW_RIGHT = 0x27A1
PERSON, CHILD = 0x1F9D1, 0x1F9D2
_SINGLE = {
    0x1F468: (PERSON,), 0x1F469: (PERSON,),  # man, woman -> person
    0x1F466: (CHILD,), 0x1F467: (CHILD,),  # boy, girl -> child
    0x1F474: (0x1F9D3,), 0x1F475: (0x1F9D3,),  # old man, old woman -> older person
    0x1F934: (0x1FAC5,), 0x1F478: (0x1FAC5,),  # prince, princess -> person with crown
    0x1F930: (0x1FAC4,), 0x1FAC3: (0x1FAC4,),  # pregnant woman, pregnant man -> pregnant person
    0x1F385: (PERSON, 0x1F384), 0x1F936: (PERSON, 0x1F384),  # Santa, Mrs. Claus -> Mx Claus
    0x1F57A: (0x1F483,),  # man dancing -> (woman) dancing
    0x1F46B: (PERSON, 0x1F91D, PERSON), 0x1F46C: (PERSON, 0x1F91D, PERSON),  # holding hands
    0x1F46D: (PERSON, 0x1F91D, PERSON),
}
_SEQUENCES = {
    (PERSON, 0x2764, 0x1F48B, PERSON): (0x1F48F,),  # kiss
    (PERSON, 0x2764, PERSON): (0x1F491,),  # couple with heart
    (0x1FAF1, 0x1FAF2): (0x1F91D,),  # handshake with two skin tones
    (PERSON, 0x1F430, PERSON): (0x1F46F,),  # people with bunny ears, per-person skin tones
    (PERSON, 0x1FAEF, PERSON): (0x1F93C,),  # people wrestling, per-person skin tones
}


def _parts(text: str) -> list[tuple[int, ...]]:
    parts, current = [], []
    for ch in text:
        cp = ord(ch)
        if cp == ZWJ:
            parts.append(tuple(current))
            current = []
        elif cp not in _DROP:
            current.append(cp)
    parts.append(tuple(current))
    return [p for p in parts if p]


def group_key(text: str) -> str:
    """The group of an emoji: its base with skin tone, gender, hair, direction and VS removed."""
    parts = _parts(text)
    if len(parts) > 1:
        parts = [p for p in parts if not (len(p) == 1 and p[0] in _VARYING_PARTS)]
        if len(parts) > 1 and parts[-1] == (_ARROW_RIGHT,):
            parts = parts[:-1]
    mapped: list[tuple[int, ...]] = []
    for part in parts:
        if len(part) == 1 and part[0] in _SINGLE:
            mapped.extend((cp,) for cp in _SINGLE[part[0]])
        else:
            mapped.append(part)
    if all(len(p) == 1 for p in mapped):
        singles = tuple(p[0] for p in mapped)
        if singles in _SEQUENCES:
            mapped = [(cp,) for cp in _SEQUENCES[singles]]
        elif len(singles) >= 2 and set(singles) <= {PERSON, CHILD}:
            mapped = [(0x1F46A,)]  # family: any mix of adults and children
    return "-200d-".join("-".join(f"{cp:x}" for cp in part) for part in mapped)


def emoji_id(text: str) -> str:
    return "-".join(f"{ord(ch):x}" for ch in text)


def split_of(group: str) -> str:
    digest = hashlib.sha256(f"emoji-ko/{group}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return next(name for name, upper in SPLIT_FRACTIONS if fraction < upper)


def caption_of(korean_name: str) -> str:
    return " ".join(korean_name.strip().strip(":").replace("_", " ").split())
