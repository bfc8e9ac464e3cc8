"""Poly / MHR (mtlref/adapters/poly.py): parity with peft's own outputs, the equations written
out here from the adapter's tensors, the training-mode draws, init, exports and bad options.

The parity fixture tests/data/poly-peft-parity.json was computed by peft 0.22.0
(transformers 5.25.0, torch 2.13.0+cpu; the versions are also in its "metadata") with
tests/data/make_poly_parity.py: a 16 -> 12 -> 8 net of two nn.Linear, both adapted, once as Poly
(n_splits=1) and once as MHR (n_splits=2), r=4, 3 tasks, 3 skills, every Poly tensor random."""
import json
from pathlib import Path

import pytest
import torch

from conftest import make_slot
from mtlref.adapters import REGISTRY
from mtlref.adapters.poly import relaxed_bernoulli
from mtlref.layers import AdaptedLinear, ForwardContext

FIXTURE = Path(__file__).resolve().parent / "data" / "poly-peft-parity.json"


def load_fixture() -> tuple[dict, dict]:
    """(tensors by name, metadata): the JSON holds each tensor's dtype, shape and values, float32
    values written exactly (a float32 survives the float64 round trip)."""
    raw = json.loads(FIXTURE.read_text())
    return ({k: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).view(t["shape"])
             for k, t in raw["tensors"].items()}, raw["metadata"])
T, R, ALPHA, SKILLS = 3, 4, 8.0, 3
TASKS = torch.tensor([2, 0, 1, 2])


def attach(slot, randomised=True, rank=R, alpha=ALPHA, num_tasks=T, **options) -> AdaptedLinear:
    slot.adapter = REGISTRY["poly"](slot, num_tasks, rank, alpha, num_skills=options.pop("num_skills", SKILLS),
                                    **options)
    if randomised:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in slot.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return slot.eval()


def weights_by_hand(logits_row, Q, S):
    """Eval-mode routing of one task: σ(ℓ) per head, divided by its sum over skills."""
    z = torch.sigmoid(logits_row.view(Q, S))
    return z / z.sum(-1, keepdim=True)


def task_matrices(a, w):
    """A_t (in, r), B_t (r, out) from routing weights w (Q, S), head by head, no einsum/reshape."""
    Q, S = w.shape
    A = torch.cat([sum(w[q, s] * a.poly_lora_A[q, s] for s in range(S)) for q in range(Q)], dim=0)
    B = torch.cat([sum(w[q, s] * a.poly_lora_B[q, s] for s in range(S)) for q in range(Q)], dim=1)
    return A, B


def reference(slot, x, w_of_sample):
    """y_b = x_b Wᵀ + bias + s x_b A B for each sample, with (A, B) from w_of_sample(b)."""
    a, rows = slot.adapter, []
    for b in range(x.shape[0]):
        A, B = task_matrices(a, w_of_sample(b))
        rows.append(torch.nn.functional.linear(x[b], slot.weight, slot.bias) + a.scaling * (x[b] @ A @ B))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- parity with peft
