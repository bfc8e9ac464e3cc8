"""Too-long inputs: which end each family keeps, on the real tokenizers.

- BERT: the pair is cut longest-first (the longer sequence loses its last token, a tie costs the
  second), [CLS] a [SEP] b [SEP] and token types stay whole.
- T5: the input is cut at its end but keeps its final EOS.
- LLaMA / MPT (per-task heads): BOS stays and the END of the prompt (the question and
  "Answer:") is kept; the start of the text goes.
- Generation (commonsense): the response + EOS stay whole, the prompt keeps its end.
- WordPiece: a word of exactly 100 characters (after normalisation) is split into pieces; one
  of 101 characters is [UNK], as BERT's max_input_chars_per_word = 100 ("> max" is unknown).
Expected ids are built here from the tokenizer's plain encodings and the rules above.
"""
import json

import pytest

from conftest import FIXTURES, SHARED, need
from mtlref import load_tokenizer
from mtlref.data.collate import Encoder
from mtlref.data.readers import Example
from mtlref.data.templates import render, t5_input

TOKENIZERS = SHARED / "weights" / "tokenizers"
PREMISE = ("A man in a blue coat walked his two dogs along the river before the sun came up, "
           "stopping now and then to look at the boats that were still tied to the old wooden pier.")
HYPOTHESIS = "The man was outside early in the morning."


@pytest.fixture(scope="module")
def wordpiece():
    return load_tokenizer(need(FIXTURES / "wordpiece-uncased"))


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer(need(TOKENIZERS / "llama"))


@pytest.fixture(scope="module")
def t5():
    return load_tokenizer(need(TOKENIZERS / "t5"))


def rte(text=PREMISE, pair=HYPOTHESIS):
    return Example("rte", text, pair, 0, "test:1")


# ----------------------------------------------------------------------------- BERT
def test_bert_pairs_are_cut_longest_first(wordpiece):
    """[CLS] a [SEP] b [SEP] within max_length: the longer side loses tokens from its end until
    both fit; at a tie the second sentence loses one. Token types follow the kept lengths."""
    a, b = wordpiece.content_ids(PREMISE), wordpiece.content_ids(HYPOTHESIS)
    assert len(a) == 38 and len(b) == 9
    cls, sep = wordpiece.cls_id, wordpiece.sep_id
    # (max_length, kept of a, kept of b), 3 specials: 24 -> 21 slots, a alone is cut: 12 + 9;
    # 20 -> 17: a falls to 9 (18), the tie costs b one: 9 + 8; 13 -> 10: they alternate down to
    # 5 + 5; 12 -> 9: from 5 + 5 the tie costs b: 5 + 4
    for L, n_a, n_b in ((24, 12, 9), (20, 9, 8), (13, 5, 5), (12, 5, 4)):
        ids, types = Encoder(wordpiece, "bert", L).encode(rte())
        assert ids == [cls, *a[:n_a], sep, *b[:n_b], sep], L
        assert types == [0] * (n_a + 2) + [1] * (n_b + 1) and len(ids) == L
    whole = [cls, *a, sep, *b, sep]
    assert Encoder(wordpiece, "bert", len(whole)).encode(rte())[0] == whole      # exactly fits: uncut
    assert Encoder(wordpiece, "bert", len(whole) - 1).encode(rte())[0] == [cls, *a[:-1], sep, *b, sep]


def test_bert_single_sentence_keeps_its_start(wordpiece):
    """A single sentence keeps its first max_length - 2 tokens between [CLS] and [SEP]."""
    a = wordpiece.content_ids(PREMISE)
    ids, types = Encoder(wordpiece, "bert", 8).encode(Example("sst2", PREMISE, None, 1, "t:1"))
    assert ids == [wordpiece.cls_id, *a[:6], wordpiece.sep_id] and types == [0] * 8


# ----------------------------------------------------------------------------- T5
def test_t5_keeps_eos_when_cut(t5):
    """The T5 input loses tokens before its EOS, never the EOS; one that fits is unchanged."""
    full = t5.encode(t5_input("rte", PREMISE, HYPOTHESIS))
    assert full[-1] == t5.eos_id == 1 and len(full) > 40
    for L in (16, 33, len(full) - 1):
        ids, _ = Encoder(t5, "t5", L).encode(rte())
        assert ids == full[: L - 1] + [t5.eos_id] and len(ids) == L, L
    assert Encoder(t5, "t5", len(full)).encode(rte())[0] == full
    assert t5.decode(Encoder(t5, "t5", 16).encode(rte())[0]).startswith("rte sentence1: A man in")


