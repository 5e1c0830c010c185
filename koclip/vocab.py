"""Train a WordPiece vocabulary offline and wrap it as a transformers tokenizer.

BERT-style special tokens and post-processing ([CLS] text [SEP]), so the tokenizer feeds our
BERT/RoBERTa encoders unchanged. Accents are NOT stripped: stripping decomposes Hangul
syllables into jamo.
"""
from __future__ import annotations

import string
from typing import Iterable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# A few lines to give tiny random-init demo models a real, if small, Korean/English vocabulary.
TINY_CORPUS = [
    "소파 위에 고양이", "빨간 사과", "강아지 얼굴", "벚꽃이 핀 나무", "하늘을 나는 비행기",
    "이것은 고양이 이다.", "이것은 강아지 이다.", "이것은 사과 이다.", "바다 위의 배", "웃는 얼굴",
    "a cat on the sofa", "a red apple", "a dog's face", "cherry blossom", "an airplane in the sky",
]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1):
    """Returns a transformers.PreTrainedTokenizerFast with at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=False, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False,
                                        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation))
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
