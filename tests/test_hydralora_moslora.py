"""HydraLoRA and MoSLoRA (mtlref/adapters/hydralora.py, moslora.py): each equation written out
here from the adapter's tensors (randomised), their inits as the official code draws them, what
they share with LoRA, and what they refuse. The registry's properties (zero ΔY at init, what
trains, mixed batches, merge, save/load) are in test_adapters.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_slot
from mtlref.adapters import REGISTRY, attach_adapters, merge_adapters
from mtlref.adapters.attach import adapters_of
from mtlref.export import task_loras
from mtlref.layers import ForwardContext
from test_adapter_equations import ALPHA, R, S, T, TASKS, attach, check, inputs


# ----------------------------------------------------------------------------- MoSLoRA
def test_moslora_is_b_mixer_a():
    """ΔW = s B M A for every task alike (no task ids in the equation)."""
    slot = attach("moslora", make_slot())
    a = slot.adapter
    check(slot, lambda t: slot.weight + S * a.lora_B @ a.lora_mixer @ a.lora_A)


@pytest.mark.parametrize("alpha", [1.0, 32.0])
def test_moslora_scaling_is_alpha_over_r(alpha):
    slot = attach("moslora", make_slot(), alpha=alpha)
    a = slot.adapter
    check(slot, lambda t: slot.weight + (alpha / R) * a.lora_B @ a.lora_mixer @ a.lora_A)


def test_moslora_mixer_inits():
    """kaiming (official code): U(±1/√r), not the identity; orthogonal: MᵀM = I; identity: M = I,
    and then the adapter is exactly LoRA with the same A and B."""
    torch.manual_seed(0)
    kai = REGISTRY["moslora"](make_slot(), T, 16, ALPHA).lora_mixer
    assert kai.abs().max() <= 1 / math.sqrt(16) and kai.abs().max() > 0.8 / math.sqrt(16)
    assert not torch.allclose(kai, torch.eye(16))
    orth = REGISTRY["moslora"](make_slot(), T, 16, ALPHA, mixer_init="orthogonal").lora_mixer
    assert torch.allclose(orth.T @ orth, torch.eye(16), atol=1e-5)
    slot = attach("moslora", make_slot(), randomised=False, mixer_init="identity")
    assert torch.equal(slot.adapter.lora_mixer, torch.eye(R))
    lora = attach("lora", make_slot(), randomised=False)
    with torch.no_grad():
        slot.adapter.lora_B.normal_()
        lora.adapter.lora_A.copy_(slot.adapter.lora_A)
        lora.adapter.lora_B.copy_(slot.adapter.lora_B)
    for x in inputs():
        assert torch.equal(slot(x, ForwardContext()), lora(x, ForwardContext()))
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        REGISTRY["moslora"](make_slot(), T, R, ALPHA, mixer_init="zeros")


def test_moslora_exports_the_mixer_folded_into_a():
    slot = attach("moslora", make_slot())
    a = slot.adapter
    A, B = a.as_lora(1, slot)
    assert A.shape == (R, slot.in_features) and B.shape == (slot.out_features, R)
    assert torch.allclose(B @ A, a.delta_weight(1, slot), atol=1e-6)
    assert torch.allclose(A, a.lora_mixer @ a.lora_A)


# ----------------------------------------------------------------------------- HydraLoRA
def hydra_by_hand(slot, x):
    """y = W x + b + s Σ_i softmax(W_g x)_i B_i A x, token by token, a loop over heads."""
    a = slot.adapter
    out = F.linear(x, slot.weight, slot.bias)
    pi = torch.softmax(x @ a.router.T, dim=-1)
    for i in range(a.num_heads):
        out = out + S * pi[..., i:i + 1] * (x @ a.lora_A.T @ a.lora_B[i].T)
    return out


@pytest.mark.parametrize("heads", [1, 3])
def test_hydralora_routes_every_token_over_the_heads(heads):
    slot = attach("hydralora", make_slot(), num_heads=heads)
    for x in inputs():
        ctx = ForwardContext(task_ids=TASKS)
        assert torch.allclose(slot(x, ctx), hydra_by_hand(slot, x), atol=1e-5)
        # no task ids in the equation: other ids, or none, give the same output
        assert torch.equal(slot(x, ctx), slot(x, ForwardContext(task_ids=TASKS.flip(0))))
        assert torch.equal(slot(x, ctx), slot(x, ForwardContext()))


def test_hydralora_with_one_head_is_lora():
    """N = 1: softmax of one logit is 1, so ΔY = s B_1 A x, LoRA with the same A and B."""
    hydra = attach("hydralora", make_slot(), num_heads=1)
    lora = attach("lora", make_slot(), randomised=False)
    with torch.no_grad():
        lora.adapter.lora_A.copy_(hydra.adapter.lora_A)
        lora.adapter.lora_B.copy_(hydra.adapter.lora_B[0])
    for x in inputs():
        assert torch.allclose(hydra(x, ForwardContext()), lora(x, ForwardContext()), atol=1e-6)


def test_hydralora_router_reads_x_not_the_dropped_out_x():
    """Official code: the router sees the layer's input itself; only A sees it after dropout."""
    slot = attach("hydralora", make_slot(), dropout=0.5).train()
    a = slot.adapter
    x = inputs()[0]
    torch.manual_seed(0)
    out = slot(x, ForwardContext())
    torch.manual_seed(0)
    xd = F.dropout(x, 0.5, training=True)                                    # the same mask
    pi = torch.softmax(x @ a.router.T, dim=-1)                               # routed on x
    ref = F.linear(x, slot.weight, slot.bias)
    for i in range(a.num_heads):
        ref = ref + S * pi[..., i:i + 1] * (xd @ a.lora_A.T @ a.lora_B[i].T)
    assert torch.allclose(out, ref, atol=1e-5)


def test_hydralora_init_and_refusals():
    torch.manual_seed(0)
    a = REGISTRY["hydralora"](make_slot(fin=64), T, R, ALPHA)
    assert a.num_heads == 4 and a.lora_B.shape == (4, 10, R) and not a.lora_B.any()
    assert a.router.shape == (4, 64) and a.router.abs().max() <= 1 / math.sqrt(64)
    assert a.router.abs().max() > 0.8 / math.sqrt(64)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        REGISTRY["hydralora"](make_slot(), T, R, ALPHA, num_heads=0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", make_slot())
    attach_adapters(model, "hydralora", ["q_proj"], num_tasks=T, rank=R)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model, 0)
    with pytest.raises(ValueError, match="router computes for every token"):
        task_loras(model, 0)
    assert list(adapters_of(model)) == ["q_proj"]