# ----------------------------------------------------------------------------- LLaMA, MPT
def test_llama_keeps_bos_and_the_end_of_the_prompt(llama):
    """BOS + the last max_length - 1 prompt tokens: the hypothesis and "Answer:" survive, the
    premise's start goes; a prompt that fits (with BOS) is unchanged."""
    full = llama.encode(render("rte", PREMISE, HYPOTHESIS))
    assert llama.bos_id == 1 and full[0] != llama.bos_id
    for L in (24, len(full)):
        ids, extra = Encoder(llama, "llama", L).encode(rte())
        assert ids == [llama.bos_id] + full[-(L - 1):] and extra is None and len(ids) == L, L
    kept = llama.decode(Encoder(llama, "llama", 24).encode(rte())[0])
    assert kept.endswith('entail the statement "The man was outside early in the morning."? Answer:')
    assert "blue coat" not in kept
    assert Encoder(llama, "llama", len(full) + 1).encode(rte())[0] == [llama.bos_id] + full


def test_mpt_keeps_bos_and_the_end_of_the_prompt():
    """MPT's byte-level BPE (BOS = <|endoftext|>) follows the same rule as LLaMA."""
    bpe = load_tokenizer(need(FIXTURES / "bpe-tiny"))
    full = bpe.encode(render("rte", PREMISE, HYPOTHESIS))
    assert bpe.bos_id is not None and len(full) > 20
    ids, _ = Encoder(bpe, "mpt", 20).encode(rte())
    assert ids == [bpe.bos_id] + full[-19:]
    assert bpe.decode(ids[1:]).endswith("? Answer:")


def test_generation_keeps_the_response_and_the_end_of_the_prompt(llama):
    """BOS + the prompt's end + the whole response + EOS, the loss mask on the response and EOS
    only; at exactly max_length nothing is cut."""
    question = "Which of these would you use to stay dry when it rains outside? " * 3
    ex = Example("arc_easy", question, None, "answer2", "t:1", target="the correct answer is answer2")
    prompt = llama.encode(render("arc_easy", question))
    answer = llama.encode(ex.target) + [llama.eos_id]
    L = 48
    ids, mask = Encoder(llama, "llama", L).encode(ex)
    keep = L - 1 - len(answer)
    assert ids == [llama.bos_id] + prompt[-keep:] + answer
    assert mask == [0] * (1 + keep) + [1] * len(answer)
    assert "### Response:" in llama.decode(ids) and llama.decode(ids).endswith("the correct answer is answer2")
    exact = 1 + len(prompt) + len(answer)
    assert Encoder(llama, "llama", exact).encode(ex)[0] == [llama.bos_id] + prompt + answer


# ----------------------------------------------------------------------------- WordPiece word length
def test_wordpiece_word_of_exactly_100_chars_is_split_101_is_unk(wordpiece):
    """max_input_chars_per_word = 100: 100 characters are pieces that decode back to the word,
    101 are one [UNK] (in a sentence too, its neighbours intact)."""
    unk = wordpiece.unk_id
    hundred = wordpiece.content_ids("a" * 100)
    assert unk not in hundred and len(hundred) > 1
    assert wordpiece.decode(hundred) == "a" * 100
    assert wordpiece.content_ids("a" * 101) == [unk]
    go, home = wordpiece.content_ids("go"), wordpiece.content_ids("home")
    assert wordpiece.content_ids("go " + "a" * 101 + " home") == go + [unk] + home
    assert wordpiece.content_ids("go " + "a" * 100 + ".") == go + hundred + wordpiece.content_ids(".")


def test_wordpiece_limit_counts_normalised_characters(wordpiece):
    """The limit counts characters, not UTF-8 bytes ("ø" is 2 bytes), and counts them after
    lower-casing and accent stripping ("É" -> "e", one character)."""
    unk = wordpiece.unk_id
    assert unk not in wordpiece.content_ids("ø" * 100) and wordpiece.content_ids("ø" * 101) == [unk]
    assert wordpiece.content_ids("É" * 100) == wordpiece.content_ids("e" * 100)
    assert unk not in wordpiece.content_ids("e" * 100) and wordpiece.content_ids("É" * 101) == [unk]


def test_wordpiece_long_word_matches_the_reference(wordpiece):
    """transformers' BertTokenizerFast gives [CLS] [UNK] [SEP] for the 120-character word of the
    shared reference encodings."""
    refs = json.loads((FIXTURES / "wordpiece-uncased" / "reference_encodings.json").read_text())
    long_words = [r for r in refs if r["text"] and max(map(len, r["text"].split())) > 100]
    assert long_words
    for r in long_words:
        assert wordpiece.encode(r["text"]) == r["input_ids"]
