"""Each method's equation, checked against an independent computation written here from the
adapter's parameters (randomised, not only at init), at the defaults and at other values of the
hyperparameters (α/r, MTL-LoRA's τ, MoRE's τ, MixLoRA's top-k), plus the MoRE STE / gate-training
and MTL-LoRA symmetry properties."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_slot
from mtlref.adapters import REGISTRY
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext

T, R, ALPHA = 3, 4, 8.0
S = ALPHA / R
TASKS = torch.tensor([2, 0, 1, 2])


def randomise(module: nn.Module, seed=1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def attach(method: str, slot: AdaptedLinear, randomised=True, rank=R, alpha=ALPHA, **options) -> AdaptedLinear:
    slot.adapter = REGISTRY[method](slot, T, rank, alpha, **options)
    if randomised:
        randomise(slot.adapter)
    return slot.eval()


def inputs(fin=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 5, fin, generator=g), torch.randn(4, fin, generator=g)]   # [B, T, in] and [B, in]


def per_sample_reference(slot, x, weight_of_task):
    """y_b = x_b W_t^T + b, one sample at a time, W_t = weight_of_task(t)."""
    rows = [F.linear(x[b], weight_of_task(int(TASKS[b])), slot.bias) for b in range(x.shape[0])]
    return torch.stack(rows)


def check(slot, weight_of_task, atol=1e-5):
    for x in inputs(slot.in_features):
        out = slot(x, ForwardContext(task_ids=TASKS))
        ref = per_sample_reference(slot, x, weight_of_task)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= atol
        for t in range(T):   # delta_weight agrees with the same equation
            assert (slot.adapter.delta_weight(t, slot) - (weight_of_task(t) - slot.weight)).abs().max() <= atol


# ----------------------------------------------------------------------------- LoRA family
# (rank, alpha): the tests' default s = 8/4 = 2 (also what α = 2r always gives), and two others
SCALINGS = [(R, ALPHA), (2, 5.0), (8, 4.0)]


@pytest.mark.parametrize("rank,alpha", SCALINGS)
def test_lora_eq3(rank, alpha):
    """h = W x + (α/r) B A x."""
    slot = attach("lora", make_slot(), rank=rank, alpha=alpha)
    a = slot.adapter
    assert a.lora_A.shape == (rank, 12)
    check(slot, lambda t: slot.weight + (alpha / rank) * a.lora_B @ a.lora_A)


def test_lora_single_task_adapters():
    slot = attach("lora", make_slot(), per_task=True)
    a = slot.adapter
    assert a.lora_A.shape == (T, R, 12) and a.lora_B.shape == (T, 10, R)
    check(slot, lambda t: slot.weight + S * a.lora_B[t] @ a.lora_A[t])


def test_dora_weight_decomposition():
    slot = attach("dora", make_slot())
    a = slot.adapter

    def w_prime(t):
        V = slot.weight + S * a.lora_B @ a.lora_A
        return a.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    check(slot, w_prime)


def test_dora_detaches_the_norm_and_starts_at_w():
    slot = attach("dora", make_slot(), randomised=False)
    a = slot.adapter
    assert torch.equal(a.magnitude, slot.weight.norm(dim=1))           # m = ‖W‖_c at attach
    x = inputs()[0]
    with torch.no_grad():
        delta = a(x, F.linear(x, slot.weight, slot.bias), ForwardContext(), slot)
    assert delta.abs().max().item() <= 1e-6                           # measured: 0 on CPU fp32
    randomise(a)
    slot(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in a.named_parameters()}
    for p in a.parameters():
        p.grad = None
    V = slot.weight + S * a.lora_B @ a.lora_A                            # reference with ‖V‖ a constant
    W = a.magnitude[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    F.linear(x, W, slot.bias).pow(2).sum().backward()
    for n, p in a.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-5), n


def test_multilora_sum_of_parallel_loras():
    slot = attach("multilora", make_slot(), num_loras=3)
    a = slot.adapter
    assert a.lora_A.shape == (3, R, 12) and a.lora_scale.shape == (3, 10)      # one scaling vector per branch
    check(slot, lambda t: slot.weight + S * sum(a.lora_scale[i][:, None] * (a.lora_B[i] @ a.lora_A[i])
                                                for i in range(3)))


def test_moelora_task_gated_experts():
    slot = attach("moelora", make_slot(), num_experts=2, task_dim=6)
    a = slot.adapter
    k = R // 2

    def weight(t):
        g = torch.softmax(a.gate.weight @ a.task_embedding[t], dim=0)   # (E,)
        return slot.weight + S * sum(g[e] * a.lora_B[:, e * k:(e + 1) * k] @ a.lora_A[e * k:(e + 1) * k]
                                     for e in range(2))
    check(slot, weight)


@pytest.mark.parametrize("tau,rank,alpha", [(0.5, R, ALPHA), (0.1, R, ALPHA), (2.0, 2, 5.0)])
@pytest.mark.parametrize("full", [False, True])
def test_mtl_lora_eq4(full, tau, rank, alpha):
    """h_t = W x + (α/r) Σ_i softmax(w_t/τ)_i B^i Λ_t A x, at the default τ (0.5) and two others."""
    options = {} if tau == 0.5 else {"tau": tau}                     # 0.5: the constructor's default
    slot = attach("mtl-lora", make_slot(), rank=rank, alpha=alpha, num_up=3, full_lambda=full, **options)
    a = slot.adapter
    with torch.no_grad():
        a.task_weights.mul_(3.0)                                     # far from uniform, so τ shows

    def weight(t):
        pi = torch.softmax(a.task_weights[t] / tau, dim=0)
        lam = a.task_lambda[t] if full else torch.diag(a.task_lambda[t])
        return slot.weight + (alpha / rank) * sum(pi[i] * a.lora_B[i] for i in range(3)) @ lam @ a.lora_A
    check(slot, weight)


def test_mtl_lora_normal_weights_init_has_std_tau():
    a = REGISTRY["mtl-lora"](make_slot(), 2000, R, ALPHA, tau=0.1, weights_init="normal")
    assert a.task_weights.shape == (2000, 3)
    assert (a.task_weights / 0.1).std().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(a.task_lambda, torch.ones(2000, R))


def mixing_after(tau: float, steps: int, **options) -> torch.Tensor:
    """softmax(w_t/τ) (T, n) after `steps` AdamW steps on one fixed regression, from seed 0."""
    torch.manual_seed(0)
    slot = attach("mtl-lora", make_slot(), randomised=False, tau=tau, **options).train()
    a, target = slot.adapter, make_slot(seed=5)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g)
        loss = (slot(x, ForwardContext(task_ids=torch.arange(8) % T)) - target(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(a.task_weights.detach() / tau, dim=-1)


TAU_MARGIN = 0.25    # max |Δπ| between τ = 0.1 and τ = 1: Kaiming 0.53 at init and after 5 steps; N(0, τ²) 0 and 0.09


def test_mtl_lora_tau_changes_the_mixing_at_init_and_after_training():
    """Eq. 4's τ must be able to matter (Table 5's "w/o τ"): with the default (the official
    code's Kaiming-uniform) w_t, the same seed gives mixing weights softmax(w_t/τ) that differ
    between τ = 0.1 and τ = 1 at initialisation, and still after a few training steps. Under
    weights_init="normal" (w_t ~ N(0, τ²)) both are the same distribution: it fails this test."""
    assert REGISTRY["mtl-lora"].options["weights_init"] == "kaiming"
    for steps in (0, 5):
        gap = (mixing_after(0.1, steps) - mixing_after(1.0, steps)).abs().max().item()
        assert gap > TAU_MARGIN, (steps, gap)
    normal = (mixing_after(0.1, 0, weights_init="normal") - mixing_after(1.0, 0, weights_init="normal"))
    assert normal.abs().max().item() < 1e-6                          # the old default: τ invisible at init


@pytest.mark.parametrize("init", ["uniform", "normal", "kaiming"])
def test_mtl_lora_uniform_init_never_breaks_the_symmetry(init):
    """With w_t uniform and B = 0, the n up-projections get identical gradients and w_t stays
    uniform forever; the default Kaiming-uniform init and N(0, τ²) break the symmetry."""
    torch.manual_seed(0)
    slot = attach("mtl-lora", make_slot(), randomised=False, weights_init=init).train()
    a = slot.adapter
    target = make_slot(seed=5)
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for step in range(10):
        x = torch.randn(8, 12)
        tids = torch.arange(8) % T
        loss = (slot(x, ForwardContext(task_ids=tids)) - target(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    B, w = a.lora_B.detach(), a.task_weights.detach()
    assert B.abs().max() > 0
    if init == "uniform":
        assert torch.equal(B[0], B[1]) and torch.equal(B[1], B[2])
        assert torch.equal(w, w[:, :1].expand_as(w))                  # softmax(w_t/τ) still uniform
    else:
        assert not torch.allclose(B[0], B[1]) and not torch.equal(w, w[:, :1].expand_as(w))


# ----------------------------------------------------------------------------- MoRE
def more_ranks(a) -> list[int]:
    """Eq. 2-3 from the gate's weights: r_t = argmax softmax(W_g e_t + b_g) + 1."""
    return [int(torch.softmax(a.gate.weight @ a.task_embedding[t] + a.gate.bias, dim=0).argmax()) + 1
            for t in range(T)]


def more_reference_weight(slot, a, t, linear_scaling=True, s=S):
    k = more_ranks(a)[t]                                                          # Eq. 2-3
    factor = k / T if linear_scaling else 1.0                                     # Eq. 6
    return slot.weight + factor * s * a.lora_B[:, :k] @ a.lora_A[:k]


@pytest.mark.parametrize("alpha", [ALPHA, 3.0])
@pytest.mark.parametrize("linear_scaling", [True, False])
def test_more_truncated_rank_expert(linear_scaling, alpha):
    slot = attach("more", make_slot(), alpha=alpha, linear_scaling=linear_scaling)
    a = slot.adapter
    with torch.no_grad():                                              # tasks 0, 1, 2 -> ranks 4, 1, 2
        for t, k in enumerate([4, 1, 2]):
            a.task_embedding[t, t] += 4.0
            a.gate.weight[k - 1, t] += 4.0
    assert more_ranks(a) == [4, 1, 2]
    assert a.rank_map().tolist() == [4, 1, 2]
    check(slot, lambda t: more_reference_weight(slot, a, t, linear_scaling, s=alpha / R))


def test_more_ste_forward_is_exactly_the_truncated_lora_and_reaches_the_gate():
    slot = attach("more", make_slot(bias=False), contrastive=False)
    a = slot.adapter
    x = inputs()[0]
    out = a(x, F.linear(x, slot.weight), ForwardContext(task_ids=TASKS), slot)
    ranks = more_ranks(a)
    for b in range(x.shape[0]):
        k = int(ranks[TASKS[b]])
        z = F.linear(x[b], a.lora_A) * (torch.arange(R) < k).float()  # truncated: columns >= r_t dropped
        ref = F.linear(z * ((k / T) * S), a.lora_B)
        assert torch.equal(out[b], ref)                                # the STE coefficient is exactly 1.0
        sliced = F.linear(F.linear(x[b], a.lora_A[:k]), a.lora_B[:, :k]) * ((k / T) * S)
        assert (out[b] - sliced).abs().max().item() <= 1e-6
    out.sum().backward()                                              # no contrastive loss: the STE alone
    for p in (a.gate.weight, a.gate.bias, a.task_embedding):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("contrastive", [True, False])
def test_more_gate_trains_on_a_two_task_problem(contrastive):
    """The official code freezes the task -> rank map at the first forward; ours must move p_t.
    With contrastive=False the gate and e_t are reached only by Eq. 4's p - sg(p) (without it
    they would receive no gradient and p_t would never move)."""
    torch.manual_seed(0)
    slot = make_slot(8, 8, bias=False)
    slot.adapter = REGISTRY["more"](slot, 2, R, ALPHA, contrastive=contrastive)
    slot.train()
    a = slot.adapter
    teachers = [make_slot(8, 8, bias=False, seed=10 + t) for t in range(2)]
    p0, e0 = a.probs().detach().clone(), a.task_embedding.detach().clone()
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for step in range(20):
        tids = torch.arange(16) % 2
        x = torch.randn(16, 6, 8)
        target = torch.stack([teachers[int(t)](x[i]) for i, t in enumerate(tids)])
        aux = {}
        loss = (slot(x, ForwardContext(task_ids=tids, aux_losses=aux)) - target).pow(2).mean()
        assert ("more_contrastive" in aux) == contrastive
        loss = loss + 0.1 * sum(aux.get("more_contrastive", []))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (a.probs().detach() - p0).abs().max().item() > 1e-3
    assert (a.task_embedding.detach() - e0).abs().max().item() > 1e-3


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_more_contrastive_loss_eq8(tau):
    """-(1/N) Σ_i log softmax_k(cos(h_i, e_k)/τ)[t_i], at the default τ (0.05) and another."""
    slot = attach("more", make_slot(), **({} if tau == 0.05 else {"tau": tau})).train()
    a = slot.adapter
    x = inputs()[0]
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    aux = {}
    slot(x, ForwardContext(task_ids=TASKS, mask=mask, aux_losses=aux))
    (loss,) = aux["more_contrastive"]
    h = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)       # mean over real tokens
    sim = torch.stack([torch.stack([F.cosine_similarity(h[i], a.task_embedding[k], dim=0) for k in range(T)])
                       for i in range(4)])
    ref = -torch.stack([torch.log_softmax(sim[i] / tau, 0)[TASKS[i]] for i in range(4)]).mean()
    assert torch.allclose(loss, ref, atol=1e-5)
    aux = {}
    slot.eval()(x, ForwardContext(task_ids=TASKS, mask=mask, aux_losses=aux))
    assert aux == {}                                                  # only while training


