"""MPT's fused Wqkv as three addressable row blocks q, k, v (layers.FusedLinear/RowBlock):
the base is unchanged, each block carries its own adapter on its own third of the output,
merging folds each block's ΔW into its rows, save/load and deepcopy keep every block on its own
parent, the base weight is counted and saved once, and MTL-LoRA Table 1's Q, K, V, O modules
can be counted. Every expected value is computed here from the tensors themselves."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES, need
from mtlref.adapters import (REGISTRY, adapters_of, attach_adapters, count_parameters, load_adapters,
                             merge_adapters, save_adapters)
from mtlref.pretrained import load_model, read_config
from mtlref.layers import AdaptedLinear, ForwardContext, FusedLinear, RowBlock
from mtlref.models import mpt

NUM_TASKS, RANK, ALPHA = 3, 8, 16
OPTIONS = {"moelora": {"num_experts": 4, "task_dim": 8}}
MERGEABLE = [m for m, cls in REGISTRY.items() if cls.mergeable]
BLOCKS = ("q", "k", "v")
BASES: dict[str, torch.nn.Module] = {}


# ----------------------------------------------------------------------------- helpers
def base_model(name: str = "fixture") -> torch.nn.Module:
    """mpt-tiny (no biases, as MPT-7B), or a random MPT with linear biases ("biased") so that
    the bias views are exercised too. Built once; tests work on deep copies."""
    if name not in BASES:
        if name == "fixture":
            BASES[name] = load_model(need(FIXTURES / "mpt-tiny"))
        else:
            torch.manual_seed(0)
            model = mpt.Model(mpt.Config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, no_bias=False)).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 1:                      # biases and norms away from 0 / 1
                        p.add_(0.1 * torch.randn(p.shape))
            BASES[name] = model
    return BASES[name]


def inputs(model):
    """The fixture's reference batch (3 rows, the last right-padded) or a random one."""
    if model.config.vocab_size == 311:
        ref = load_file(str(FIXTURES / "mpt-tiny" / "reference.safetensors"))
        return ref["input_ids"], ref["attention_mask"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 6:] = 0
    return ids, mask


def logits(model, task_ids=torch.tensor([0, 2, 1])):
    ids, mask = inputs(model)
    with torch.no_grad():
        return model(ids, attention_mask=mask, task_ids=task_ids)


def attach(method: str, targets, name: str = "fixture", **options):
    """A deep copy of the base with `method` on `targets`, every adapter tensor moved away from
    its init (B = 0 would hide the adapters)."""
    model = copy.deepcopy(base_model(name))
    torch.manual_seed(0)
    attach_adapters(model, method, targets, num_tasks=NUM_TASKS, rank=RANK, alpha=ALPHA,
                    **{**OPTIONS.get(method, {}), **options})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def fused(model, layer: int = 0) -> FusedLinear:
    return model.transformer.blocks[layer].attn.Wqkv


def checkpoint_weight(name: str, layer: int = 0) -> torch.Tensor:
    """The stored Wqkv weight [3C, C], read from the base's state_dict (not through a block)."""
    return base_model(name).state_dict()[f"transformer.blocks.{layer}.attn.Wqkv.weight"]


def rows(block: str, C: int) -> slice:
    i = BLOCKS.index(block)
    return slice(i * C, (i + 1) * C)


# ----------------------------------------------------------------------------- (1) the base
@pytest.mark.parametrize("name", ["fixture", "biased"])
def test_without_adapters_the_output_is_bitwise_the_plain_slot(name):
    model = base_model(name)
    if name == "fixture":                               # the transformers reference, as test_llama_mpt
        ids, mask = inputs(model)
        ref = load_file(str(FIXTURES / "mpt-tiny" / "reference.safetensors"))["logits"]
        assert (logits(model) - ref)[mask.bool()].abs().max().item() <= 1e-4
    # the same model with a plain AdaptedLinear Wqkv (the slot before row blocks) on the same weights
    plain = copy.deepcopy(model)
    for block in plain.transformer.blocks:
        old = block.attn.Wqkv
        new = AdaptedLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight, new.bias = old.weight, old.bias
        block.attn.Wqkv = new
    assert torch.equal(logits(model), logits(plain))
    x = torch.randn(2, 5, fused(model).in_features)
    W, b = checkpoint_weight(name), base_model(name).state_dict().get("transformer.blocks.0.attn.Wqkv.bias")
    with torch.no_grad():
        assert torch.equal(fused(model)(x), F.linear(x, W, b))


