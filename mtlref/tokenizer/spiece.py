"""SentencePiece: LLaMA's tokenizer.model and T5's spiece.model (with its 100 <extra_id_N>
sentinels), both through the sentencepiece library."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import sentencepiece as spm

from mtlref.tokenizer.base import Tokenizer, TokenizerError


def _load_sp(file: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{file}: not a readable SentencePiece model ({e}); download it again") from None


# ---------------------------------------------------------------- LLaMA SentencePiece
class LlamaTokenizer(Tokenizer):
    """encode(text) gives the SentencePiece pieces WITHOUT BOS, exactly sp.encode(text); callers
    prepend `bos_id` (or pass bos=True). pad_id is the model's pad piece, None for LLaMA (-1 in
    the model): batches are then padded with 0 and the attention mask hides the padding.
    decode is sp.decode: control pieces (<s>, </s>) render as nothing.
    Pairs follow Hugging Face's LLaMA template: <s> a <s> b, token types 0 then 1."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        self.sp = _load_sp(self.file)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None
                                                 for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()))

    def content_ids(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def with_specials(self, a, b):
        head = [] if self.bos_id is None else [self.bos_id]
        ids, types = head + a, [0] * (len(head) + len(a))
        if b is not None:
            ids, types = ids + head + b, types + [1] * (len(head) + len(b))
        return ids, types

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.sp.decode([int(i) for i in ids])


# ---------------------------------------------------------------- T5 SentencePiece
class T5Tokenizer(Tokenizer):
    """encode(text) = sp.encode(text) + [eos] as Hugging Face's T5 tokenizer; pad 0, eos 1, no BOS.
    The 100 sentinels sit after the SentencePiece pieces in reverse: <extra_id_N> = vocab_size-1-N
    (32099 ... 32000, vocab_size 32100). encode splits the text around "<extra_id_N>" and encodes
    each stretch with sp.encode; decode writes a sentinel with a space before it unless it starts the
    text, and a stretch after it with the space its first piece's "▁" stands for, so
    "Hello <extra_id_0> world" round-trips. Pairs: a </s> b </s>, token types all 0 (as HF)."""
    NUM_SENTINELS = 100
    _SENTINEL = re.compile(r"<extra_id_([1-9]?[0-9])>")

    def __init__(self, file: str | Path):
        self.file = Path(file)
        self.sp = _load_sp(self.file)
        self.num_pieces = self.sp.get_piece_size()
        self.vocab_size = self.num_pieces + self.NUM_SENTINELS
        self.bos_id, self.eos_id, self.pad_id = None, self.sp.eos_id(), self.sp.pad_id()

    def sentinel_id(self, n: int) -> int:
        return self.vocab_size - 1 - n

    def content_ids(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in self._SENTINEL.finditer(text):
            ids += self.sp.encode(text[pos:m.start()])
            ids.append(self.sentinel_id(int(m.group(1))))
            pos = m.end()
        return ids + self.sp.encode(text[pos:])

    def with_specials(self, a, b):
        ids = a + [self.eos_id] + ([] if b is None else b + [self.eos_id])
        return ids, [0] * len(ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = ""
        for is_sentinel, group in itertools.groupby(map(int, ids), key=lambda i: i >= self.num_pieces):
            if is_sentinel:
                for i in group:
                    if not skip_special_tokens:
                        out += (" " if out and not out.endswith(" ") else "") + f"<extra_id_{self.vocab_size - 1 - i}>"
                continue
            pieces = [i for i in group if not self.sp.is_control(i)]
            if pieces:
                space = " " if out and self.sp.id_to_piece(pieces[0]).startswith("▁") else ""
                out += space + self.sp.decode(pieces)
        return out