@pytest.mark.parametrize("detach_h", [False, True])
def test_more_contrastive_gradient_reaches_the_input_unless_detached(detach_h):
    """detach_h=True: Eq. 8 trains e_t only (and so the gate's input), not what produced x."""
    slot = attach("more", make_slot(), tau=0.05, detach_h=detach_h).train()
    a = slot.adapter
    x = inputs()[0].clone().requires_grad_(True)
    aux = {}
    slot(x, ForwardContext(task_ids=TASKS, aux_losses=aux))
    (loss,) = aux["more_contrastive"]
    loss.backward()
    assert a.task_embedding.grad.abs().sum() > 0
    assert (x.grad is None) == detach_h


# ----------------------------------------------------------------------------- MixLoRA
class TinyFFN(FeedForward):
    def __init__(self, d=8, f=12, gated=True):
        super().__init__()
        self.gate_proj = make_slot(d, f, seed=3) if gated else None
        self.up_proj, self.down_proj = make_slot(d, f, seed=4), make_slot(f, d, seed=5)

    def parts(self):
        return self.gate_proj, self.up_proj, self.down_proj, F.gelu


def mixlora_reference(ffn, a, x, roles, top_k, s):
    """Token by token: Σ_k w_k FFN_{e_k}(x) over the top_k experts, FFN_e using W + s B_e A_e on
    each targeted part (roles), s = α/r."""
    gate, up, down, act = ffn.parts()

    def proj(part, role, e, v):
        W = part.weight + (s * a.experts[role].lora_B[e] @ a.experts[role].lora_A[e] if role in roles else 0)
        return F.linear(v, W, part.bias)
    out = []
    for v in x.reshape(-1, x.shape[-1]):
        logits = a.router.weight @ v
        top, idx = logits.topk(top_k)
        w = torch.softmax(top, 0)
        y = 0
        for k in range(top_k):
            e = int(idx[k])
            h = act(proj(gate, "gate", e, v)) * proj(up, "up", e, v) if gate is not None else act(proj(up, "up", e, v))
            y = y + w[k] * proj(down, "down", e, h)
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k,rank,alpha", [(2, R, ALPHA), (1, R, ALPHA), (3, 2, 5.0), (4, 8, 4.0)])
@pytest.mark.parametrize("gated,roles", [(True, ("gate", "up", "down")), (False, ("up", "down")),
                                         (True, ("down",))])
