"""The training loop by value (mtlref/train.py): gradient accumulation, the warm-up + linear
decay schedule, head_lr, gradient clipping, weight decay and betas against a hand-written
AdamW; and the run settings that feed it (mtlref/settings.py): epochs -> steps, the warm-up ratio,
and the precedence preset < method < family < flag."""
import argparse
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import FIXTURES, Spec, need
from mtlref import attach_adapters, load_model
from mtlref.heads import MultiTaskModel
from mtlref.presets import PRESETS
from mtlref.settings import FLAG_KEYS, Settings, settings, step_budget
from mtlref.train import LoopConfig, fit, linear_warmup_decay

B, T = 3, 6                                   # micro-batch size and length


@pytest.fixture(scope="module")
def base():
    """bert-tiny with LoRA on query/value (B moved off zero, so every adapter tensor gets a
    gradient) and two heads: a classification and a regression task."""
    torch.manual_seed(0)
    model = load_model(need(FIXTURES / "bert-tiny"))
    attach_adapters(model, "lora", ["query", "value"], num_tasks=2, rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return MultiTaskModel(model, [Spec("cls"), Spec("reg", kind="regression", labels=())])


def fresh(base):
    return copy.deepcopy(base)


def batch(seed: int, size: int = B) -> dict:
    """`size` samples of T tokens (the last one right-padded), tasks mixed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (size, T), generator=g)
    mask = torch.ones(size, T, dtype=torch.long)
    mask[-1, T - 2:] = 0
    tasks = torch.arange(size) % 2
    labels = torch.where(tasks == 0, torch.randint(0, 2, (size,), generator=g).float(),
                         3 * torch.rand(size, generator=g))
    return {"input_ids": ids, "attention_mask": mask, "task_ids": tasks, "labels": labels}


def cat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def reference_grads(model, b: dict) -> dict[str, torch.Tensor]:
    """∂ mean-loss / ∂ every trainable tensor for one batch, outside the loop."""
    model = copy.deepcopy(model).train()
    loss = model.loss(model(b), b)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def record_steps(monkeypatch):
    """Capture, right before every optimizer step of fit, each trainable tensor's gradient
    (after accumulation and clipping), and each param group's lr."""
    import mtlref.train as train
    seen = []
    original = train.make_optimizer

    def make(model, cfg):
        opt = original(model, cfg)
        names = {id(p): n for n, p in model.named_parameters()}

        def hook(optimizer, args, kwargs):
            seen.append({"grads": {names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]},
                         "lrs": [g["lr"] for g in optimizer.param_groups], "groups": optimizer.param_groups})
        opt.register_step_pre_hook(hook)
        return opt
    monkeypatch.setattr(train, "make_optimizer", make)
    return seen


def global_norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_batches_accumulate_the_gradient_of_one_batch_of_k_times_b(base, monkeypatch, k):
    """grad_accum=k over k micro-batches of b samples = the gradient of one batch of k·b. The task
    loss is a mean over a micro-batch's samples, so this holds because every micro-batch has the
    same number of samples (b); with unequal sizes the accumulated mean would weigh them unequally."""
    seen = record_steps(monkeypatch)
    micro = [batch(seed) for seed in range(k)]
    model = fresh(base)
    fit(model, iter(micro), LoopConfig(max_steps=1, lr=1e-3, grad_accum=k, clip=0, log_every=1000))
    want = reference_grads(base, cat(micro))
    got = seen[0]["grads"]
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert global_norm(want) > 0


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("warmup,factors", [
    (4, [1 / 4, 2 / 4, 3 / 4, 1, 6 / 6, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),   # 0 -> 1 in 4 steps, then to 0 at 10
    (0, [10 / 10, 9 / 10, 8 / 10, 7 / 10, 6 / 10, 5 / 10, 4 / 10, 3 / 10, 2 / 10, 1 / 10]),
])
def test_warmup_then_linear_decay_sets_each_steps_lr_and_head_lr(base, monkeypatch, warmup, factors):
    """The lr each of 10 optimizer steps uses, written out by hand, for the adapters (lr) and the
    heads (head_lr), both following the one schedule."""
    seen = record_steps(monkeypatch)
    fit(fresh(base), (batch(s) for s in range(100)),
        LoopConfig(max_steps=10, lr=1e-2, head_lr=4e-2, warmup_steps=warmup, log_every=1000))
    assert len(seen) == 10
    for step, (record, f) in enumerate(zip(seen, factors)):
        assert record["lrs"] == [pytest.approx(1e-2 * f), pytest.approx(4e-2 * f)], step
    assert [linear_warmup_decay(warmup, 10)(s) for s in range(11)] == pytest.approx(factors + [0.0])


def test_head_lr_groups_the_heads_and_a_zero_head_lr_freezes_them(base, monkeypatch):
    """Group 0 holds exactly the adapter tensors at lr, group 1 exactly the heads at head_lr;
    head_lr=None means lr, and head_lr=0.0 is a rate of 0 (the heads do not move), not 'unset'."""
    seen = record_steps(monkeypatch)
    adapters = sorted(n for n, p in base.named_parameters() if p.requires_grad and ".adapter." in n)
    heads = sorted(n for n, p in base.named_parameters() if n.startswith("heads."))
    assert adapters and heads == ["heads.0.bias", "heads.0.weight", "heads.1.bias", "heads.1.weight"]
    for head_lr, want in ((3e-2, 3e-2), (None, 1e-2), (0.0, 0.0)):
        model = fresh(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, (batch(s) for s in range(10)), LoopConfig(max_steps=1, lr=1e-2, head_lr=head_lr, log_every=1000))
        record = seen[-1]
        names = {id(p): n for n, p in model.named_parameters()}
        assert [sorted(names[id(p)] for p in g["params"]) for g in record["groups"]] == [adapters, heads]
        assert record["lrs"] == [pytest.approx(1e-2), pytest.approx(want)]
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == set(adapters) | (set(heads) if want else set())


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_a_clipped_step_applies_the_gradient_scaled_to_norm_clip(base, monkeypatch, tmp_path, clip):
    """The optimizer sees g · clip/‖g‖ when the global norm ‖g‖ exceeds clip (1e-3), g itself
    when it does not (1e6); the log records the norm before clipping."""
    seen = record_steps(monkeypatch)
    b = batch(7)
    fit(fresh(base), iter([b]), LoopConfig(max_steps=1, lr=1e-3, clip=clip, log_every=1),
        log_path=tmp_path / "log.jsonl")
    want = reference_grads(base, b)
    norm = global_norm(want)
    assert norm > 1e-2                                       # the first case really clips
    scale = min(1.0, clip / norm)
    got = seen[0]["grads"]
    for n in want:
        torch.testing.assert_close(got[n], want[n] * scale, rtol=1e-4, atol=1e-9, msg=n)
    assert global_norm(got) == pytest.approx(min(norm, clip), rel=1e-4)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-4)


