"""Text -> token ids for the four formats the backbones ship, written out by hand.

    load_tokenizer(dir) picks the format by the files present, in this order:
        tokenizer.model   LLaMA SentencePiece      (sentencepiece library)
        spiece.model      T5 SentencePiece + 100 <extra_id_N> sentinels
        vocab.txt         BERT WordPiece (MiniLM), BasicTokenizer + greedy longest match
        tokenizer.json    byte-level BPE (GPT-2 / GPT-NeoX / MPT-7B), model.type "BPE"

Every tokenizer has the surface of mtlref/tokenizer/base.py (encode, decode, encode_pair, the
special ids); the formats live in spiece.py (LLaMA and T5 SentencePiece), wordpiece.py (BERT) and
bpe.py (byte-level BPE); this module chooses among them.

The references are Hugging Face's fast tokenizers (the `tokenizers` library) for WordPiece and
BPE, and the sentencepiece library itself for LLaMA and T5; tests compare against both.
"""
from __future__ import annotations

import json
from pathlib import Path

from mtlref.tokenizer.base import Tokenizer, TokenizerError, truncate_pair
from mtlref.tokenizer.bpe import ByteLevelBPETokenizer, gpt2_split
from mtlref.tokenizer.spiece import LlamaTokenizer, T5Tokenizer
from mtlref.tokenizer.wordpiece import WordPieceTokenizer

__all__ = ["ByteLevelBPETokenizer", "LlamaTokenizer", "T5Tokenizer", "Tokenizer", "TokenizerError",
           "WordPieceTokenizer", "gpt2_split", "load_tokenizer", "truncate_pair"]


# ---------------------------------------------------------------- choosing by the files present
def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: not valid JSON ({e})") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A model or tokenizer directory -> its tokenizer, by the first file present of
    tokenizer.model (LLaMA), spiece.model (T5), vocab.txt (WordPiece), tokenizer.json (BPE)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a directory; pass the model or tokenizer directory that holds "
                             "tokenizer.model, spiece.model, vocab.txt or tokenizer.json")
    config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    if (path / "tokenizer.model").is_file():
        return LlamaTokenizer(path / "tokenizer.model")
    if (path / "spiece.model").is_file():
        return T5Tokenizer(path / "spiece.model")
    if (path / "vocab.txt").is_file():
        return WordPieceTokenizer(path / "vocab.txt", do_lower_case=config.get("do_lower_case", True),
                                  strip_accents=config.get("strip_accents"),
                                  tokenize_chinese_chars=config.get("tokenize_chinese_chars", True))
    if (path / "tokenizer.json").is_file():
        return ByteLevelBPETokenizer(path / "tokenizer.json", special_tokens=config)
    raise TokenizerError(f"{path}: no tokenizer file; expected one of tokenizer.model (LLaMA SentencePiece), "
                         "spiece.model (T5 SentencePiece), vocab.txt (BERT WordPiece) or tokenizer.json "
                         "(byte-level BPE), as shipped with the model")
