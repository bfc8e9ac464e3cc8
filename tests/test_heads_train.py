"""Per-task heads, the loss of Eq. 10 and the training loop on tiny fixtures.

- Decoder heads start as the LM head's rows of the label words: at step 0 the head's logits
  equal the LM head's scores of those words at the last real token.
- For each method on a tiny fixture of each family, a few dozen steps on a learnable
  two-task toy problem reduce the loss, and the adapters move; the heads are frozen, so the
  adapters alone have to learn it.
"""

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, SHARED, Spec, need
from mtlref import attach_adapters, load_model, load_tokenizer
from mtlref.adapters import REGISTRY, adapters_of
from mtlref.heads import MultiTaskModel, label_word_ids, output_embedding
from mtlref.layers import ForwardContext
from mtlref.losses import AUX_WEIGHTS, total_loss
from mtlref.presets import resolve_targets
from mtlref.train import LoopConfig, autocast, fit



def test_decoder_heads_start_as_the_lm_scores_of_the_label_words():
    path = need(SHARED / "weights" / "babyllama-1m")
    model, tok = load_model(path), load_tokenizer(path)
    specs = [Spec("yesno", answer_words=("No", "Yes")), Spec("three", labels=("x", "y", "z"),
                                                              answer_words=("Yes", "Maybe", "No"))]
    mt = MultiTaskModel(model, specs, tok)
    prompts = ["Once upon a time", "The cat sat on the mat and looked"]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    T = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [0] * (T - len(x)) for x in ids]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids]),
             "task_ids": torch.tensor([0, 1])}
    with torch.no_grad():
        out = mt(batch)
        lm = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    first_piece = {w: sp.encode(w)[0] for w in ("No", "Yes", "Maybe")}   # each word's first sub-token
    for row, spec in enumerate(specs):
        words = [first_piece[w] for w in spec.answer_words]
        last = len(ids[row]) - 1                                       # the row's last real token
        expected = lm[row, last, words]
        torch.testing.assert_close(out[row, : len(words)], expected, rtol=1e-5, atol=1e-5)
        assert torch.isinf(out[row, len(words):]).all()
        assert label_word_ids(tok, list(spec.answer_words)) == words
    embedding = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]   # tied: the LM head
    assert torch.equal(mt.heads[0].weight, embedding[[first_piece["No"], first_piece["Yes"]]])
    assert torch.equal(output_embedding(model), embedding)


def test_byte_level_bpe_label_words_take_the_leading_space():
    tok = load_tokenizer(need(FIXTURES / "bpe-tiny"))
    assert label_word_ids(tok, ["Yes"]) == [tok.encode(" Yes")[0]]


def test_eq10_weighs_each_auxiliary_kind_by_its_lambda():
    task = torch.tensor(0.7)
    aux = {"more_contrastive": [torch.tensor(2.0), torch.tensor(4.0)], "mixlora_balance": [torch.tensor(1.5)]}
    loss, parts = total_loss(task, aux)
    assert loss.item() == pytest.approx(0.7 + 0.1 * 3.0 + AUX_WEIGHTS["mixlora_balance"] * 1.5)
    assert parts == pytest.approx({"task": 0.7, "more_contrastive": 3.0, "mixlora_balance": 1.5})
    with pytest.raises(KeyError, match="no weight"):
        total_loss(task, {"unknown": [torch.tensor(1.0)]})


