"""Byte-level BPE from a tokenizer.json (GPT-2 / GPT-NeoX / MPT-7B), model.type "BPE"."""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path

from mtlref.tokenizer.base import Tokenizer, TokenizerError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: the 188 printable Latin-1 bytes map to
    themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) to U+0100, U+0101, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@functools.lru_cache(maxsize=None)
def _gpt2_kind(ch: str) -> str:
    """The classes of GPT-2's split regex under Oniguruma: "L" (\\p{L}), "N" (\\p{N}),
    "S" (\\s: tab..CR, U+0085, Z*), "O" (anything else)."""
    if "\t" <= ch <= "\r" or ch == "\x85":
        return "S"
    cat = unicodedata.category(ch)[0]
    return {"L": "L", "N": "N", "Z": "S"}.get(cat, "O")


def gpt2_split(text: str) -> list[str]:
    """A scanner equivalent to the ByteLevel pre-tokenizer's regex
        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    (Python's `re` has no \\p{L}); alternatives are tried in that order at each position."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith(("'s", "'t", "'m", "'d"), i):
            j = i + 2
        elif text.startswith(("'re", "'ve", "'ll"), i):
            j = i + 3
        else:
            kind = _gpt2_kind(text[i])
            j = i + 1 if text[i] == " " and i + 1 < n and _gpt2_kind(text[i + 1]) != "S" else i
            if j > i or kind != "S":  # " ?\p{L}+", " ?\p{N}+" or " ?[^\s\p{L}\p{N}]+"
                kind = _gpt2_kind(text[j])
                while j < n and _gpt2_kind(text[j]) == kind:
                    j += 1
            else:  # a whitespace run: all of it at the end of text, else leave its last char
                while j < n and _gpt2_kind(text[j]) == "S":
                    j += 1
                if j < n and j - i >= 2:
                    j -= 1
        out.append(text[i:j])
        i = j
    return out


def _token_content(tok) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


class ByteLevelBPETokenizer(Tokenizer):
    """tokenizer.json with model.type "BPE" and the ByteLevel pre-tokenizer (GPT-2, GPT-NeoX, MPT).
    Text -> split out added tokens (those with normalized=false on the raw text, the others after
    normalization) -> normalizer (NFC/NFD/NFKC/NFKD or none) -> GPT-2 split -> UTF-8 bytes through
    the byte map -> merges by rank. decode maps characters back to bytes (an added token whose
    characters are outside the map contributes its UTF-8) and decodes with replacement.
    encode adds no special tokens (no post-processor template), nor do pairs: a b, types 0/1.
    bos/eos/pad come from tokenizer_config.json or special_tokens_map.json when present, else
    bos = eos = "<|endoftext|>" if it is an added token, pad None."""

    def __init__(self, file: str | Path, special_tokens: dict | None = None):
        self.file = Path(file)
        try:
            spec = json.loads(self.file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{self.file}: not valid JSON ({e}); download it again") from None
        model = spec.get("model", {})
        self._check(model.get("type") == "BPE", f"model.type is {model.get('type')!r}, expected 'BPE'")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            self._check(not model.get(key), f"model.{key}={model.get(key)!r} is not supported "
                        "(byte-level BPE has none)")
        self._check(not model.get("byte_fallback"), "model.byte_fallback is not supported")
        pre = spec.get("pre_tokenizer") or {}
        self._check(pre.get("type") == "ByteLevel", f"pre_tokenizer {pre.get('type')!r} is not supported; "
                    "mtlref reads the ByteLevel pre-tokenizer of GPT-2/GPT-NeoX/MPT")
        self.add_prefix_space, self.use_regex = pre.get("add_prefix_space", False), pre.get("use_regex", True)
        norm = (spec.get("normalizer") or {}).get("type")
        self._check(norm in (None, "NFC", "NFD", "NFKC", "NFKD"), f"normalizer {norm!r} is not supported")
        self.normal_form = norm
        dec = (spec.get("decoder") or {}).get("type")
        self._check(dec in (None, "ByteLevel"), f"decoder {dec!r} is not supported")
        post = (spec.get("post_processor") or {}).get("type")
        self._check(post in (None, "ByteLevel"), f"post_processor {post!r} is not supported")

        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.ignore_merges = model.get("ignore_merges", False)
        self.byte_map = bytes_to_unicode()
        self.byte_unmap = {c: b for b, c in self.byte_map.items()}

        added = spec.get("added_tokens", [])
        for t in added:
            self._check(not t.get("single_word"), f"added token {t['content']!r}: single_word is not supported")
        self.added = {t["content"]: t["id"] for t in added}
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self._raw_re = self._added_regex([t for t in added if not t.get("normalized")])
        self._normalized_re = self._added_regex([t for t in added if t.get("normalized")])
        self.inv_vocab = {i: t for t, i in self.vocab.items()} | {i: t for t, i in self.added.items()}
        self.vocab_size = max(self.inv_vocab) + 1

        names = special_tokens or {}
        if not any(names.get(k) for k in ("bos_token", "eos_token", "pad_token")) and "<|endoftext|>" in self.added:
            names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
        self.bos_id, self.eos_id, self.pad_id = (self._id_of(_token_content(names.get(k)))
                                                 for k in ("bos_token", "eos_token", "pad_token"))
        self._cache: dict[str, list[int]] = {}

    def _check(self, ok: bool, what: str):
        if not ok:
            raise TokenizerError(f"{self.file}: {what}")

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token not in self.added and token not in self.vocab:
            raise TokenizerError(f"{self.file}: special token {token!r} (from tokenizer_config.json) "
                                 "is neither in model.vocab nor in added_tokens")
        return self.added.get(token, self.vocab.get(token))

    @staticmethod
    def _added_regex(tokens: list[dict]):
        """Leftmost-longest over the added tokens: alternatives longest first, one group each;
        lstrip/rstrip take the whitespace next to the token into it."""
        if not tokens:
            return None
        tokens = sorted(tokens, key=lambda t: -len(t["content"]))
        alts = [(r"\s*" if t.get("lstrip") else "") + f"({re.escape(t['content'])})"
                + (r"\s*" if t.get("rstrip") else "") for t in tokens]
        return re.compile("|".join(alts)), [t["id"] for t in tokens]

    @staticmethod
    def _split_added(text: str, compiled) -> list[str | int]:
        """-> stretches of text (str) and added-token ids (int), in order."""
        if compiled is None:
            return [text] if text else []
        pattern, ids = compiled
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(ids[m.lastindex - 1])
            pos = m.end()
        return out + ([text[pos:]] if pos < len(text) else [])

    def bpe(self, word: str) -> list[int]:
        """One pre-token (already byte-mapped) -> ids: merge the lowest-ranked adjacent pair,
        every occurrence left to right, until no pair has a rank."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if self.ignore_merges and word in self.vocab:
            symbols = [word]
        else:
            symbols = list(word)
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, len(self.ranks)), p) for p in zip(symbols, symbols[1:])]
            rank, best = min(pairs)
            if rank == len(self.ranks):
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        try:
            ids = [self.vocab[s] for s in symbols]
        except KeyError as e:
            raise TokenizerError(f"{self.file}: symbol {e.args[0]!r} is not in model.vocab; "
                                 "a byte-level vocabulary holds all 256 byte characters") from None
        if len(self._cache) > 1 << 20:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def content_ids(self, text: str) -> list[int]:
        ids = []
        for raw in self._split_added(text, self._raw_re):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            normed = unicodedata.normalize(self.normal_form, raw) if self.normal_form else raw
            for part in self._split_added(normed, self._normalized_re):
                if isinstance(part, int):
                    ids.append(part)
                    continue
                if self.add_prefix_space and not part.startswith(" "):
                    part = " " + part
                for word in (gpt2_split(part) if self.use_regex else [part]):
                    ids.extend(self.bpe("".join(self.byte_map[b] for b in word.encode("utf-8"))))
        return ids

    def with_specials(self, a, b):
        return a + (b or []), [0] * len(a) + [1] * len(b or [])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in map(int, ids):
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.inv_vocab[i]
            if all(c in self.byte_unmap for c in token):
                out.extend(self.byte_unmap[c] for c in token)
            else:
                out.extend(token.encode("utf-8"))
        return out.decode("utf-8", errors="replace")
