"""The ablation switches and the initialisations taken from the official codes, each checked
by value against an independent computation written here: MultiLoRA's per-branch scales,
MixLoRA's router init and Mixtral-convention load balance, DoRA's dropout, MoELoRA's init,
MTL-LoRA's Table 5 switches and MoRE's task_dim / selection / task_embedding / official
options, plus the MoRE straight-through estimator: that the gate trains through it alone,
and the value of its gradient."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_slot
from mtlref.adapters import REGISTRY, attach_adapters, load_adapters, merge_adapters, save_adapters
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext

T, R, ALPHA = 3, 4, 8.0
S = ALPHA / R
TASKS = torch.tensor([2, 0, 1, 2])


def randomise(module: nn.Module, seed=1, scale=0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def attach(method, slot, randomised=True, scale=0.3, **options) -> AdaptedLinear:
    torch.manual_seed(0)
    slot.adapter = REGISTRY[method](slot, T, R, ALPHA, **options)
    if randomised:
        randomise(slot.adapter, scale=scale)
    return slot.eval()


def x3(fin=12, seed=2, b=4, n=5):
    return torch.randn(b, n, fin, generator=torch.Generator().manual_seed(seed))


def delta(slot, x, ctx):
    """ΔY alone: the adapter's output for x, given the slot's base output."""
    return slot.adapter(x, F.linear(x, slot.weight, slot.bias), ctx, slot)


def close(a, b, tol=1e-5):
    """Equal up to fp32 rounding, relative to the size of b."""
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def per_task_delta(x, tasks, dw):
    """ΔY_b = x_b ΔW_{t_b}^T, one sample at a time."""
    return torch.stack([F.linear(x[b], dw(int(tasks[b]))) for b in range(x.shape[0])])


def n_adapter_params(adapter) -> int:
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- MultiLoRA
def test_multilora_init_per_branch_zero_scales_and_kaiming_a_and_b():
    a = REGISTRY["multilora"](make_slot(256, 200), T, 8, ALPHA, num_loras=3)
    assert a.zero_init == ("lora_scale",)
    assert a.lora_scale.shape == (3, 200) and torch.count_nonzero(a.lora_scale) == 0
    for p, fan_in in ((a.lora_A, 256), (a.lora_B, 8)):               # U(-1/√fan_in, 1/√fan_in)
        bound = 1 / math.sqrt(fan_in)
        assert p.abs().max().item() <= bound and p.abs().max().item() > 0.99 * bound
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert not torch.allclose(a.lora_B[0], a.lora_B[1])                  # drawn independently
    assert n_adapter_params(a) == 3 * 8 * (256 + 200) + 3 * 200          # n·r·(in+out) + n·out


def test_multilora_each_branch_has_its_own_scaling_vector():
    slot = attach("multilora", make_slot(), num_loras=3)
    a = slot.adapter
    x = x3()
    ref = sum(S * a.lora_scale[i] * F.linear(F.linear(x, a.lora_A[i]), a.lora_B[i]) for i in range(3))
    assert close(delta(slot, x, ForwardContext()), ref)               # s Σ_i scale_i ⊙ B_i A_i x
    dw = S * sum(a.lora_scale[i][:, None] * (a.lora_B[i] @ a.lora_A[i]) for i in range(3))
    assert close(a.delta_weight(0, slot), dw)
    with torch.no_grad():                                              # only branch 1 scaled: only B_1 A_1 counts
        a.lora_scale.zero_()
        a.lora_scale[1] = torch.linspace(-1, 1, 10)
    ref = S * torch.linspace(-1, 1, 10) * F.linear(F.linear(x, a.lora_A[1]), a.lora_B[1])
    assert close(delta(slot, x, ForwardContext()), ref)


# ----------------------------------------------------------------------------- MixLoRA
class FFN(FeedForward):
    def __init__(self, d=8, f=12):
        super().__init__()
        self.gate_proj, self.up_proj = make_slot(d, f, seed=3), make_slot(d, f, seed=4)
        self.down_proj = make_slot(f, d, seed=5)

    def parts(self):
        return self.gate_proj, self.up_proj, self.down_proj, F.gelu


def test_mixlora_router_starts_normal_with_std_0_02_and_no_bias():
    torch.manual_seed(0)
    a = REGISTRY["mixlora"](FFN(d=256), ("up",), T, R, ALPHA, num_experts=8, top_k=2)
    w = a.router.weight
    assert a.router.bias is None and w.shape == (8, 256)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 0.002
    assert w.abs().max().item() > 3 * 0.02                             # a normal's tails, not U(±1/√256)=±0.0625


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixlora_balance_is_mixtral_load_balancing_loss_func(top_k):
    """transformers' load_balancing_loss_func: expert_mask one_hot(top-k) (N, k, E), its mean
    over tokens (k, E) times the mean routing probability (E), summed, times E."""
    ffn = FFN()
    ffn.adapter = randomise(REGISTRY["mixlora"](ffn, ("up", "down"), T, R, ALPHA, num_experts=4, top_k=top_k),
                            scale=1.0)
    ffn.train()
    x = x3(8)
    aux = {}
    ffn(x, ForwardContext(aux_losses=aux))
    (loss,) = aux["mixlora_balance"]
    logits = x.reshape(-1, 8) @ ffn.adapter.router.weight.T
    expert_mask = F.one_hot(logits.topk(top_k, dim=-1).indices, 4).float()   # (N, k, E)
    tokens_per_expert = expert_mask.mean(0)                                   # (k, E)
    router_prob_per_expert = torch.softmax(logits, -1).mean(0)                 # (E,)
    ref = 4 * (tokens_per_expert * router_prob_per_expert[None]).sum()
    assert torch.allclose(loss, ref, atol=1e-6)


# ----------------------------------------------------------------------------- DoRA
def dora_w_prime(slot, a):
    V = slot.weight + S * a.lora_B @ a.lora_A
    return a.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)


def test_dora_dropout_masks_both_terms_as_peft_does():
    slot = attach("dora", make_slot(), dropout=0.5).train()
    a = slot.adapter
    x = x3()
    torch.manual_seed(7)
    got = delta(slot, x, ForwardContext())
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)                              # the same mask, reproduced by seed
    assert (xd == 0).any() and not torch.equal(xd, x)
    # peft: y + W' xd - W xd, i.e. (m/‖V‖ - 1) ⊙ W xd + (m/‖V‖) s B A xd with ONE mask
    ref = F.linear(xd, dora_w_prime(slot, a)) - F.linear(xd, slot.weight)
    assert close(got, ref)
    slot.eval()                                                        # eval: no dropout, the fast path
    ref = F.linear(x, dora_w_prime(slot, a)) - F.linear(x, slot.weight)
    assert close(delta(slot, x, ForwardContext()), ref)


# ----------------------------------------------------------------------------- MoELoRA
def test_moelora_init_as_the_official_code():
    torch.manual_seed(0)
    a = REGISTRY["moelora"](make_slot(512, 10), 400, 8, ALPHA, num_experts=4, task_dim=16)
    assert a.lora_A.std().item() == pytest.approx(0.01, rel=0.03) and abs(a.lora_A.mean().item()) < 1e-3
    assert a.lora_A.abs().max().item() > 3.5 * 0.01                    # normal tails
    assert torch.count_nonzero(a.lora_B) == 0
    assert a.task_embedding.std().item() == pytest.approx(1.0, rel=0.05)   # nn.Embedding's N(0, 1)
    assert a.gate.bias is None and a.gate.weight.shape == (4, 16)


# ----------------------------------------------------------------------------- MTL-LoRA
def mtl_weight(a, t, tau, lam=True):
    pi = torch.softmax(a.task_weights[t] / tau, dim=0)
    Bbar = sum(pi[i] * a.lora_B[i] for i in range(3))                  # n = 3, the default
    L = torch.diag(a.task_lambda[t]) if lam else torch.eye(R)
    return S * Bbar @ L @ a.lora_A


def test_mtl_lora_without_task_lambda_is_identity_and_not_a_parameter():
    slot = attach("mtl-lora", make_slot(), task_lambda=False)
    a = slot.adapter
    assert a.task_lambda is None and "task_lambda" not in dict(a.named_parameters())
    assert "task_lambda" not in a.state_dict()
    assert n_adapter_params(a) == R * 12 + 3 * 10 * R + T * 3            # A, the n B^i, w_t: no Λ_t
    x = x3()
    ref = per_task_delta(x, TASKS, lambda t: mtl_weight(a, t, 0.5, lam=False))
    assert close(delta(slot, x, ForwardContext(task_ids=TASKS)), ref)
    for t in range(T):
        assert close(a.delta_weight(t, slot), mtl_weight(a, t, 0.5, lam=False))
    with pytest.raises(ValueError, match="full_lambda"):
        REGISTRY["mtl-lora"](make_slot(), T, R, ALPHA, task_lambda=False, full_lambda=True)


def test_mtl_lora_tau_one_is_plain_softmax():
    slot = attach("mtl-lora", make_slot(), tau=1.0)                    # Table 5 "w/o τ"
    a = slot.adapter
    pi = torch.softmax(a.task_weights, dim=-1)                         # softmax(w_t), no temperature
    assert torch.equal(a.mixed_up(), torch.einsum("tn,nor->tor", pi, a.lora_B))
    x = x3()
    ref = per_task_delta(x, TASKS, lambda t: S * sum(pi[t, i] * a.lora_B[i] for i in range(3))
                         @ torch.diag(a.task_lambda[t]) @ a.lora_A)
    assert close(delta(slot, x, ForwardContext(task_ids=TASKS)), ref)


def test_mtl_lora_one_up_projection():
    slot = attach("mtl-lora", make_slot(), num_up=1)                   # Table 5 "n = 1"
    a = slot.adapter
    assert a.lora_B.shape == (1, 10, R) and a.task_weights.shape == (T, 1)
    x = x3()
    ref = per_task_delta(x, TASKS, lambda t: S * a.lora_B[0] @ torch.diag(a.task_lambda[t]) @ a.lora_A)
    assert close(delta(slot, x, ForwardContext(task_ids=TASKS)), ref)


def test_mtl_lora_kaiming_weights_init_is_uniform_over_one_over_sqrt_n():
    torch.manual_seed(0)
    a = REGISTRY["mtl-lora"](make_slot(), 4000, R, ALPHA, num_up=3, weights_init="kaiming")
    w, bound = a.task_weights, 1 / math.sqrt(3)
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03) and abs(w.mean().item()) < 0.01
    with pytest.raises(ValueError, match="weights_init"):
        REGISTRY["mtl-lora"](make_slot(), T, R, ALPHA, weights_init="zeros")


# ----------------------------------------------------------------------------- MoRE: references
def masked_mean(x, mask):
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def truncated(a, k, factor):
    """factor · s · B[:, :k] A[:k], (out, in)."""
    return factor * S * a.lora_B[:, :k] @ a.lora_A[:k]


def test_more_task_dim_free_with_a_fixed_random_projection():
    torch.manual_seed(0)
    big = REGISTRY["more"](make_slot(300, 10), T, R, ALPHA, task_dim=200)
    assert big.proj.shape == (200, 300) and big.proj.std().item() == pytest.approx(1 / math.sqrt(200), rel=0.03)
    slot = attach("more", make_slot(), task_dim=5).train()
    a = slot.adapter
    assert "proj" in a.state_dict() and "proj" not in dict(a.named_parameters())   # a persistent buffer
    assert n_adapter_params(a) == R * (12 + 10) + 5 * (R + T) + R              # Table 6: r(in+out) + h(r+T) + b_g
    assert REGISTRY["more"](make_slot(), T, R, ALPHA).proj is None              # h = in: no projection
    x = x3().requires_grad_(True)
    mask = torch.ones(4, 5)
    mask[1, 2:] = 0
    aux = {}
    out = delta(slot, x, ForwardContext(task_ids=TASKS, mask=mask, aux_losses=aux))
    (loss,) = aux["more_contrastive"]
    h = masked_mean(x, mask) @ a.proj.T                                         # R · pooled(x), (N, h)
    sim = F.cosine_similarity(h[:, None, :], a.task_embedding[None], dim=-1)   # (N, T)
    assert torch.allclose(loss, F.cross_entropy(sim / 0.05, TASKS), atol=1e-5)   # τ = 0.05, the default

    def w(t):                                                                   # Eq. 2-6 on e_t ∈ R^5
        p = torch.softmax(a.gate.weight @ a.task_embedding[t] + a.gate.bias, 0)
        k = int(p.argmax()) + 1
        return truncated(a, k, k / T)
    assert close(out, per_task_delta(x, TASKS, w))
    loss.backward()
    assert x.grad is None and a.task_embedding.grad.abs().sum() > 0             # detached h (default)
    proj = a.proj.clone()
    fresh = REGISTRY["more"](make_slot(), T, R, ALPHA, task_dim=5)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.proj, proj)                                        # saved and loaded


@pytest.mark.parametrize("linear_scaling", [True, False])
def test_more_soft_selection_weights_every_rank_expert(linear_scaling):
    slot = attach("more", make_slot(), selection="soft", linear_scaling=linear_scaling, scale=1.0)
    a = slot.adapter

    def w(t):                                                  # Σ_k p_t[k] c(k) s B[:, :k] A[:k], k = 1..r
        p = torch.softmax(a.gate.weight @ a.task_embedding[t] + a.gate.bias, 0)
        return sum(p[k - 1] * truncated(a, k, k / T if linear_scaling else 1.0) for k in range(1, R + 1))
    x = x3()
    assert close(delta(slot, x, ForwardContext(task_ids=TASKS)), per_task_delta(x, TASKS, w))
    for t in range(T):
        assert close(a.delta_weight(t, slot), w(t))
    p = torch.softmax(a.task_embedding @ a.gate.weight.T + a.gate.bias, -1).detach()   # Eq. 2, (T, r)
    assert torch.equal(a.rank_map(), p.argmax(-1) + 1)


def test_more_subset_selection_any_set_of_rank_columns():
    slot = attach("more", make_slot(), selection="subset", scale=1.0)
    a = slot.adapter
    with torch.no_grad():                                          # task 0: every column off
        a.task_embedding[0] = 0.0
        a.gate.bias.copy_(-0.5 - a.gate.bias.abs())
    q = torch.sigmoid(a.task_embedding @ a.gate.weight.T + a.gate.bias).detach()   # (T, r)
    on = q > 0.5
    assert on[0].sum() == 0 and on[1:].any() and not on[1:].all()                  # a real subset somewhere
    assert a.rank_map().tolist() == on.sum(-1).tolist()

    def w(t):                                                      # (|S_t|/|T|) s Σ_{j∈S_t} B_j A_j
        cols = [j for j in range(R) if on[t, j]]
        return sum(len(cols) / T * S * torch.outer(a.lora_B[:, j], a.lora_A[j]) for j in cols) \
            if cols else torch.zeros(10, 12)
    x = x3()
    out = delta(slot, x, ForwardContext(task_ids=TASKS))
    assert close(out, per_task_delta(x, TASKS, w))
    assert torch.equal(out[TASKS == 0], torch.zeros_like(out[TASKS == 0]))         # empty set: ΔY = 0
    # per-column STE: ∂ΔY/∂q_t[j] = (|S_t|/|T|) s B_j A_j x for every column j, on or off
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * G).sum().backward()
    z = F.linear(x, a.lora_A)                                      # (B, n, r) A x
    gB = torch.einsum("bno,or->bnr", G, a.lora_B)                  # (B, n, r) Gᵀ B_j
    dq_sample = (z * gB).sum(1) * (on[TASKS].sum(-1, keepdim=True) / T) * S        # (B, r)
    dq = torch.zeros(T, R).index_add_(0, TASKS, dq_sample)
    dlogit = dq * q * (1 - q)
    assert torch.allclose(a.gate.bias.grad, dlogit.sum(0), atol=1e-5)
    assert torch.allclose(a.gate.weight.grad, dlogit.T @ a.task_embedding.detach(), atol=1e-5)


def test_more_without_task_embeddings_selects_the_rank_per_sample():
    slot = attach("more", make_slot(), task_embedding=False, scale=1.0).train()
    a = slot.adapter
    assert a.task_embedding is None and "task_embedding" not in a.state_dict()
    assert n_adapter_params(a) == R * (12 + 10) + 12 * R + R
    x = 2 * x3()
    mask = torch.ones(4, 5)
    mask[0, 2:] = 0
    aux = {}
    out = delta(slot, x, ForwardContext(mask=mask, aux_losses=aux))    # no task ids needed
    assert aux == {}                                                   # Eq. 8 needs e_t: off
    u = masked_mean(x, mask)                                           # (B, in), real tokens only
    p = torch.softmax(u @ a.gate.weight.T + a.gate.bias, -1)
    ranks = p.argmax(-1) + 1
    assert len(set(ranks.tolist())) > 1                                # the rank really is per sample
    ref = torch.stack([F.linear(x[b], truncated(a, int(ranks[b]), int(ranks[b]) / T)) for b in range(4)])
    assert close(out, ref)
    assert a.rank_map().numel() == 0 and a.rank_map().dtype == torch.long
    with pytest.raises(TypeError, match="per sample"):
        a.delta_weight(0, slot)
    with pytest.raises(ValueError, match="contrastive"):
        REGISTRY["more"](make_slot(), T, R, ALPHA, task_embedding=False, contrastive=True)
    small = attach("more", make_slot(), task_embedding=False, task_dim=5)     # the gate reads R · pooled(x)
    u = masked_mean(x, mask) @ small.adapter.proj.T
    p = torch.softmax(u @ small.adapter.gate.weight.T + small.adapter.gate.bias, -1)
    ranks = p.argmax(-1) + 1
    ref = torch.stack([F.linear(x[b], truncated(small.adapter, int(ranks[b]), int(ranks[b]) / T)) for b in range(4)])
    assert close(delta(small, x, ForwardContext(mask=mask)), ref)


class Two(nn.Module):
    """Two adapted projections in a row: enough for attach/save/load/merge."""

    def __init__(self, d=12):
        super().__init__()
        self.q_proj, self.o_proj = make_slot(d, d, seed=8), make_slot(d, d, seed=9)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x, ctx):
        return self.o_proj(torch.tanh(self.q_proj(x, ctx)), ctx)


def test_more_without_task_embeddings_saves_loads_and_refuses_to_merge(tmp_path):
    torch.manual_seed(0)
    model = randomise(attach_adapters(Two(), "more", ["q_proj", "o_proj"], num_tasks=T, rank=R, alpha=ALPHA,
                                      task_embedding=False)).eval()
    save_adapters(model, tmp_path)
    torch.manual_seed(1)
    fresh = Two()
    cfg = load_adapters(fresh, tmp_path)
    assert cfg["rank_maps"] == {"q_proj": [], "o_proj": []}
    x = x3()
    with torch.no_grad():
        assert torch.equal(fresh(x, ForwardContext()), model(x, ForwardContext()))
    with pytest.raises(TypeError, match="per sample"):
        merge_adapters(model, 0)


# ----------------------------------------------------------------------------- MoRE: official mode
def test_more_official_init_and_a_frozen_rank_map():
    torch.manual_seed(0)
    a = REGISTRY["more"](make_slot(400, 10), 3, 8, ALPHA, official=True)
    e, W, b = a.task_embedding, a.gate.weight, a.gate.bias
    assert e.std().item() == pytest.approx(0.01, rel=0.1)                       # N(0, 0.01²)
    bound = math.sqrt(6 / 400)                                                  # kaiming relu, fan_in
    assert W.abs().max().item() <= bound and W.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert b.abs().max().item() <= 1 / math.sqrt(400)                           # nn.Linear's default bias
    want = torch.softmax(e @ W.T + b, -1).argmax(-1) + 1                        # the first forward's map
    assert torch.equal(a.rank_table, want) and torch.equal(a.rank_map(), want)
    assert not W.requires_grad and not b.requires_grad
    assert n_adapter_params(a) == 8 * (400 + 10) + 3 * 400                      # the gate is not trainable
    assert "rank_table" in a.state_dict()
    with torch.no_grad():                                                       # the gate moves: the map does not
        a.gate.weight.normal_()
        a.task_embedding.normal_()
    assert torch.equal(a.rank_map(), want)
    for bad in ({"selection": "soft"}, {"task_embedding": False}, {"task_dim": 5}, {"linear_scaling": False},
                {"detach_h": False}):
        with pytest.raises(ValueError, match="official"):
            REGISTRY["more"](make_slot(), T, R, ALPHA, official=True, **bad)


def test_more_official_forward_and_contrastive_loss():
    slot = attach("more", make_slot(), official=True).train()
    a = slot.adapter
    with torch.no_grad():
        a.rank_table.copy_(torch.tensor([4, 1, 3]))
    x = x3().requires_grad_(True)
    mask = torch.ones(4, 5)
    mask[1, 2:] = 0
    aux = {}
    out = delta(slot, x, ForwardContext(task_ids=TASKS, mask=mask, aux_losses=aux))

    def w(t):                                                   # s Σ_{j<=r_t} (j/r)² B_j A_j, no r_t/|T|
        k = int(a.rank_table[t])
        return sum((j / R) ** 2 * S * torch.outer(a.lora_B[:, j - 1], a.lora_A[j - 1]) for j in range(1, k + 1))
    assert close(out, per_task_delta(x, TASKS, w))
    for t in range(T):
        assert close(a.delta_weight(t, slot), w(t))
    (loss,) = aux["more_contrastive"]
    sim = F.cosine_similarity(x[:, 0, None, :], a.task_embedding[None], dim=-1)     # token 0, not pooled
    assert torch.allclose(loss, F.cross_entropy(sim / 0.05, TASKS), atol=1e-5)   # τ = 0.05, the default
    loss.backward()
    assert x.grad is not None and x.grad[:, 1:].abs().sum() == 0 and x.grad[:, 0].abs().sum() > 0   # un-detached


def test_more_official_rank_map_is_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    model = attach_adapters(Two(), "more", ["q_proj", "o_proj"], num_tasks=T, rank=R, alpha=ALPHA, official=True)
    with torch.no_grad():
        model.q_proj.adapter.rank_table.copy_(torch.tensor([4, 4, 4]))         # no init draws this for every task
    randomise(model)
    save_adapters(model, tmp_path)
    torch.manual_seed(1)
    fresh = Two()
    cfg = load_adapters(fresh, tmp_path)
    assert cfg["rank_maps"]["q_proj"] == [4, 4, 4] and fresh.q_proj.adapter.rank_map().tolist() == [4, 4, 4]
    x = x3()
    with torch.no_grad():
        assert torch.equal(fresh(x, ForwardContext(task_ids=TASKS)), model(x, ForwardContext(task_ids=TASKS)))


# ----------------------------------------------------------------------------- MoRE: the STE
def test_more_ste_gradient_value_by_hand():
    """With Eq. 4 as onehot + p - sg(p), ∂ΔY/∂p_t[k] is nonzero only at k = r_t - 1, where it
    is (r_t/|T|)·s·B[:, :r_t] A[:r_t] x; the chain rule through softmax and W_g e_t + b_g then
    gives the gradients of the gate and the task embeddings."""
    slot = attach("more", make_slot(), contrastive=False, scale=1.0)
    a = slot.adapter
    x = x3()
    out = delta(slot, x, ForwardContext(task_ids=TASKS))
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * G).sum().backward()                                     # L = Σ G ⊙ ΔY
    with torch.no_grad():
        e, W, b = a.task_embedding, a.gate.weight, a.gate.bias
        p = torch.softmax(e @ W.T + b, -1)                         # (T, r)
        ranks = p.argmax(-1) + 1
        dp = torch.zeros(T, R)
        for i in range(4):                                         # dL/dp_t[r_t - 1], sample by sample
            t = int(TASKS[i])
            k = int(ranks[t])
            dp[t, k - 1] += (G[i] * F.linear(x[i], truncated(a, k, k / T))).sum()
        dlogit = p * (dp - (dp * p).sum(-1, keepdim=True))        # through softmax
        assert torch.allclose(b.grad, dlogit.sum(0), atol=1e-5)
        assert torch.allclose(W.grad, dlogit.T @ e, atol=1e-5)
        assert torch.allclose(e.grad, dlogit @ W, atol=1e-5)
        assert dlogit.abs().sum() > 0


def test_more_unknown_selection_is_an_error():
    with pytest.raises(ValueError, match="selection"):
        REGISTRY["more"](make_slot(), T, R, ALPHA, selection="hard")


# ----------------------------------------------------------------------------- every switch, as a whole model
SWITCHES = {"more-soft": ("more", {"selection": "soft"}), "more-subset": ("more", {"selection": "subset"}),
            "more-no-embedding": ("more", {"task_embedding": False}), "more-official": ("more", {"official": True}),
            "more-h5": ("more", {"task_dim": 5}), "mtl-lora-no-lambda": ("mtl-lora", {"task_lambda": False}),
            "mtl-lora-kaiming": ("mtl-lora", {"weights_init": "kaiming"}), "multilora": ("multilora", {})}


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_switch_starts_at_the_base_trains_mixes_saves_and_merges(switch, tmp_path):
    method, options = SWITCHES[switch]
    x, mask = x3(), torch.ones(4, 5)
    mask[3, 3:] = 0
    ctx = lambda tids, aux=None: ForwardContext(task_ids=tids, mask=mask, aux_losses=aux)   # noqa: E731
    base = Two().eval()
    torch.manual_seed(0)
    model = attach_adapters(Two(), method, ["q_proj", "o_proj"], num_tasks=T, rank=R, alpha=ALPHA, **options).eval()
    with torch.no_grad():
        assert torch.equal(model(x, ctx(TASKS)), base(x, ctx(TASKS)))         # ΔW = 0 at init, exactly
    randomise(model).train()
    aux = {}
    loss = model(x, ctx(TASKS, aux)).pow(2).mean() + sum(sum(v) for v in aux.values())
    loss.backward()
    assert set(aux) == ({"more_contrastive"} if method == "more" and switch != "more-no-embedding" else set())
    for n, p in model.named_parameters():                                     # what trains gets a gradient
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, n
    model.eval()
    with torch.no_grad():
        mixed = model(x, ctx(TASKS))
        for t in range(T):                                                    # a mixed batch, row by row
            rows = TASKS == t
            assert torch.equal(mixed[rows], model(x, ctx(torch.full_like(TASKS, t)))[rows])
    save_adapters(model, tmp_path)
    fresh = Two()
    torch.manual_seed(1)
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x, ctx(TASKS)), mixed)
    if switch == "more-no-embedding":
        return                                                                # no per-task ΔW (tested above)
    for t in range(T):
        with torch.no_grad():
            single = torch.full_like(TASKS, t)
            assert close(merge_adapters(model, t)(x, ctx(single)), model(x, ctx(single)))
