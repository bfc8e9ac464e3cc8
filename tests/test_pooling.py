"""Pooling over padded batches (heads.MultiTaskModel.features and layers.ForwardContext.pooled):
each padded row's vector equals the same row alone, unpadded, and equals the pooling written
here over the reference states that transformers computed. The default main job pools BERT by
mean over right-padded mixed batches; decoders read the last real token; MoRE's Eq. 8 pools
each module's input over the real tokens."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES, Spec, need
from mtlref import attach_adapters, load_model
from mtlref.heads import MultiTaskModel
from mtlref.layers import ForwardContext

EXTRA = 4                                  # padding columns added on the right of the fixture batch


def fixture(name: str):
    path = need(FIXTURES / name)
    return load_model(path), load_file(str(path / "reference.safetensors"))


def lengths(mask: torch.Tensor) -> list[int]:
    return [int(m.sum()) for m in mask]


def padded(ref: dict, seed: int = 0) -> dict:
    """The fixture's batch (its last row already right-padded) with EXTRA more padding columns,
    whose token ids (and those of the existing padding) are random: only the mask says they are
    padding."""
    g = torch.Generator().manual_seed(seed)
    B, T = ref["input_ids"].shape
    mask = torch.cat([ref["attention_mask"], torch.zeros(B, EXTRA, dtype=torch.long)], 1)
    noise = torch.randint(3, 250, (B, T + EXTRA), generator=g)
    ids = torch.where(mask.bool(), torch.cat([ref["input_ids"], noise[:, T:]], 1), noise)
    batch = {"input_ids": ids, "attention_mask": mask, "task_ids": torch.zeros(B, dtype=torch.long)}
    if "token_type_ids" in ref:
        batch["token_type_ids"] = torch.cat([ref["token_type_ids"], torch.zeros(B, EXTRA, dtype=torch.long)], 1)
    return batch


def alone(batch: dict, row: int) -> dict:
    """Row `row` by itself, cut to its real tokens: no padding at all."""
    n = int(batch["attention_mask"][row].sum())
    return {k: (v[row:row + 1, :n] if v.dim() == 2 else v[row:row + 1]) for k, v in batch.items()}


def features(mt, batch):
    with torch.no_grad():
        return mt.features(batch, ForwardContext(task_ids=batch["task_ids"]))


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's real positions, one row at a time."""
    return torch.stack([h[b, : int(mask[b].sum())].mean(0) for b in range(h.shape[0])])


def check_rows(mt, batch, want, tol=1e-5):
    got = features(mt, batch)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-4                   # against transformers' states
    for b in range(got.shape[0]):                                     # and against the row alone
        assert (got[b] - features(mt, alone(batch, b))[0]).abs().max().item() <= tol, b


# ----------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_bert_pooling_of_padded_rows_equals_the_rows_unpadded(pooling):
    """mean: average of last_hidden_state over the real tokens; cls: its token 0; pooler: the
    pooler_output that transformers computed; padded or alone, the same vector."""
    model, ref = fixture("bert-tiny")
    mt = MultiTaskModel(model, [Spec("a")], pooling=pooling)
    assert lengths(ref["attention_mask"]) == [11, 11, 7]
    want = {"mean": masked_mean(ref["last_hidden_state"], ref["attention_mask"]),
            "cls": ref["last_hidden_state"][:, 0], "pooler": ref["pooler_output"]}[pooling]
    check_rows(mt, padded(ref), want)


# ----------------------------------------------------------------------------- T5 encoder
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_t5_encoder_pooling_of_padded_rows_equals_the_rows_unpadded(pooling):
    """mean / first token of the encoder states transformers computed, padded or alone."""
    model, ref = fixture("t5-tiny")
    mt = MultiTaskModel(model, [Spec("a")], pooling=pooling)
    states = ref["encoder_last_hidden_state"]
    want = masked_mean(states, ref["attention_mask"]) if pooling == "mean" else states[:, 0]
    check_rows(mt, padded(ref), want)


# ----------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("name", ["llama-tiny", "mpt-tiny"])
def test_decoder_features_are_the_last_real_token(name):
    """The vector of a right-padded row is the final state of its last real token: through the
    LM head it gives the logits transformers computed at that position."""
    model, ref = fixture(name)
    mt = MultiTaskModel(model, [Spec("a")])
    batch = padded(ref)
    head = model.lm_head.weight if name == "llama-tiny" else model.transformer.wte.weight   # MPT: tied
    got = features(mt, batch)
    last = [n - 1 for n in lengths(ref["attention_mask"])]           # 10, 10, 6
    want = torch.stack([ref["logits"][b, last[b]] for b in range(3)])
    assert (F.linear(got, head) - want).abs().max().item() <= 1e-4
    for b in range(3):
        assert (got[b] - features(mt, alone(batch, b))[0]).abs().max().item() <= 1e-5, b


# ----------------------------------------------------------------------------- ForwardContext.pooled
def test_context_pooling_averages_only_the_real_tokens():
    """pooled(x) is the mean over each row's real tokens, whatever the padding holds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    got = ForwardContext(mask=mask).pooled(x)
    want = torch.stack([x[0].mean(0), x[1, :2].mean(0), x[2, :5].mean(0)])
    torch.testing.assert_close(got, want)
    noisy = torch.where(mask.bool()[..., None], x, 100 * torch.randn(x.shape, generator=g))
    torch.testing.assert_close(ForwardContext(mask=mask).pooled(noisy), want)   # padding never counts
    torch.testing.assert_close(ForwardContext().pooled(x), x.mean(1))          # no mask: every token
    flat = torch.randn(3, 5, generator=g)
    assert ForwardContext(mask=mask).pooled(flat) is flat                      # one vector per sample already


def test_more_contrastive_loss_of_a_padded_batch_is_the_mean_of_the_rows_alone():
    """Eq. 8 in every MoRE module of bert-tiny: on a padded batch, each module's loss is the mean
    over rows of the loss of that row alone, unpadded (h_i pools the real tokens only)."""
    model, ref = fixture("bert-tiny")
    torch.manual_seed(0)
    attach_adapters(model, "more", ["query", "value", "intermediate.dense"], num_tasks=2, rank=4, alpha=8)
    model.train()
    batch = padded(ref)
    batch["task_ids"] = torch.tensor([1, 0, 1])

    def losses(b):
        ctx = ForwardContext(task_ids=b["task_ids"], aux_losses={})
        with torch.no_grad():
            model(b["input_ids"], b["attention_mask"], b["token_type_ids"], ctx=ctx)
        return torch.stack(ctx.aux_losses["more_contrastive"])      # one per module
    got = losses(batch)
    assert got.shape == (3 * model.config.num_hidden_layers,)
    want = torch.stack([losses(alone(batch, b)) for b in range(3)]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