def peft_net(fx: dict, name: str, n_splits: int):
    """lin1 (16 -> 12) and lin2 (12 -> 8) as mtlref slots with peft's tensors copied in (α = 1:
    peft's Poly scales by 1/r)."""
    slots = []
    for layer, (fin, fout) in (("lin1", (16, 12)), ("lin2", (12, 8))):
        slot = AdaptedLinear(fin, fout, bias=True)
        with torch.no_grad():
            slot.weight.copy_(fx[f"base.{layer}.weight"])
            slot.bias.copy_(fx[f"base.{layer}.bias"])
        attach(slot, randomised=False, rank=4, alpha=1.0, num_tasks=3, num_skills=3, num_splits=n_splits)
        a = slot.adapter
        with torch.no_grad():
            for key, shape in (("poly_lora_A", (n_splits, 3, fin // n_splits, 4)),
                               ("poly_lora_B", (n_splits, 3, 4, fout // n_splits)),
                               ("module_logits", (3, n_splits * 3))):
                assert getattr(a, key).shape == fx[f"{name}.{layer}.{key}"].shape == shape
                getattr(a, key).copy_(fx[f"{name}.{layer}.{key}"])
        slots.append(slot)
    return slots


def run_net(slots, x, task_ids):
    ctx = ForwardContext(task_ids=task_ids)
    return slots[1](slots[0](x, ctx), ctx)


@pytest.mark.parametrize("name,n_splits", [("poly", 1), ("mhr", 2)])
def test_eval_matches_peft(name, n_splits):
    """Eval mode (σ routing) reproduces peft's output on a mixed-task batch to 1e-5 (fp32)."""
    fx, meta = load_fixture()
    assert json.loads(meta["configs"])[name]["n_splits"] == n_splits and meta["peft"]
    slots = [s.eval() for s in peft_net(fx, name, n_splits)]
    with torch.no_grad():
        out = run_net(slots, fx["x"], fx["task_ids"])
        plain = torch.nn.functional.linear(torch.nn.functional.linear(fx["x"], slots[0].weight, slots[0].bias),
                                           slots[1].weight, slots[1].bias)
    assert (fx[f"{name}.eval_out"] - plain).abs().max() > 0.1         # the adapters move the output a lot
    assert (out - fx[f"{name}.eval_out"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,n_splits", [("poly", 1), ("mhr", 2)])
def test_train_matches_peft_under_the_same_seed(name, n_splits):
    """Train mode draws the relaxed-Bernoulli weights from torch's RNG as peft does (one draw of
    shape [B, Q, S] per module, lin1 first): the same seed gives peft's output."""
    fx, meta = load_fixture()
    seed = int(meta["train_seed"])
    slots = [s.train() for s in peft_net(fx, name, n_splits)]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = run_net(slots, fx["x"], fx["task_ids"])
    assert (fx[f"{name}.train_out"] - fx[f"{name}.eval_out"]).abs().max() > 1e-3   # the draw matters
    assert (out - fx[f"{name}.train_out"]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- the equations
@pytest.mark.parametrize("n_splits", [1, 2])
@pytest.mark.parametrize("shape", [(4, 5), (4,), (4, 2, 3)])
def test_eval_forward_is_x_At_Bt_s(n_splits, shape):
    """Eval: y = x Wᵀ + b + (α/r) x A_t B_t per sample (mixed tasks; inputs [B, ..., in])."""
    slot = attach(make_slot(), num_splits=n_splits)
    a = slot.adapter
    x = torch.randn(*shape, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = slot(x, ForwardContext(task_ids=TASKS))
        ref = reference(slot, x, lambda b: weights_by_hand(a.module_logits[TASKS[b]], n_splits, SKILLS))
    assert out.shape == (*shape, 10)
    assert (out - ref).abs().max().item() <= 1e-5


def test_splits_cut_in_and_out_into_heads():
    """MHR, Q = 2: head q reads input columns q·in/Q:(q+1)·in/Q and writes output columns
    q·out/Q:(q+1)·out/Q, through one shared rank-r bottleneck."""
    slot = attach(make_slot(), num_splits=2)
    a, ctx = slot.adapter, ForwardContext(task_ids=TASKS)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, slot.weight, slot.bias)
        a.poly_lora_B[1].zero_()                                   # head 1 writes nothing
        d = slot(x, ctx) - plain
        assert d[..., 5:].abs().max() == 0 and d[..., :5].abs().max() > 0.1
        x2 = x.clone()
        x2[..., 6:] += 1.0                                         # head 1's input columns
        def delta(x):
            return slot(x, ctx) - torch.nn.functional.linear(x, slot.weight, slot.bias)
        assert (delta(x2) - delta(x)).abs().max() > 0.1             # they reach head 0's output
        a.poly_lora_A[1].zero_()                                   # head 1 reads nothing
        assert (delta(x2) - delta(x)).abs().max() <= 1e-5


def test_training_draws():
    """Train mode: per-sample relaxed-Bernoulli weights in [0, 1] that sum to 1 over skills per
    head, reproducible under a seed, different across seeds; the forward uses them."""
    slot = attach(make_slot(), num_splits=2).train()
    a, ctx = slot.adapter, ForwardContext(task_ids=TASKS)
    logits = a.module_logits[TASKS]
    torch.manual_seed(5)
    w = a.mixing(logits, sample=True)
    torch.manual_seed(5)
    assert torch.equal(a.mixing(logits, sample=True), w)
    assert w.shape == (4, 2, SKILLS) and w.min() >= 0 and w.max() <= 1
    assert (w.sum(-1) - 1).abs().max() <= 1e-6
    assert not torch.allclose(a.mixing(logits, sample=True), w)     # a fresh draw
    assert not torch.allclose(w[0], w[3])                          # samples 0 and 3 (task 2) draw apart
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(5)
    with torch.no_grad():
        out = slot(x, ctx)
        ref = reference(slot, x, lambda b: w[b])
        evaluated = slot.eval()(x, ctx)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - evaluated).abs().max() > 1e-3


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_relaxed_bernoulli_is_torchs(tau):
    """The written-out draw equals torch.distributions.RelaxedBernoulli(τ, logits).rsample()
    (peft's call) under the same seed, values and gradients, saturation included: torch passes
    ℓ through a clamped σ, so a logit of ±25 draws as ±16 would and has no gradient."""
    logits = 3 * torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(7))
    logits[0, 0] = torch.tensor([-25.0, 25.0, -18.0])
    logits.requires_grad_()
    torch.manual_seed(8)
    mine = relaxed_bernoulli(logits, tau)
    torch.manual_seed(8)
    theirs = torch.distributions.RelaxedBernoulli(torch.tensor(tau), logits=logits).rsample()
    assert ((mine - theirs).abs() / theirs).max().item() <= 1e-5
    g1, = torch.autograd.grad(mine.log().sum(), logits)
    g2, = torch.autograd.grad(theirs.log().sum(), logits)
    assert (g1 - g2).abs().max().item() <= 1e-5 * g2.abs().max().item() and g1.abs().max() > 0
    assert not g1[0, 0].any()


def test_training_reaches_every_tensor():
    """The draw is reparameterised: a train-mode loss has gradients on logits, A and B."""
    slot = attach(make_slot(), num_splits=2).train()
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(9))
    slot(x, ForwardContext(task_ids=TASKS)).square().sum().backward()
    a = slot.adapter
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in (a.module_logits, a.poly_lora_A, a.poly_lora_B))
    assert a.module_logits.grad[1].abs().max() > 0                  # task 1 (one sample) is reached


@pytest.mark.parametrize("n_splits", [1, 2])
def test_delta_weight_and_as_lora_are_the_eval_forward(n_splits):
    """W + ΔW_t gives the eval forward of a task-t batch, B A = ΔW_t (rank r), in any mode."""
    slot = attach(make_slot(), num_splits=n_splits)
    a = slot.adapter
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(10))
    for t in range(T):
        with torch.no_grad():
            out = slot(x, ForwardContext(task_ids=torch.full((4,), t)))
            dw = a.delta_weight(t, slot)
            A, B = a.as_lora(t, slot)
            a.train()
            assert torch.equal(a.delta_weight(t, slot), dw)          # eval weights whatever the mode
            a.eval()
        assert A.shape == (R, 12) and B.shape == (10, R) and dw.shape == (10, 12)
        assert (out - torch.nn.functional.linear(x, slot.weight + dw, slot.bias)).abs().max().item() <= 1e-5
        assert (B @ A - dw).abs().max().item() <= 1e-5
        A_t, B_t = task_matrices(a, weights_by_hand(a.module_logits[t], n_splits, SKILLS))
        assert (dw - a.scaling * (A_t @ B_t).t()).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- init, dtype, errors
@pytest.mark.parametrize("n_splits", [1, 4])
def test_init_is_peft(n_splits):
    """B = 0 (so ΔY = 0 exactly, in train mode too), logits in ±1e-3, each A slice U(±1/√(in/Q))."""
    fin, fout = 64, 32
    slot = attach(make_slot(fin, fout), randomised=False, rank=8, num_skills=5, num_splits=n_splits)
    a = slot.adapter
    assert a.zero_init == ("poly_lora_B",) and a.task_specific and a.task_tensors == ("module_logits",)
    assert a.poly_lora_A.shape == (n_splits, 5, fin // n_splits, 8)
    assert a.poly_lora_B.shape == (n_splits, 5, 8, fout // n_splits) and not a.poly_lora_B.any()
    assert a.module_logits.shape == (T, n_splits * 5)
    assert 0 < a.module_logits.abs().max() <= 1e-3 and a.module_logits.std() > 1e-4
    bound = (fin / n_splits) ** -0.5
    for q in range(n_splits):
        for s in range(5):
            m = a.poly_lora_A[q, s].abs().max()
            assert 0.9 * bound < m <= bound
    x = torch.randn(4, 5, fin)
    for mode in (True, False):
        slot.train(mode)
        with torch.no_grad():
            out = slot(x, ForwardContext(task_ids=TASKS))
        assert torch.equal(out, torch.nn.functional.linear(x, slot.weight, slot.bias))


def test_bf16_base():
    """A bf16 base: fp32 adapter tensors, the result in bf16 and close to the fp32 computation."""
    slot32 = attach(make_slot(), num_splits=2)
    slot16 = attach(make_slot(dtype=torch.bfloat16), num_splits=2)
    assert slot16.adapter.poly_lora_A.dtype == torch.float32
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        out16 = slot16(x.bfloat16(), ForwardContext(task_ids=TASKS))
        out32 = slot32(x, ForwardContext(task_ids=TASKS))
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max() <= 0.05 * out32.abs().max()


@pytest.mark.parametrize("fin,fout,options,match", [
    (12, 10, {"num_splits": 5}, "must divide in"),
    (12, 10, {"num_splits": 4}, "must divide in"),                 # divides in = 12, not out = 10
    (12, 10, {"num_skills": 0}, "num_skills >= 1"),
    (12, 10, {"num_splits": 0}, "num_splits >= 1"),
    (12, 10, {"temperature": 0.0}, "temperature must be > 0"),
    (12, 10, {"temperature": -1.0}, "temperature must be > 0"),
])
def test_bad_options(fin, fout, options, match):
    with pytest.raises(ValueError, match=match):
        attach(make_slot(fin, fout), randomised=False, **options)


def test_task_ids_are_required():
    slot = attach(make_slot())
    with pytest.raises(ValueError, match="task-specific"):
        slot(torch.randn(4, 12), ForwardContext())
