"""generate(): exact greedy decoding of a real pretrained model, cache vs recompute, batching
with left padding, sampling filters, EOS, and the T5 (encoder-decoder) branch."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from mtlref.pretrained import load_model
from mtlref.generate import filter_logits, generate, next_token
from mtlref.layers import AdaptedLinear
from conftest import need

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BABY = SHARED / "weights" / "babyllama-1m"
FIXTURES = SHARED / "weights" / "fixtures"




class Tok:
    """The two ids generate() reads, plus SentencePiece for text."""

    def __init__(self, model_file: Path):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def prompt(self, text: str) -> list[int]:
        return [self.bos_id] + self.sp.encode(text)


@pytest.fixture(scope="module")
def baby():
    return load_model(need(BABY)), Tok(need(BABY / "tokenizer.model"))


def test_babyllama_greedy_matches_transformers(baby):
    model, tok = baby
    readme = need(SHARED / "README.md").read_text()
    found = re.search(r"gives:\s*`([^`]+)`\s*\((\d+) new tokens\)", readme)
    assert found, "shared/README.md no longer states the expected babyllama generation"
    expected, n_new = found.group(1), int(found.group(2))
    prompt = tok.prompt("Once upon a time")
    new = generate(model, tok, prompt, max_new_tokens=n_new)
    assert len(new) == n_new and tok.eos_id not in new
    assert tok.sp.decode(prompt + new) == expected


def test_public_tokenizer_path(baby):
    # the same generation through mtlref's own tokenizer (pad_id None for LLaMA: generate pads with 0)
    from mtlref.tokenizer import load_tokenizer
    model, sp_tok = baby
    tok = load_tokenizer(BABY)
    prompt = [tok.bos_id] + tok.encode("Once upon a time")
    assert prompt == sp_tok.prompt("Once upon a time")
    new = generate(model, tok, [prompt, [tok.bos_id] + tok.encode("Tom")], max_new_tokens=20)
    assert new[0] == generate(model, sp_tok, prompt, max_new_tokens=20)
    assert tok.decode(prompt + new[0]).startswith("Once upon a time, there was")


def test_cache_equals_recompute_and_eval_mode_untouched(baby):
    model, tok = baby
    model.train()                           # generate must not flip it
    try:
        prompt = tok.prompt("The little dog")
        cached = generate(model, tok, prompt, max_new_tokens=60)
        recomputed = generate(model, tok, prompt, max_new_tokens=60, use_cache=False)
        assert model.training
    finally:
        model.eval()
    assert cached == recomputed and len(cached) > 0


def test_batched_left_padding_equals_alone(baby):
    model, tok = baby
    prompts = [tok.prompt("Once upon a time"), tok.prompt("Tom"), tok.prompt("One day, a big red ball")]
    assert len({len(p) for p in prompts}) == 3
    batched = generate(model, tok, prompts, max_new_tokens=40)
    assert batched == [generate(model, tok, p, max_new_tokens=40) for p in prompts]
    assert batched == generate(model, tok, prompts, max_new_tokens=40, use_cache=False)


def test_eos_stops_a_row_and_is_left_out(baby):
    model, tok = baby
    prompt = tok.prompt("Once upon a time")
    free = generate(model, tok, prompt, max_new_tokens=30, eos_id=-1)       # no token is -1
    stop = free[7]
    assert generate(model, tok, prompt, max_new_tokens=30, eos_id=stop) == free[:free.index(stop)]
    other = tok.prompt("Tom")
    rows = generate(model, tok, [prompt, other], max_new_tokens=30, eos_id=stop)
    assert rows[0] == free[:free.index(stop)]
    alone = generate(model, tok, other, max_new_tokens=30, eos_id=stop)
    assert rows[1] == alone                 # the other row runs on after the first stopped


def test_sampling_topk1_equals_greedy_and_seed_reproduces(baby):
    model, tok = baby
    prompt = tok.prompt("Once upon a time")
    greedy = generate(model, tok, prompt, max_new_tokens=30)
    assert generate(model, tok, prompt, max_new_tokens=30, temperature=1.0, top_k=1) == greedy

    def sample(seed, **kw):
        return generate(model, tok, [prompt, prompt], max_new_tokens=30, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed), **kw)
    first = sample(1, top_p=0.95)
    assert first == sample(1, top_p=0.95)
    assert first[0] != greedy or first[1] != greedy      # T=1.5 on 30 tokens does leave the argmax
    assert sample(1, use_cache=False, top_p=0.95) == first


class Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.task_ids = []

    def forward(self, x, y, ctx, layer):
        self.task_ids.append(ctx.task_ids)
        return torch.zeros_like(y)


def test_task_ids_reach_the_slots(baby):
    model, tok = baby
    slot = model.model.layers[0].self_attn.q_proj
    assert isinstance(slot, AdaptedLinear)
    slot.adapter = Spy()
    try:
        generate(model, tok, [tok.prompt("Tom"), tok.prompt("Once")], max_new_tokens=3, task_ids=[4, 1])
        generate(model, tok, tok.prompt("Tom"), max_new_tokens=2, task_ids=7)
        seen = slot.adapter.task_ids
    finally:
        slot.adapter = None
    assert len(seen) == 5
    assert all(t.tolist() == [4, 1] for t in seen[:3]) and all(t.tolist() == [7] for t in seen[3:])


def test_bad_arguments(baby):
    model, tok = baby
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tok, [[1, 5], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, [1] * 200, max_new_tokens=100)        # babyllama has 256 positions
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, [1], top_p=0.0, temperature=1.0)


# ----------------------------------------------------------------------------- filters
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.1, 0.25], [0.1, 0.15, 0.25, 0.5]])    # ranked: 0.5 0.25 0.15 0.1
    logits = probs.log()
    kept = lambda p: (filter_logits(logits, top_p=p) > -math.inf).tolist()
    assert kept(0.3) == [[False, True, False, False], [False, False, False, True]]   # 0.5 >= 0.3
    assert kept(0.7) == [[False, True, False, True], [False, False, True, True]]     # 0.5 < 0.7 <= 0.75
    assert kept(0.8) == [[True, True, False, True], [False, True, True, True]]       # 0.75 < 0.8 <= 0.9
    assert kept(1.0) == [[True] * 4] * 2
    assert kept(1e-6) == [[False, True, False, False], [False, False, False, True]]  # never empty
    kept_p = filter_logits(logits, top_p=0.7)
    assert torch.equal(kept_p[0, [1, 3]], logits[0, [1, 3]])                        # survivors unchanged


def test_top_k_and_sampling_stay_inside_the_kept_set():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert (filter_logits(logits, top_k=2) > -math.inf).tolist() == [[False, True, False, True]]
    assert (filter_logits(logits, top_k=10) > -math.inf).all()
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, 5.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 3}
    assert int(next_token(logits)) == 1


# ----------------------------------------------------------------------------- T5
def test_t5_generate_matches_a_manual_loop():
    path = need(FIXTURES / "t5v11-tiny")
    model = load_model(path)
    tok = type("T", (), {"eos_id": None, "pad_id": 0})()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    calls = []
    encode = model.encode
    model.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        def run(**kw):
            return generate(model, tok, prompts, max_new_tokens=8, temperature=1.0,
                            generator=torch.Generator().manual_seed(0), **kw)
        cached, recomputed = run(), run(use_cache=False)
    finally:
        del model.encode
    assert calls == [1, 1]                                   # the encoder runs once per generate
    # the same draws by hand: right-padded encoder input, decoder from decoder_start_token_id
    ids = torch.tensor([prompts[0], prompts[1] + [0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    start = json.loads((path / "config.json").read_text())["decoder_start_token_id"]   # the checkpoint's, not ours
    seq = torch.full((2, 1), start)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(8):
            logits = model(ids, attention_mask=mask, decoder_input_ids=seq)[:, -1]
            seq = torch.cat([seq, next_token(logits, 1.0, generator=g)[:, None]], 1)
    assert cached == recomputed == seq[:, 1:].tolist()