def test_mixlora_equals_a_top_k_mixture_of_whole_ffns(gated, roles, top_k, rank, alpha):
    """At the default top-2 of 4 experts and at top-1, top-3 and top-4 (every expert), with α/r
    other than 2."""
    ffn = TinyFFN(gated=gated)
    options = {} if top_k == 2 else {"top_k": top_k}                 # 2: the constructor's default
    ffn.adapter = REGISTRY["mixlora"](ffn, roles, T, rank, alpha, num_experts=4, **options)
    with torch.no_grad():
        x = inputs(8)[0]
        gate, up, down, act = ffn.parts()
        h = act(gate(x)) * up(x) if gated else act(up(x))
        assert torch.equal(ffn(x), down(h))                           # exactly the base FFN at init
    randomise(ffn.adapter)
    ffn.eval()
    for x in inputs(8):
        ref = mixlora_reference(ffn, ffn.adapter, x, roles, top_k, alpha / rank)
        assert (ffn(x, ForwardContext()) - ref).abs().max().item() <= 1e-5


def test_mixlora_load_balance_counts_only_real_tokens():
    ffn = TinyFFN()
    ffn.adapter = randomise(REGISTRY["mixlora"](ffn, ("gate", "up", "down"), T, R, ALPHA, num_experts=4, top_k=2))
    ffn.train()
    x = inputs(8)[0]
    mask = torch.ones(4, 5)
    mask[1, 2:] = 0
    aux = {}
    ffn(x, ForwardContext(mask=mask, aux_losses=aux))
    (loss,) = aux["mixlora_balance"]
    real = x[mask.bool()]                                             # (N, d)
    logits = real @ ffn.adapter.router.weight.T
    idx = logits.topk(2, dim=-1).indices
    f = torch.stack([(idx == e).sum() / len(real) for e in range(4)])  # slots sent to e per token (Mixtral: no 1/k)
    P = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(loss, 4 * (f * P).sum(), atol=1e-6)
    with torch.no_grad():                                             # uniform P = 1/E: L = Σ_e f_e = k
        ffn.adapter.router.weight.zero_()
    aux = {}
    ffn(x, ForwardContext(mask=mask, aux_losses=aux))
    assert aux["mixlora_balance"][0].item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("method", ["lora", "dora", "multilora", "moelora", "mtl-lora", "more"])
def test_a_bf16_base_with_fp32_adapters(method):
    options = {"moelora": {"num_experts": 2, "task_dim": 6}}.get(method, {})
    ref = attach(method, make_slot(), **options)
    slot = make_slot(dtype=torch.bfloat16)
    slot.adapter = REGISTRY[method](slot, T, R, ALPHA, **options)
    slot.adapter.load_state_dict(ref.adapter.state_dict())
    assert all(p.dtype == torch.float32 for p in slot.adapter.parameters())
    x = inputs()[0]
    with torch.no_grad():
        out = slot.eval()(x.bfloat16(), ForwardContext(task_ids=TASKS))
        want = ref(x, ForwardContext(task_ids=TASKS))
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max().item() <= 0.05 * want.abs().max().item()
