"""Tokenizers against their references: the fixtures written by Hugging Face's fast tokenizers
(WordPiece, byte-level BPE) and the sentencepiece library itself (LLaMA, T5) on real GLUE text."""
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import need, need_minilm
from mtlref.tokenizer import (ByteLevelBPETokenizer, LlamaTokenizer, T5Tokenizer, TokenizerError,
                              WordPieceTokenizer, gpt2_split, load_tokenizer, truncate_pair)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "weights" / "fixtures"
LLAMA_SP = SHARED / "weights" / "tokenizers" / "llama" / "tokenizer.model"
T5_SP = SHARED / "weights" / "tokenizers" / "t5" / "spiece.model"




def glue_sentences() -> list[str]:
    """The first 500 SST-2 training sentences and 250 MRPC pairs (quotes, $, ’, accents)."""
    sst = need(SHARED / "data" / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    assert sst[0].split("\t") == ["sentence", "label"]
    mrpc = need(SHARED / "data" / "glue" / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
    rows = [line.split("\t") for line in mrpc[1:251]]
    return [line.split("\t")[0] for line in sst[1:501]] + [s for r in rows for s in r[3:5]]


def vocab_file() -> dict[str, int]:
    """The WordPiece vocabulary as the file gives it: token -> its line number."""
    lines = need(FIXTURES / "wordpiece-uncased" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {tok: i for i, tok in enumerate(lines)}


def reference(name: str) -> list[dict]:
    return json.loads(need(FIXTURES / name / "reference_encodings.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- WordPiece
@pytest.fixture(scope="module")
def wordpiece():
    tok = load_tokenizer(need(FIXTURES / "wordpiece-uncased"))
    assert isinstance(tok, WordPieceTokenizer)
    return tok


def test_wordpiece_matches_every_reference_case(wordpiece):
    cases = reference("wordpiece-uncased")
    assert any("text_pair" in c for c in cases) and any("text_pair" not in c for c in cases)
    for c in cases:
        out = wordpiece.encode_pair(c["text"], c.get("text_pair"))
        assert out["input_ids"] == c["input_ids"], c
        assert out["token_type_ids"] == c["token_type_ids"], c
        assert out["attention_mask"] == [1] * len(c["input_ids"])
        if "text_pair" not in c:
            assert wordpiece.encode(c["text"]) == c["input_ids"]


def test_wordpiece_ascii_fast_path_equals_unicode_path(wordpiece):
    texts = glue_sentences() + ["a\x1fb\x00c\x7fd", "tabs\tnew\nlines\r x", "[x]{y}~`^|$+<=>_z"]
    ascii_texts = [t for t in texts if t.isascii()]
    assert len(ascii_texts) > 500
    for t in ascii_texts:
        assert wordpiece.basic_tokenize(t) == wordpiece.basic_tokenize_unicode(t), t


def test_wordpiece_specials_unk_and_decode(wordpiece):
    v = vocab_file()
    assert (wordpiece.pad_id, wordpiece.bos_id, wordpiece.eos_id) == (v["[PAD]"], None, None) == (0, None, None)
    assert wordpiece.vocab_size == len(v) == 30522
    ids = wordpiece.encode("the [MASK] sat.")
    assert ids == [v["[CLS]"], v["the"], v["[MASK]"], v["sat"], v["."], v["[SEP]"]]
    assert wordpiece.encode("a" * 101)[1:-1] == [v["[UNK]"]] == [100]
    assert wordpiece.decode(wordpiece.encode("Don't stop, the HOUSE is unaffable!")) == \
        "[CLS] don't stop, the house is unaffable! [SEP]"
    assert wordpiece.decode(wordpiece.encode("Hello there."), skip_special_tokens=True) == "hello there."


def test_pair_truncation_longest_first(wordpiece):
    # one at a time from the longer; ties take from the second sequence
    assert truncate_pair(list(range(6)), list(range(4)), 7) == ([0, 1, 2, 3], [0, 1, 2])
    assert truncate_pair(list(range(5)), list(range(6)), 7) == ([0, 1, 2, 3], [0, 1, 2])
    assert truncate_pair(list(range(2)), list(range(9)), 5) == ([0, 1], [0, 1, 2])
    assert truncate_pair(list(range(9)), None, 4) == ([0, 1, 2, 3], None)
    a, b = "one two three four five six seven", "alpha beta gamma"
    v = vocab_file()
    ids_a, ids_b = [v[w] for w in a.split()], [v[w] for w in b.split()]      # every word is one vocab entry
    assert wordpiece.content_ids(a) == ids_a and wordpiece.content_ids(b) == ids_b
    out = wordpiece.encode_pair(a, b, max_length=8)  # 5 content slots: a 7 -> 3, then the tie costs b one
    assert out["input_ids"] == [v["[CLS]"], *ids_a[:3], v["[SEP]"], *ids_b[:2], v["[SEP]"]]
    assert out["token_type_ids"] == [0] * 5 + [1] * 3
    assert out["attention_mask"] == [1] * 8
    assert wordpiece(a, b, max_length=8) == out
    assert wordpiece.encode_pair(a, max_length=5)["input_ids"] == [v["[CLS]"], *ids_a[:3], v["[SEP]"]]
    with pytest.raises(ValueError, match="max_length=2"):
        wordpiece.encode_pair(a, b, max_length=2)


def test_minilm_package_vocab_matches_fixture(wordpiece):
    tok = load_tokenizer(need_minilm())
    assert isinstance(tok, WordPieceTokenizer) and tok.lower
    for text in glue_sentences()[:20] + ["Naïve CAFÉ résumé — 東京タワー 😀 don't"]:
        assert tok.encode(text) == wordpiece.encode(text)
    assert tok.encode_pair("a cat", "a dog") == wordpiece.encode_pair("a cat", "a dog")


# ---------------------------------------------------------------- byte-level BPE
@pytest.fixture(scope="module")
def bpe():
    tok = load_tokenizer(need(FIXTURES / "bpe-tiny"))
    assert isinstance(tok, ByteLevelBPETokenizer)
    return tok


def test_bpe_matches_every_reference_case_and_round_trips(bpe):
    cases = reference("bpe-tiny")
    assert any(not c["text"].isascii() for c in cases)
    for c in cases:
        assert bpe.encode(c["text"]) == c["ids"], c["text"]
        assert bpe.decode(c["ids"]) == c["text"]


def test_bpe_specials_and_pairs(bpe):
    spec = json.loads(need(FIXTURES / "bpe-tiny" / "tokenizer.json").read_text(encoding="utf-8"))
    eot = next(t["id"] for t in spec["added_tokens"] if t["content"] == "<|endoftext|>")
    assert bpe.added["<|endoftext|>"] == eot
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (eot, eot, None)
    ids = bpe.encode("a<|endoftext|>b")
    assert ids == bpe.encode("a") + [eot] + bpe.encode("b")
    assert bpe.decode(ids, skip_special_tokens=True) == "ab"
    one, two = bpe.encode("one"), bpe.encode(" two")
    out = bpe.encode_pair("one", " two")
    assert out["input_ids"] == one + two
    assert out["token_type_ids"] == [0] * len(one) + [1] * len(two)


def test_gpt2_split_equals_the_regex_on_ascii():
    # On ASCII text \p{L}, \p{N} and Oniguruma's \s are exactly these classes, so Python's re can
    # run GPT-2's pattern and check the hand-written scanner.
    s, letters, digits = r"[\t\n\x0b\x0c\r ]", "[A-Za-z]", "[0-9]"
    pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letters}+| ?{digits}+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"
                         rf"|{s}+(?![^\t\n\x0b\x0c\r ])|{s}+")
    texts = glue_sentences() + ["don't you've  it's  x", "a \tb\n\nc  ", "  lead", "tail  ", "x\x1cy",
                                "?'s'", "1,000.5"]
    for t in texts:
        if t.isascii():
            assert gpt2_split(t) == pattern.findall(t), t
            assert "".join(gpt2_split(t)) == t


# ---------------------------------------------------------------- SentencePiece: LLaMA and T5
def test_llama_equals_sentencepiece_on_glue():
    tok = load_tokenizer(need(LLAMA_SP).parent)
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_SP))
    assert isinstance(tok, LlamaTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 32000)
    for text in glue_sentences():
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    pair = tok.encode_pair("a cat", "a dog")
    assert pair["input_ids"] == [1, *sp.encode("a cat"), 1, *sp.encode("a dog")]
    assert tok.decode([1] + tok.encode("Hello world") + [2]) == "Hello world"


def test_t5_equals_sentencepiece_plus_eos_and_sentinels():
    tok = load_tokenizer(need(T5_SP).parent)
    sp = spm.SentencePieceProcessor(model_file=str(T5_SP))
    assert isinstance(tok, T5Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (None, 1, 0, 32100)
    for text in glue_sentences():
        ids = tok.encode(text)
        assert ids == sp.encode(text) + [1]
        assert tok.decode(ids) == sp.decode(ids[:-1])
    assert [tok.content_ids(f"<extra_id_{n}>") for n in (0, 1, 99)] == [[32099], [32098], [32000]]
    text = "Hello <extra_id_0> world, <extra_id_99> again."
    ids = tok.encode(text)
    assert ids == [*sp.encode("Hello"), 32099, *sp.encode(" world,"), 32000, *sp.encode(" again."), 1]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, again."
    assert tok.content_ids("<extra_id_100>") == sp.encode("<extra_id_100>")
    assert tok.encode_pair("a", "b")["input_ids"] == [*sp.encode("a"), 1, *sp.encode("b"), 1]


def test_babyllama_sentencepiece_loads():
    tok = load_tokenizer(need(SHARED / "weights" / "babyllama-1m"))
    assert isinstance(tok, LlamaTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (105, 1, 2, None)
    ids = tok.encode("Once upon a time")
    assert tok.decode(ids) == "Once upon a time" and max(ids) < 105


# ---------------------------------------------------------------- choosing by the files present
def test_load_tokenizer_order_and_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.model.*spiece\.model.*vocab\.txt.*tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    shutil.copy(need(FIXTURES / "bpe-tiny" / "tokenizer.json"), tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteLevelBPETokenizer)
    shutil.copy(need(FIXTURES / "wordpiece-uncased" / "vocab.txt"), tmp_path)
    assert isinstance(load_tokenizer(tmp_path), WordPieceTokenizer)
    shutil.copy(need(T5_SP), tmp_path)
    assert isinstance(load_tokenizer(tmp_path), T5Tokenizer)
    shutil.copy(need(LLAMA_SP), tmp_path)
    assert isinstance(load_tokenizer(tmp_path), LlamaTokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "spiece.model").unlink()
    cased = load_tokenizer(tmp_path)
    assert cased.basic_tokenize("Hello WORLD") == ["Hello", "WORLD"]


def test_bpe_rejects_other_models(tmp_path):
    spec = json.loads(need(FIXTURES / "bpe-tiny" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="Metaspace"):
        load_tokenizer(tmp_path)