# ----------------------------------------------------------------------------- AdamW by hand
def adamw_by_hand(values: dict, grads: list[dict], lrs: list[dict], betas, wd, eps=1e-8) -> dict:
    """Decoupled weight decay (Loshchilov & Hutter), then Adam with bias correction, per step."""
    b1, b2 = betas
    p = {n: v.double().clone() for n, v in values.items()}
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v = {n: torch.zeros_like(x) for n, x in p.items()}
    for t, (g_t, lr_t) in enumerate(zip(grads, lrs), start=1):
        for n in p:
            g, lr = g_t[n].double(), lr_t[n]
            p[n] = p[n] * (1 - lr * wd)
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            mhat, vhat = m[n] / (1 - b1 ** t), v[n] / (1 - b2 ** t)
            p[n] = p[n] - lr * mhat / (vhat.sqrt() + eps)
    return p


def test_weight_decay_and_betas_reach_adamw(base, monkeypatch):
    """Three steps of fit equal three steps of AdamW written here, with non-default weight decay
    and betas (which only matter from the second step on), lr and head_lr and the warm-up."""
    seen = record_steps(monkeypatch)
    model = fresh(base)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = LoopConfig(max_steps=3, lr=2e-2, head_lr=5e-2, warmup_steps=2, weight_decay=0.3, betas=(0.5, 0.7),
                     clip=0, log_every=1000)
    fit(model, (batch(s) for s in range(10)), cfg)
    for g in seen[0]["groups"]:
        assert g["betas"] == (0.5, 0.7) and g["weight_decay"] == 0.3
    factors = [1 / 2, 1.0, 1.0]                              # warm-up of 2 steps, then (3 - 2) / (3 - 2)
    lrs = [{n: (5e-2 if n.startswith("heads.") else 2e-2) * f for n in start} for f in factors]
    want = adamw_by_hand(start, [r["grads"] for r in seen], lrs, (0.5, 0.7), 0.3)
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.detach().double(), want[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- run settings
def flags(preset: str, method: str, option=(), **given) -> argparse.Namespace:
    return argparse.Namespace(preset=preset, method=method, single_task=False, option=list(option),
                              **{k: given.get(k) for k in FLAG_KEYS})


def test_epochs_to_steps_and_warmup_ratio_by_hand():
    """steps = int(epochs · Σ n_t / (batch · accumulation)) (at least 1), warm-up = int(ratio · steps)
    unless warmup_steps is given (0 included); max_steps wins over epochs."""
    s = Settings(lr=1.0, epochs=2.5, batch_size=8, grad_accum=2, warmup_ratio=0.1, warmup_steps=None)
    assert step_budget(s, {"a": 100, "b": 37}) == (21, 2)           # 2.5 · 137 / 16 = 21.4; 0.1 · 21 = 2.1
    assert step_budget(replace(s, grad_accum=1), {"a": 100, "b": 37}) == (42, 4)   # 2.5 · 137 / 8 = 42.8
    assert step_budget(replace(s, warmup_steps=0), {"a": 100, "b": 37}) == (21, 0)
    assert step_budget(replace(s, warmup_steps=5), {"a": 100, "b": 37}) == (21, 5)
    assert step_budget(replace(s, max_steps=50), {"a": 100, "b": 37}) == (50, 5)  # 0.1 · 50
    assert step_budget(replace(s, epochs=1), {"a": 3}) == (1, 0)                  # less than one batch: 1 step
    st = replace(s, epochs=1, task_epochs={"rte": 4})                              # LoRA-ST's per-task epochs
    assert step_budget(st, {"rte": 160}, "rte") == (40, 4) and step_budget(st, {"cola": 160}, "cola") == (10, 1)


def test_cpu_preset_warmup_ratio_becomes_warmup_steps():
    """The default main job: 6 % of its 1,000 steps warm up (the ratio is applied, not ignored)."""
    s = settings(flags("cpu", "more"), "bert")
    assert step_budget(s, {"cola": 8551, "sst2": 67349}) == (1000, 60)
    assert step_budget(settings(flags("cpu", "more", max_steps=250), "bert"), {"cola": 10}) == (250, 15)


def test_settings_are_typed_and_record_what_was_given(monkeypatch):
    """settings() returns a Settings: a preset key it does not know is an error naming it, and
    as_dict (what metrics.json and the checkpoint record) holds every value given or defaulted and
    none that nobody gave."""
    monkeypatch.setitem(PRESETS, "typo", dict(lr=1.0, warmup_step=5, methods={}))
    with pytest.raises(ValueError, match="preset typo: unknown setting 'warmup_step'"):
        settings(flags("typo", "lora"), "bert")
    s = settings(flags("cpu", "more", rank=4), "bert")
    assert isinstance(s, Settings) and (s.rank, s.alpha, s.max_steps, s.head_lr) == (4, 8, 1000, 5e-3)
    d = s.as_dict()
    assert "warmup_steps" not in d and "task_epochs" not in d and "eval_every" not in d
    assert d["warmup_ratio"] == 0.06 and d["alpha"] == 8 and d["options"] == {} and d["betas"] == (0.9, 0.999)


def test_settings_precedence_preset_method_family_flag(monkeypatch):
    """Each key takes the value of the most specific level that gives it: preset < the preset's
    method < that method's family < the command line (flags and --option)."""
    monkeypatch.setitem(PRESETS, "layers", dict(
        lr=1.0, rank=2, alpha=3, batch_size=4, dropout=0.5, options=dict(a=1, b=1, c=1),
        methods={"mtl-lora": dict(lr=2.0, rank=6, options=dict(b=2, c=2),
                                  by_family={"mpt": dict(lr=3.0, options=dict(c=3))})}))
    s = settings(flags("layers", "mtl-lora"), "llama")
    assert (s.lr, s.rank, s.alpha, s.batch_size, s.options) == (2.0, 6, 3, 4, dict(a=1, b=2, c=2))
    s = settings(flags("layers", "mtl-lora"), "mpt")
    assert (s.lr, s.rank, s.options) == (3.0, 6, dict(a=1, b=2, c=3))
    s = settings(flags("layers", "mtl-lora", option=["c=4", "a=x"], lr=4.0, batch_size=5), "mpt")
    assert (s.lr, s.rank, s.batch_size, s.options) == (4.0, 6, 5, dict(a="x", b=2, c=4))
    s = settings(flags("layers", "lora"), "mpt")                      # a method the preset does not name
    assert (s.lr, s.rank, s.options) == (1.0, 2, dict(a=1, b=1, c=1))
    assert settings(flags("layers", "lora", rank=5), "llama").alpha == 3   # the preset's α, not 2 · rank
    monkeypatch.setitem(PRESETS, "layers", dict(lr=1.0, methods={}))
    assert settings(flags("layers", "lora", rank=5), "llama").alpha == 10   # no α anywhere: 2 · rank


def test_a_flag_of_zero_or_false_still_overrides_the_preset():
    """more-glue sets weight decay 0.01, dropout 0.1, λ 0.1, eval every 1000 and warm-up 500:
    flags of 0 (and --option x=false) replace them; an absent flag (None) does not."""
    s = settings(flags("more-glue", "more"), "t5")
    assert (s.weight_decay, s.dropout, s.lambda_con, s.eval_every, s.warmup_steps) == \
        (0.01, 0.1, 0.1, 1000, 500)
    s = settings(flags("more-glue", "more", option=["detach_h=false", "official=false"], weight_decay=0.0,
                       dropout=0.0, lambda_con=0.0, eval_every=0, warmup_steps=0, balance_weight=0.0), "t5")
    assert (s.weight_decay, s.dropout, s.lambda_con, s.eval_every, s.warmup_steps,
            s.balance_weight) == (0.0, 0.0, 0.0, 0, 0, 0.0)
    assert s.options["detach_h"] is False and s.options["official"] is False
    assert step_budget(s, {"a": 64})[1] == 0                        # warm-up 0, not the preset's 500
