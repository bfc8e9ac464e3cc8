"""BERT WordPiece (MiniLM's vocab.txt): BasicTokenizer, then greedy longest match."""
from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

from mtlref.tokenizer.base import Tokenizer, TokenizerError


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@functools.lru_cache(maxsize=None)
def _bert_kind(ch: str) -> str:
    """BERT's character classes: "drop" (NUL, U+FFFD, any C* category; not tab/newline/CR),
    "space" (tab, newline, CR, Z*), "cjk" (the CJK ideograph blocks), "punct" (ASCII punctuation,
    P*), else "char"."""
    if ch in "\t\n\r":
        return "space"
    cat = unicodedata.category(ch)
    if ch in "\x00\ufffd" or cat[0] == "C":
        return "drop"
    if cat[0] == "Z":
        return "space"
    if any(lo <= ord(ch) <= hi for lo, hi in _CJK):
        return "cjk"
    if cat[0] == "P" or (ch.isascii() and not ch.isalnum()):
        return "punct"
    return "char"


_ASCII_CONTROL = {c: None for c in (*range(32), 127) if chr(c) not in "\t\n\r"}
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


class WordPieceTokenizer(Tokenizer):
    """BERT: BasicTokenizer (clean text, isolate CJK ideographs, strip accents and lower-case when
    uncased, split on whitespace and punctuation) then greedy longest-match-first WordPiece with
    "##" continuations; a word over 100 characters, or one no split covers, is [UNK].
    Accents are stripped as the fast tokenizer does: NFD, then drop every mark (M*).
    encode(text) = [CLS] ... [SEP] as BertTokenizerFast; pairs [CLS] a [SEP] b [SEP], types 0/1.
    The special tokens written literally in text ("[MASK]") are recognised, as Hugging Face does.
    bos_id/eos_id are None; cls_id, sep_id, mask_id, unk_id are named."""
    MAX_WORD_CHARS = 100
    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: str | Path, do_lower_case: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True):
        self.file = Path(vocab_file)
        with open(self.file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise TokenizerError(f"{self.file}: no {missing} line; a BERT vocab.txt holds one token per line "
                                 "including [PAD] [UNK] [CLS] [SEP] [MASK]")
        self.lower = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.chinese = tokenize_chinese_chars
        self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]"))
        self.pad_id, self.mask_id = self.vocab.get("[PAD]"), self.vocab.get("[MASK]")
        self.vocab_size = len(self.vocab)
        self.special_ids = {self.vocab[t] for t in self.SPECIALS if t in self.vocab}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIALS if t in self.vocab) + ")")
        self._cache: dict[str, list[int]] = {}

    def basic_tokenize(self, text: str) -> list[str]:
        if text.isascii():  # fast path, same result as basic_tokenize_unicode (a test checks)
            text = text.translate(_ASCII_CONTROL)
            return _ASCII_WORDS.findall(text.lower() if self.lower else text)
        return self.basic_tokenize_unicode(text)

    def basic_tokenize_unicode(self, text: str) -> list[str]:
        # BertNormalizer: clean text, pad CJK with spaces, strip accents, lower-case (in this order)
        out = []
        for ch in text:
            kind = _bert_kind(ch)
            if kind != "drop":
                out.append(" " if kind == "space" else f" {ch} " if kind == "cjk" and self.chinese else ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c)[0] != "M")
        if self.lower:  # per character, as Rust's char::to_lowercase (no final-sigma rule)
            text = text.lower() if "Σ" not in text else "".join(c.lower() for c in text)
        # BertPreTokenizer: split on whitespace, each punctuation character on its own
        words, word = [], []
        for ch in text:
            kind = _bert_kind(ch)
            if kind == "space" or kind == "punct":
                if word:
                    words.append("".join(word))
                    word = []
                if kind == "punct":
                    words.append(ch)
            else:
                word.append(ch)
        if word:
            words.append("".join(word))
        return words

    def wordpiece(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = (len(word) <= self.MAX_WORD_CHARS and self._longest_match_first(word)) or [self.unk_id]
            if len(self._cache) > 1 << 20:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _longest_match_first(self, word: str) -> list[int] | None:
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return None  # no piece covers word[start:]
        return ids

    def content_ids(self, text: str) -> list[int]:
        parts = self._special_re.split(text) if "[" in text else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # a captured special token
                ids.append(self.vocab[part])
            else:
                for word in self.basic_tokenize(part):
                    ids.extend(self.wordpiece(word))
        return ids

    def with_specials(self, a, b):
        ids, types = [self.cls_id] + a + [self.sep_id], [0] * (len(a) + 2)
        if b is not None:
            ids, types = ids + b + [self.sep_id], types + [1] * (len(b) + 1)
        return ids, types

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Join with spaces, glue "##" continuations, then the cleanup BERT's decoder does
        (" ." -> ".", " n't" -> "n't", ...)."""
        tokens = [self.inv_vocab[int(i)] for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        text = " ".join(tokens).replace(" ##", "")
        for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(old, new)
        return text
