"""The surface every tokenizer shares, and the error they raise.

    encode(text) -> list[int]          the ids the format adds by default (see each class)
    decode(ids, skip_special_tokens=False) -> str
    encode_pair(text, text_pair=None, max_length=None) -> {input_ids, token_type_ids, attention_mask}
        (also reachable as tok(text, text_pair, max_length)); special tokens follow the Hugging
        Face template of each format; max_length truncates "longest_first" (see truncate_pair)
    bos_id, eos_id, pad_id (None where the format has none), vocab_size
"""
from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer directory or file that cannot be read; the message names the file and the fix."""


def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Transformers' "longest_first": drop the last token of the longer sequence, one at a time,
    until len(a) + len(b) <= budget; on a tie the second sequence loses (so with an odd budget the
    first keeps the extra token; the Rust fast tokenizer gives it to the longer one instead)."""
    if b is None:
        return a[:budget], None
    n_a, n_b = len(a), len(b)
    while n_a + n_b > budget:
        if n_a > n_b:
            n_a -= 1
        else:
            n_b -= 1
    return a[:n_a], b[:n_b]


class Tokenizer:
    """The shared surface. A format implements `content_ids` (text -> ids, no special tokens),
    `with_specials` (its template around one or two sequences), `encode` and `decode`."""
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    vocab_size: int

    def content_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def with_specials(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int]]:
        """-> (input_ids, token_type_ids) for one sequence or a pair."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.with_specials(self.content_ids(text), None)[0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def encode_pair(self, text: str, text_pair: str | None = None, max_length: int | None = None) -> dict:
        a = self.content_ids(text)
        b = None if text_pair is None else self.content_ids(text_pair)
        if max_length is not None:
            n_special = len(self.with_specials([], None if b is None else [])[0])
            if max_length < n_special:
                raise ValueError(f"max_length={max_length} leaves no room: {type(self).__name__} "
                                 f"adds {n_special} special tokens here; use max_length >= {n_special}")
            a, b = truncate_pair(a, b, max_length - n_special)
        ids, types = self.with_specials(a, b)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids)}

    def __call__(self, text: str, text_pair: str | None = None, max_length: int | None = None) -> dict:
        return self.encode_pair(text, text_pair, max_length)