# ----------------------------------------------------------------------------- (2), (3) block adapters
@pytest.mark.parametrize("name", ["fixture", "biased"])
def test_lora_on_q_k_v_each_adds_its_own_delta(name):
    model = attach("lora", ["q", "k", "v"], name)
    slot = fused(model)
    C = slot.in_features
    x = torch.randn(2, 5, C)
    W = checkpoint_weight(name)
    b = base_model(name).state_dict().get("transformer.blocks.0.attn.Wqkv.bias")
    s = ALPHA / RANK
    deltas = []
    for n in BLOCKS:
        A, B = getattr(slot, n).adapter.lora_A, getattr(slot, n).adapter.lora_B   # (r, C), (C, r)
        assert A.shape == (RANK, C) and B.shape == (C, RANK)
        deltas.append(s * (x @ A.T) @ B.T)                                          # (2, 5, C)
    expected = F.linear(x, W, b) + torch.cat(deltas, dim=-1)                       # x Wᵀ + b + [ΔY_q | ΔY_k | ΔY_v]
    with torch.no_grad():
        out = slot(x, ForwardContext())
    assert out.shape == (2, 5, 3 * C)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # three independent adapters: different tensors, different deltas
    a_q, a_k, a_v = (getattr(slot, n).adapter.lora_A for n in BLOCKS)
    assert len({id(a_q), id(a_k), id(a_v)}) == 3 and not torch.equal(a_q, a_k) and not torch.equal(a_k, a_v)
    assert (deltas[0] - deltas[1]).abs().max() > 1e-2


@pytest.mark.parametrize("block", BLOCKS)
def test_a_block_adapter_changes_only_its_own_third(block):
    target = block if block != "k" else "Wqkv.k"          # the dotted target works the same
    model = attach("lora", [target])
    slot = fused(model)
    assert [n for n in BLOCKS if getattr(slot, n).adapter is not None] == [block] and slot.adapter is None
    C = slot.in_features
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        out = slot(x, ForwardContext())
    base = F.linear(x, checkpoint_weight("fixture"))
    for n in BLOCKS:
        r = rows(n, C)
        if n == block:
            assert (out[..., r] - base[..., r]).abs().max() > 1e-2
        else:
            assert torch.equal(out[..., r], base[..., r]), n


def test_dora_on_a_block_reads_its_rows_and_bias():
    """DoRA reads base.weight and base.bias: on a block they must be that block's rows."""
    model = attach("dora", ["v"], "biased")
    slot = fused(model)
    C, v = slot.in_features, slot.v
    state = base_model("biased").state_dict()
    W_v = state["transformer.blocks.0.attn.Wqkv.weight"][2 * C:]                   # (C, C)
    b_v = state["transformer.blocks.0.attn.Wqkv.bias"][2 * C:]                     # (C,)
    assert (v.in_features, v.out_features) == (C, C)
    assert torch.equal(v.weight, W_v) and torch.equal(v.bias, b_v)
    assert v.weight.data_ptr() == slot.weight.data_ptr() + 2 * C * C * slot.weight.element_size()
    a = v.adapter
    x = torch.randn(2, 5, C)
    V = W_v + (ALPHA / RANK) * a.lora_B @ a.lora_A                                  # W + s B A
    W_new = (a.magnitude / V.norm(dim=1))[:, None] * V                             # m ⊙ V / ‖V‖_c
    with torch.no_grad():
        out = slot(x, ForwardContext())
    assert torch.allclose(out[..., 2 * C:], F.linear(x, W_new, b_v), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., :2 * C], F.linear(x, state["transformer.blocks.0.attn.Wqkv.weight"][:2 * C],
                                                  state["transformer.blocks.0.attn.Wqkv.bias"][:2 * C]))


