"""Batches: length grouping keeps the sampler's samples, resumes exactly and splits a global
batch over ranks; generative batches put the loss on the response only."""
import torch

from conftest import SHARED, need
from mtlref import load_tokenizer
from mtlref.data.collate import Encoder, LengthGroupedBatches
from mtlref.data.readers import Example
from mtlref.data.samplers import MultiTaskSampler
from mtlref.heads import CausalLM


class CharTok:
    """A stand-in tokenizer: one id per character, [CLS]=1 ... [SEP]=2 framing."""
    pad_id, bos_id, eos_id = 0, None, None

    def encode_pair(self, a, b=None, max_length=None):
        ids = [1] + [3 + ord(c) % 50 for c in a] + [2] + ([3 + ord(c) % 50 for c in b] + [2] if b else [])
        ids = ids[:max_length]
        return {"input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids)}


def corpus():
    g = torch.Generator().manual_seed(0)
    return {t: [Example(t, "x" * int(torch.randint(1, 40, (1,), generator=g)), None, i % 2, f"{t}:{i}")
                for i in range(n)] for t, n in (("a", 50), ("b", 30))}


def grouped(pool, replicas=1, rank=0, state=None):
    data = corpus()
    sampler = MultiTaskSampler({t: len(v) for t, v in data.items()}, "uniform", batch_size=8, seed=3)
    b = LengthGroupedBatches(sampler, Encoder(CharTok(), "bert", 64), data, {"a": 0, "b": 1}, pool=pool,
                             seed=3, num_replicas=replicas, rank=rank)
    if state is not None:
        b.load_state_dict(state)
    return b


def rows(batch):
    """The samples of a batch without their padding, sorted."""
    return sorted(tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"]))


def test_grouping_keeps_the_samples_and_cuts_padding():
    plain, sorted_ = iter(grouped(pool=1)), iter(grouped(pool=4))
    a = [next(plain) for _ in range(4)]
    b = [next(sorted_) for _ in range(4)]
    assert sorted(r for x in a for r in rows(x)) == sorted(r for x in b for r in rows(x))
    assert sum(x["input_ids"].numel() for x in b) < sum(x["input_ids"].numel() for x in a)


def test_grouped_batches_resume_exactly_mid_pool():
    full = iter(grouped(pool=4))
    expected = [next(full) for _ in range(7)]
    first = grouped(pool=4)
    it = iter(first)
    for _ in range(3):                                   # stop inside the first pool
        next(it)
    resumed = iter(grouped(pool=4, state=first.state_dict()))
    for want in expected[3:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["task_ids"], want["task_ids"])


def test_ranks_split_each_global_batch():
    whole = next(iter(grouped(pool=4)))
    parts = [next(iter(grouped(pool=4, replicas=2, rank=r))) for r in range(2)]
    assert sorted(rows(parts[0]) + rows(parts[1])) == rows(whole)
    assert all(p["input_ids"].shape[0] == 4 for p in parts)


def test_generative_batches_train_on_the_response_only():
    tok = load_tokenizer(need(SHARED / "weights" / "babyllama-1m"))
    enc = Encoder(tok, "llama", max_length=120)
    ex = Example("arc_easy", "Which is bigger, a cat or a dog? " * 6, None, "answer2", "x:1",
                 target="the correct answer is answer2")
    batch = enc.collate([(0, ("train", 0), ex)])
    ids, targets = batch["input_ids"][0], batch["target_ids"][0]
    answer = tok.encode(ex.target) + [tok.eos_id]
    assert ids.shape[0] == 120 and ids[0] == tok.bos_id, "a long prompt keeps BOS, its end and the answer"
    assert ids[-len(answer):].tolist() == answer
    assert (targets[:-len(answer)] == -100).all() and targets[-len(answer):].tolist() == answer
    logits = torch.randn(1, 120, tok.vocab_size)
    loss = CausalLM(torch.nn.Identity()).loss(logits, batch)
    want = torch.nn.functional.cross_entropy(logits[0, -len(answer) - 1:-1], torch.tensor(answer))
    torch.testing.assert_close(loss, want)