def test_classification_and_regression_rows_share_one_batch_loss():
    torch.manual_seed(0)
    model = load_model(need(FIXTURES / "bert-tiny"))
    mt = MultiTaskModel(model, [Spec("cls"), Spec("reg", kind="regression", labels=())])
    batch = {"input_ids": torch.randint(5, 300, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "task_ids": torch.tensor([0, 1, 0, 1]), "labels": torch.tensor([1.0, 2.5, 0.0, 4.0])}
    out = mt(batch)
    ce = torch.nn.functional.cross_entropy(out[[0, 2], :2], torch.tensor([1, 0]), reduction="sum")
    se = ((out[[1, 3], 0] - torch.tensor([2.5, 4.0])) ** 2).sum()
    torch.testing.assert_close(mt.loss(out, batch), (ce + se) / 4)
    pred = mt.predict(out, batch)
    assert pred[1] == out[1, 0] and pred[0] == out[0, :2].argmax()


# ----------------------------------------------------------------------------- a learnable toy
FAMILIES = {"llama-tiny": "llama", "mpt-tiny": "mpt", "t5-tiny": "t5", "bert-tiny": "bert"}
OPTIONS = {"moelora": {"num_experts": 2, "task_dim": 8}, "mixlora": {"num_experts": 4, "top_k": 2},
           "multilora": {"num_loras": 2}}


def toy_batches(seed: int, batch: int = 16, length: int = 6):
    """Two tasks over the same inputs: a sequence drawn from low ids (4-49) or high ids
    (50-99); task 0 labels low=0/high=1, task 1 the opposite. Learnable only with the task id."""
    g = torch.Generator().manual_seed(seed)
    while True:
        high = torch.randint(0, 2, (batch,), generator=g)
        ids = torch.randint(4, 50, (batch, length), generator=g) + 46 * high[:, None]
        task = torch.randint(0, 2, (batch,), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_ids": task,
               "labels": (high ^ task).float()}


@pytest.mark.parametrize("fixture", list(FAMILIES))
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_few_dozen_steps_reduce_the_loss(fixture, method):
    torch.manual_seed(0)
    model = load_model(need(FIXTURES / fixture))
    targets = resolve_targets("attention+ffn", FAMILIES[fixture])
    attach_adapters(model, method, targets, num_tasks=2, rank=4, alpha=8, **OPTIONS.get(method, {}))
    mt = MultiTaskModel(model, [Spec("low-is-0"), Spec("low-is-1")])
    mt.heads.requires_grad_(False)     # frozen random heads: only the adapters can learn the problem
    # T5 classifies from its encoder alone (heads.py): its decoder adapters see no data here
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and not n.startswith("decoder.")}
    probe = next(toy_batches(seed=99, batch=64))

    def probe_loss():
        with torch.no_grad():
            return float(mt.loss(mt(probe), probe))

    start = probe_loss()
    fit(mt, toy_batches(seed=1), LoopConfig(max_steps=40, lr=1e-2, log_every=1000))
    assert probe_loss() < 0.7 * start                                 # measured: 0.25-0.54 of start
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before), "every adapter tensor should have been updated"
    assert adapters_of(model)


def test_the_loop_collects_auxiliary_losses_through_the_context():
    torch.manual_seed(0)
    model = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(model, "more", ["query", "value"], num_tasks=2, rank=4, alpha=8)
    mt = MultiTaskModel(model, [Spec("a"), Spec("b")]).train()
    batch = next(toy_batches(seed=3))
    ctx = ForwardContext(task_ids=batch["task_ids"], mask=batch["attention_mask"], aux_losses={})
    mt(batch, ctx)
    assert len(ctx.aux_losses["more_contrastive"]) == 2 * model.config.num_hidden_layers
    mt.eval()
    ctx = ForwardContext(task_ids=batch["task_ids"], mask=batch["attention_mask"], aux_losses={})
    mt(batch, ctx)
    assert ctx.aux_losses == {}, "Eq. 8 is a training loss: no contrastive term in eval mode"


def test_precision_picks_autocast_only_where_it_is_asked_for():
    with autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
    with autocast("cuda", "fp32"):                                     # off on CUDA when fp32 is asked for
        assert not torch.is_autocast_enabled("cuda")
    with autocast("cpu", "bf16"):                                     # asked for: bf16 on the CPU too
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        autocast("cpu", "fp16")


@pytest.mark.parametrize("fixture", list(FAMILIES))
def test_a_training_step_under_bf16_autocast(fixture):
    """--precision bf16 (CPU here, the CUDA default's arithmetic): heads, a mixed-task batch with
    a regression task, MoRE on each family: the loss is finite, fp32 adapters get fp32 grads."""
    from mtlref.train import train_step
    torch.manual_seed(0)
    model = load_model(need(FIXTURES / fixture))
    attach_adapters(model, "more", resolve_targets("attention", FAMILIES[fixture]), num_tasks=2, rank=4, alpha=8,
                    within="encoder" if fixture == "t5-tiny" else None)     # T5's heads read its encoder
    mt = MultiTaskModel(model, [Spec("a"), Spec("b", kind="regression")]).train()
    loss, parts = train_step(mt, next(toy_batches(seed=5)), LoopConfig(max_steps=1, precision="bf16"))
    loss.backward()
    assert torch.isfinite(loss) and "more_contrastive" in parts
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