def test_block_adapters_train_and_the_base_does_not():
    model = attach("mtl-lora", ["q", "k", "v"]).train()
    ids, mask = inputs(model)
    model(ids, attention_mask=mask, task_ids=torch.tensor([0, 2, 1])).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert ".Wqkv.q.adapter." in n or ".Wqkv.k.adapter." in n or ".Wqkv.v.adapter." in n, n
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


# ----------------------------------------------------------------------------- (4) merging
@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_equals_unmerged_and_only_adapted_rows_change(method):
    model = attach(method, ["q", "v", "out_proj"]).eval()
    C = fused(model).in_features
    before = [fused(model, i).weight.clone() for i in range(2)]
    for t in range(NUM_TASKS):
        merged = merge_adapters(model, t)
        assert not adapters_of(merged) and not hasattr(merged, "adapter_config")
        assert all(b.adapter is None for i in range(2) for b in fused(merged, i).row_blocks())
        assert all(fused(merged, i).q.parent is fused(merged, i) for i in range(2))
        for i in range(2):
            W0, Wm = checkpoint_weight("fixture", i), fused(merged, i).weight
            assert torch.equal(Wm[C:2 * C], W0[C:2 * C])                            # k: not adapted
            assert not torch.equal(Wm[:C], W0[:C]) and not torch.equal(Wm[2 * C:], W0[2 * C:])
            assert torch.equal(fused(model, i).weight, before[i])                  # the original untouched
        ids = torch.full((3,), t)
        m, u = logits(merged, ids), logits(model, ids)
        assert (m - u).abs().max().item() <= 1e-5 * max(1.0, u.abs().max().item())


# ----------------------------------------------------------------------------- (5) save, load, deepcopy
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_save_then_load_reproduces_the_outputs(method, tmp_path):
    targets = ["q", "k", "v", "out_proj"] + (["up_proj", "down_proj"] if method == "mixlora" else [])
    model = attach(method, targets).eval()
    save_adapters(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    for i in range(2):
        for n in BLOCKS:
            assert any(k.startswith(f"transformer.blocks.{i}.attn.Wqkv.{n}.adapter.") for k in keys)
    assert not any(".Wqkv.adapter." in k or k.endswith("Wqkv.weight") for k in keys)
    fresh = copy.deepcopy(base_model())
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_a_deep_copy_keeps_its_blocks_on_its_own_weight():
    model = attach("dora", ["q", "k", "v"])
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone), logits(model))
    C = fused(model).in_features
    for i in range(2):
        mine, theirs = fused(clone, i), fused(model, i)
        for j, n in enumerate(BLOCKS):
            assert getattr(mine, n).parent is mine and getattr(mine, n).parent is not theirs
            assert getattr(mine, n).weight.data_ptr() == mine.weight.data_ptr() + j * C * C * 4
    with torch.no_grad():
        fused(clone).weight[C:2 * C] += 1.0
    assert torch.equal(fused(clone).k.weight, checkpoint_weight("fixture")[C:2 * C] + 1.0)
    assert torch.equal(fused(model).k.weight, checkpoint_weight("fixture")[C:2 * C])


# ----------------------------------------------------------------------------- (6) targeting
@pytest.mark.parametrize("targets", [["Wqkv", "q"], ["k", "attn.Wqkv"], ["Wqkv.v", "Wqkv", "out_proj"]])
def test_a_fused_slot_and_its_block_together_are_an_error(targets):
    model = copy.deepcopy(base_model())
    fused_t = next(t for t in targets if t.endswith("Wqkv"))
    block_t = next(t for t in targets if t[-1] in "qkv" and not t.endswith("Wqkv"))
    with pytest.raises(ValueError, match=f"'{fused_t}' and '{block_t}'"):
        attach_adapters(model, "lora", targets)
    assert not adapters_of(model) and not hasattr(model, "adapter_config")
    assert all(p.requires_grad for p in model.parameters())


def test_the_fused_slot_is_still_one_target_and_unknown_targets_list_the_blocks():
    model = attach_adapters(copy.deepcopy(base_model()), "lora", ["Wqkv"])
    assert sorted(adapters_of(model)) == [f"transformer.blocks.{i}.attn.Wqkv" for i in range(2)]
    assert fused(model).adapter.lora_B.shape == (3 * 64, 8)
    with pytest.raises(ValueError, match=r"'qkv' matches no projection.*'Wqkv\.k', 'Wqkv\.q', 'Wqkv\.v'"):
        attach_adapters(copy.deepcopy(base_model()), "lora", ["qkv"])


def test_t5_q_targets_are_unchanged():
    t5 = load_model(need(FIXTURES / "t5-tiny"))
    expected = sorted(n for n, m in t5.named_modules() if isinstance(m, AdaptedLinear) and n.endswith(".q"))
    assert expected and all(n.endswith(("SelfAttention.q", "EncDecAttention.q")) for n in expected)
    attach_adapters(t5, "lora", ["q"])
    assert sorted(adapters_of(t5)) == expected


# ----------------------------------------------------------------------------- (7) counted once
def test_the_base_weight_is_stored_and_counted_once():
    model = attach("mtl-lora", ["q", "k", "v"])
    state = model.state_dict()
    fused_keys = [k for k in state if k.endswith("Wqkv.weight")]
    assert fused_keys == [f"transformer.blocks.{i}.attn.Wqkv.weight" for i in range(2)]
    assert not any(k.endswith((".q.weight", ".k.weight", ".v.weight", ".q.bias")) for k in state)
    stored = load_file(str(FIXTURES / "mpt-tiny" / "model.safetensors"))
    assert {k for k in state if ".adapter." not in k} == set(stored) - {"lm_head.weight"}
    base_total = sum(t.numel() for k, t in stored.items() if k != "lm_head.weight")
    adapter_total = sum(t.numel() for k, t in state.items() if ".adapter." in k)
    trainable, total, _ = count_parameters(model)
    assert (trainable, total) == (adapter_total, base_total + adapter_total)
    assert all(not isinstance(m, RowBlock) or not list(m.parameters(recurse=False)) for m in model.modules())


def test_blocks_of_a_meta_model_are_meta():
    cfg = mpt.Config.from_hf(read_config(need(FIXTURES / "mpt-tiny")))
    with torch.device("meta"):
        model = mpt.Model(cfg)
    assert all(b.weight.is_meta and b.weight.shape == (64, 64) for b in fused(model).row_blocks())
    with pytest.raises(ValueError, match="meta device"):
        attach_adapters(model, "lora", ["q"])


# ----------------------------------------------------------------------------- (8) MTL-LoRA Table 1
def test_mtl_lora_on_q_k_v_o_has_four_adapters_per_layer():
    n = 3
    model = attach_adapters(copy.deepcopy(base_model()), "mtl-lora", ["q", "k", "v", "out_proj"],
                            num_tasks=NUM_TASKS, rank=RANK, alpha=ALPHA, num_up=n)
    L, C, r, T = model.config.n_layers, model.config.d_model, RANK, NUM_TASKS
    found = adapters_of(model)
    assert sorted(found) == sorted(f"transformer.blocks.{i}.attn.{p}" for i in range(L)
                                   for p in ("Wqkv.q", "Wqkv.k", "Wqkv.v", "out_proj"))
    for a in found.values():
        assert a.lora_A.shape == (r, C) and a.task_lambda.shape == (T, r) and a.task_weights.shape == (T, n)
        assert a.lora_B.shape == (n, C, r)
    assert len({id(a.lora_A) for a in found.values()}) == 4 * L
    assert len({id(a.task_lambda) for a in found.values()}) == 4 * L
    assert len({id(a.task_weights) for a in found.values()}) == 4 * L
    assert count_parameters(model)[0] == 4 * L * (r * C + n * C * r + T * r + T * n)
