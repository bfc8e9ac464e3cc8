"""Adapter properties, parametrised over the method registry x {toy, llama-tiny, mpt-tiny,
t5-tiny, bert-tiny}: zero init, what trains, mixed-task batches, merging, save/load,
attach errors and the MoRE Table 6 parameter counts. The per-method equations are checked in
test_adapter_equations.py."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtlref.adapters import (REGISTRY, Adapter, adapters_of, attach_adapters, count_parameters, load_adapters,
                             merge_adapters, save_adapters)
from mtlref.pretrained import load_model
from mtlref.layers import AdaptedLinear, FeedForward, ForwardContext
from conftest import need

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "fixtures"
NUM_TASKS = 3
TARGETS = {"toy": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama-tiny": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "mpt-tiny": ["Wqkv", "out_proj", "up_proj", "down_proj"],
           "t5-tiny": ["q", "k", "v", "o", "wi", "wo"],
           "bert-tiny": ["query", "key", "value", "dense"]}
MODELS = list(TARGETS)
# name -> (registry method, options); small expert counts so that tiny batches reach every expert
VARIANTS = {"lora": ("lora", {}), "lora-st": ("lora", {"per_task": True}), "dora": ("dora", {}),
            "multilora": ("multilora", {}), "moelora": ("moelora", {"num_experts": 4, "task_dim": 8}),
            "mixlora": ("mixlora", {"num_experts": 4, "top_k": 2}), "mtl-lora": ("mtl-lora", {}),
            "mtl-lora-full": ("mtl-lora", {"full_lambda": True}), "more": ("more", {}),
            "hydralora": ("hydralora", {"num_heads": 3}), "moslora": ("moslora", {}),
            "moslora-identity": ("moslora", {"mixer_init": "identity"}), "poly": ("poly", {"num_skills": 2}),
            "mhr": ("poly", {"num_skills": 2, "num_splits": 2})}
MERGEABLE = [v for v, (m, _) in VARIANTS.items() if REGISTRY[m].mergeable]
# What starts at zero so that ΔY = 0 at init, per method (each paper's init): LoRA's B, MultiLoRA's
# per-branch scales; DoRA none (m = ‖W‖_c makes W' = W, exact only up to rounding in the norm).
ZERO_AT_INIT = {"lora": {"lora_B"}, "dora": set(), "multilora": {"lora_scale"}, "moelora": {"lora_B"},
                "mixlora": {"lora_B"}, "mtl-lora": {"lora_B"}, "more": {"lora_B"}, "hydralora": {"lora_B"},
                "moslora": {"lora_B"}, "poly": {"poly_lora_B"}}


# ----------------------------------------------------------------------------- a toy backbone
class ToyMLP(FeedForward):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = AdaptedLinear(d, f, bias=True), AdaptedLinear(d, f, bias=True)
        self.down_proj = AdaptedLinear(f, d, bias=True)

    def parts(self):
        return self.gate_proj, self.up_proj, self.down_proj, F.silu


class ToyBlock(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.q_proj, self.o_proj, self.mlp = AdaptedLinear(d, d, bias=True), AdaptedLinear(d, d), ToyMLP(d, f)

    def forward(self, x, ctx):
        x = x + self.o_proj(torch.tanh(self.q_proj(x, ctx)), ctx)
        return x + self.mlp(x, ctx)


class Toy(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16, f: int = 24, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d, f) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, input_ids, attention_mask=None, task_ids=None, ctx=None):
        ctx = (ctx or ForwardContext(task_ids=task_ids)).with_mask(attention_mask)
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h, ctx)
        return self.head(h)


# ----------------------------------------------------------------------------- helpers
BASES: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """Each base is built or loaded once per session; tests attach to deep copies."""
    if name not in BASES:
        if name == "toy":
            BASES[name] = Toy().eval()
        else:
            BASES[name] = load_model(need(FIXTURES / name))
    return BASES[name]


def vocab(model) -> int:
    return model.embed.num_embeddings if isinstance(model, Toy) else model.config.vocab_size


def batch(name: str, model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab(model), 200), (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[-1, 5:] = 0                                           # last row right-padded
    dec = torch.randint(3, min(vocab(model), 200), (4, 5), generator=g)
    return ids, mask, dec


def run(name: str, model, task_ids, aux=None) -> list[torch.Tensor]:
    ids, mask, dec = batch(name, model)
    ctx = ForwardContext(task_ids=task_ids, aux_losses=aux)
    if name == "t5-tiny":
        return [model(ids, attention_mask=mask, decoder_input_ids=dec, ctx=ctx)]
    if name == "bert-tiny":
        h = model(ids, attention_mask=mask, ctx=ctx)
        return [h, model.pool(h, ctx)]                         # the pooler's dense is a target too
    return [model(ids, attention_mask=mask, ctx=ctx)]


TASKS = torch.tensor([0, 2, 1, 2])


def attached(name: str, variant: str):
    method, options = VARIANTS[variant]
    model = copy.deepcopy(base_model(name))
    torch.manual_seed(0)                        # adapter init draws from the global generator
    return attach_adapters(model, method, TARGETS[name], num_tasks=NUM_TASKS, rank=8, alpha=16, **options)


def randomise(model, seed: int = 0):
    """Move every adapter tensor away from its init (B = 0 would hide most of the math)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- properties
def test_variants_cover_the_registry():
    assert {m for m, _ in VARIANTS.values()} == set(REGISTRY)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_zero_init_gives_the_base_output(name, variant):
    base, model = base_model(name), attached(name, variant)
    method = VARIANTS[variant][0]
    zeros = ZERO_AT_INIT[method]
    found = set()
    for a in adapters_of(model).values():     # (MixLoRA's attention targets carry a LoRA: B = 0 too)
        for pname, p in a.named_parameters():
            if pname.rsplit(".", 1)[-1] in zeros:
                found.add(pname.rsplit(".", 1)[-1])
                assert torch.count_nonzero(p) == 0, f"{pname} should start at zero"
    assert found == zeros
    with torch.no_grad():                       # same autograd state on both sides (SDPA picks its kernel by it)
        ref, out = run(name, base, TASKS), run(name, model, TASKS)
    for o, r in zip(out, ref):
        if method != "dora":
            assert torch.equal(o, r)
        else:                                   # DoRA: m/‖W‖ = 1 up to rounding in the norm
            assert (o - r).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_only_adapters_train_and_every_tensor_gets_a_gradient(name, variant):
    model = randomise(attached(name, variant)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in "." + n for n in trainable)
    aux = {}
    loss = sum(o.float().pow(2).mean() for o in run(name, model, TASKS, aux))
    expected_aux = {"more": {"more_contrastive"}, "mixlora": {"mixlora_balance"}}.get(VARIANTS[variant][0], set())
    assert set(aux) == expected_aux
    loss = loss + sum(sum(v) for v in aux.values())
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
        else:
            assert p.grad is None, f"base weight {n} got a gradient"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_a_mixed_batch_equals_single_task_batches_row_by_row(name, variant):
    model = randomise(attached(name, variant)).eval()
    with torch.no_grad():
        mixed = run(name, model, TASKS)
        for t in range(NUM_TASKS):
            single = run(name, model, torch.full_like(TASKS, t))
            rows = TASKS == t
            for m, s in zip(mixed, single):
                assert torch.equal(m[rows], s[rows])


@pytest.mark.parametrize("variant", MERGEABLE)
@pytest.mark.parametrize("name", MODELS)
def test_merged_equals_unmerged_for_every_task(name, variant):
    model = randomise(attached(name, variant)).eval()
    for t in range(NUM_TASKS):
        merged = merge_adapters(model, t)
        assert not adapters_of(merged) and not hasattr(merged, "adapter_config")
        assert count_parameters(merged)[1] == count_parameters(base_model(name))[1]
        ids = torch.full_like(TASKS, t)
        with torch.no_grad():
            for m, u in zip(run(name, merged, ids), run(name, model, ids)):   # fp32 rounding only
                assert (m - u).abs().max().item() <= 1e-5 * max(1.0, u.abs().max().item())
    assert adapters_of(model), "merging must not touch the original"


def test_mixlora_cannot_be_merged():
    model = attached("toy", "mixlora")
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model, 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_save_then_load_reproduces_the_outputs(name, variant, tmp_path):
    model = randomise(attached(name, variant)).eval()
    head = nn.Linear(4, 2)
    save_adapters(model, tmp_path, extra_modules={"heads": head}, extra_config={"tasks": ["a", "b", "c"]})
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert keys and all(".adapter." in "." + k or k.startswith("heads.") for k in keys)
    fresh, fresh_head = copy.deepcopy(base_model(name)), nn.Linear(4, 2)
    cfg = load_adapters(fresh, tmp_path, extra_modules={"heads": fresh_head})
    assert cfg["tasks"] == ["a", "b", "c"] and cfg["method"] == VARIANTS[variant][0]
    assert torch.equal(fresh_head.weight, head.weight)
    if name != "toy":                           # the base it was trained on, from the fixture's own files
        raw = json.loads((FIXTURES / name / "config.json").read_text())
        assert cfg["base_identity"] == {"model_type": raw["model_type"], "name": name, "config_sha256":
                                        hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]}
    if variant == "more":
        assert cfg["rank_maps"] and all(len(v) == NUM_TASKS for v in cfg["rank_maps"].values())
    with torch.no_grad():
        for a, b in zip(run(name, fresh, TASKS), run(name, model, TASKS)):
            assert torch.equal(a, b)


def test_loading_onto_another_base_or_method_fails_clearly(tmp_path):
    model = randomise(attached("toy", "lora"))
    model.base_identity = {"model_type": "toy", "name": "toy-a", "config_sha256": "aaaa"}
    save_adapters(model, tmp_path)
    other = copy.deepcopy(base_model("toy"))
    other.base_identity = {"model_type": "toy", "name": "toy-b", "config_sha256": "bbbb"}
    with pytest.raises(ValueError, match="toy-a.*aaaa.*toy-b.*bbbb"):
        load_adapters(other, tmp_path)
    different = attached("toy", "more")
    with pytest.raises(ValueError, match="different adapters.*method"):
        load_adapters(different, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        load_adapters(copy.deepcopy(base_model("toy")), tmp_path)


def test_loading_onto_another_fixture_family_fails_clearly(tmp_path):
    model = attached("llama-tiny", "lora")
    save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="llama-tiny.*mpt-tiny"):
        load_adapters(copy.deepcopy(base_model("mpt-tiny")), tmp_path)


# ----------------------------------------------------------------------------- attach errors
def test_attach_errors_are_clear():
    base = base_model("toy")
    with pytest.raises(ValueError, match="unknown adapter method 'lorax'.*mtl-lora"):
        attach_adapters(copy.deepcopy(base), "lorax", ["q_proj"])
    with pytest.raises(ValueError, match="'proj' matches no projection.*q_proj"):
        attach_adapters(copy.deepcopy(base), "lora", ["proj"])                  # dot boundary
    with pytest.raises(ValueError, match="unknown option.*num_up"):
        attach_adapters(copy.deepcopy(base), "lora", ["q_proj"], num_up=3)
    with pytest.raises(ValueError, match="multiple of num_experts"):
        attach_adapters(copy.deepcopy(base), "moelora", ["q_proj"], rank=6, num_experts=4)
    with pytest.raises(ValueError, match="task_dim"):
        attach_adapters(copy.deepcopy(base), "more", ["q_proj"], task_dim=0)
    model = attached("toy", "lora")
    with pytest.raises(ValueError, match="already has adapters"):
        attach_adapters(model, "lora", ["q_proj"])
    model = attached("toy", "mtl-lora")
    with pytest.raises(ValueError, match="pass task_ids"):
        run("toy", model, None)
    with pytest.raises(ValueError, match="out of range"):
        run("toy", model, torch.tensor([0, 1, 2, 3]))


def test_targets_match_at_a_dot_boundary():
    model = attach_adapters(copy.deepcopy(base_model("bert-tiny")), "lora", ["output.dense"])
    names = sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear) and m.adapter is not None)
    assert names == sorted([f"encoder.layer.{i}.{p}.output.dense" for i in range(2) for p in ("attention",)]
                           + [f"encoder.layer.{i}.output.dense" for i in range(2)])
    assert model.adapter_config["targets"] == ["output.dense"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n)


def test_mixlora_puts_experts_on_the_ffn_and_lora_elsewhere():
    model = attached("llama-tiny", "mixlora")
    mlp = model.model.layers[0].mlp
    assert type(mlp.adapter).__name__ == "MixLoRA" and mlp.adapter.roles == ("gate", "up", "down")
    assert all(p.adapter is None for p in mlp.parts()[:3])
    assert type(model.model.layers[0].self_attn.q_proj.adapter).__name__ == "LoRA"
    with pytest.raises(ValueError, match="FFN projections"):
        attach_adapters(copy.deepcopy(base_model("toy")), "mixlora", ["q_proj"])


# ----------------------------------------------------------------------------- Table 6 counts
def t5_slots(model, suffixes):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, AdaptedLinear) and n.rsplit(".", 1)[-1] in suffixes]


@pytest.mark.parametrize("method", ["lora", "multilora", "moelora", "more", "mixlora"])
def test_trainable_counts_match_more_table6(method):
    """MoRE Table 6 writes per-module counts times 6L, for T5-base with q,k,v,o,wi,wo adapted.
    Convention: L counts encoder and decoder blocks (t5-tiny: 2 + 2 = 4). The suffix targets
    also match the decoder's cross-attention q,k,v,o, so a decoder block holds 10 adapted
    modules, not 6 (t5-tiny: 6·2 + 10·2 = 32), and q (64 -> 64) and wi (64 -> 128) differ in
    shape: we evaluate each formula as its per-module term summed over the adapted modules,
    which is exactly 6L·term when every block has 6 modules of one shape."""
    base = base_model("t5-tiny")
    cfg = base.config
    L, n, r, T, h = cfg.num_layers + cfg.num_decoder_layers, 3, 8, NUM_TASKS, 16
    targets = ["q", "k", "v", "o", "wi", "wo"] if method != "mixlora" else ["wi", "wo"]
    options = {"multilora": {"num_loras": n}, "moelora": {"num_experts": 4, "task_dim": h},
               "mixlora": {"num_experts": 4, "top_k": 2}}.get(method, {})
    model = attach_adapters(copy.deepcopy(base), method, targets, num_tasks=T, rank=r, alpha=16, **options)
    mods = [(m.in_features, m.out_features) for _, m in t5_slots(model, targets)]
    if method != "mixlora":
        assert len(mods) == 6 * cfg.num_layers + 10 * cfg.num_decoder_layers
    E = options.get("num_experts", 0)
    per_module = {
        "lora": lambda i, o: r * (i + o),                                  # 6Lr(m+d)
        "multilora": lambda i, o: n * r * (i + o) + n * o,                 # 6nLr(m+d) + 6nLd (Table 6: 6Ld, one scale)
        "moelora": lambda i, o: r * (i + o) + h * (E + T),                 # 6Lr(m+d) + 6Lh(n+T)
        "more": lambda i, o: r * (i + o) + i * (r + T) + r,                # 6Lr(m+d) + 6Lh(r+T) + b_g, h = in
        "mixlora": lambda i, o: E * r * (i + o),                           # 2nLr(m+d), the experts
    }[method]
    expected = sum(per_module(i, o) for i, o in mods)
    if method == "mixlora":
        # Table 6 prints 2Lnm for the routers, but MixLoRA has ONE router (d_model -> E) per FFN
        # block, i.e. L·n·m: the printed formula counts it once per adapted FFN projection.
        assert len(mods) == 2 * L
        expected += L * E * cfg.d_model
        assert expected == 2 * E * L * r * (cfg.d_ff + cfg.d_model) + L * E * cfg.d_model
    trainable, total, percent = count_parameters(model)
    assert trainable == expected
    assert total == count_parameters(base)[1] + trainable
    assert percent == pytest.approx(100 * trainable / total)


@pytest.mark.parametrize("variant", ["poly", "mhr", "hydralora", "moslora"])
def test_trainable_counts_of_the_later_methods(variant):
    """Per adapted module (in i, out o, rank r, T tasks): Poly/MHR S·r(i+o) + T·Q·S (S skills of
    A and B, cut into Q heads, and the routing logits); HydraLoRA r·i + N·r·o + N·i (one A, N
    heads B_i, the router); MoSLoRA r(i+o) + r² (the mixer)."""
    base = base_model("t5-tiny")
    r, T, S, Q, N = 8, NUM_TASKS, 3, 2, 5
    targets = ["q", "k", "v", "o", "wi", "wo"]
    method, options, per_module = {
        "poly": ("poly", {"num_skills": S}, lambda i, o: S * r * (i + o) + T * S),
        "mhr": ("poly", {"num_skills": S, "num_splits": Q}, lambda i, o: S * r * (i + o) + T * Q * S),
        "hydralora": ("hydralora", {"num_heads": N}, lambda i, o: r * i + N * r * o + N * i),
        "moslora": ("moslora", {}, lambda i, o: r * (i + o) + r * r),
    }[variant]
    model = attach_adapters(copy.deepcopy(base), method, targets, num_tasks=T, rank=r, alpha=16, **options)
    mods = [(m.in_features, m.out_features) for _, m in t5_slots(model, targets)]
    assert count_parameters(model)[0] == sum(per_module(i, o) for i, o in mods)


def test_a_failed_attach_leaves_the_model_untouched():
    model = copy.deepcopy(base_model("toy"))
    with pytest.raises(ValueError, match="multiple of num_experts"):
        attach_adapters(model, "moelora", ["q_proj"], rank=6, num_experts=4)
    assert not adapters_of(model) and not hasattr(model, "adapter_config")
    assert all(p.requires_grad for p in model.parameters())
    attach_adapters(model, "lora", ["q_proj"])                        # and can still be adapted


# ----------------------------------------------------------------------------- the interface's hooks
def test_every_method_is_an_adapter_and_declares_its_own_old_format_defaults():
    """One interface: every registered class is a base.Adapter, and each declares (in its own class
    body) the option values format-1 adapter_config.json files did not record; those name only
    options the class still has."""
    for method, cls in REGISTRY.items():
        assert issubclass(cls, Adapter), method
        assert "format_1_options" in vars(cls), f"{cls.__name__} must declare format_1_options itself"
        assert set(cls.format_1_options) | set(cls.format_2_added) <= set(cls.options), method
        assert set(cls.transfer_free) <= set(cls.options), method


def test_configure_for_turns_off_the_decoders_contrastive_loss_for_official_more_on_t5():
    """MoRE's official code adds only the encoder's L_con on T5 (mtlref/adapters/more_official.py):
    configure_for, called per adapter as the run does after attaching, turns the decoder's off and
    freezes its task embeddings; the encoder's, MoRE's paper mode, other families and other
    methods are left as they were."""
    def configured(method, family, **options):
        model = copy.deepcopy(base_model("t5-tiny"))
        torch.manual_seed(0)
        attach_adapters(model, method, ["q", "v"], num_tasks=NUM_TASKS, rank=8, alpha=16, **options)
        for name, adapter in adapters_of(model).items():
            adapter.configure_for(family, "gen", name)
        return model

    def state(model):
        return {n: (getattr(a, "contrastive", None), [p.requires_grad for p in a.parameters()])
                for n, a in adapters_of(model).items()}

    model = configured("more", "t5", official=True)
    adapters = adapters_of(model)
    assert any(n.startswith("decoder.") for n in adapters) and any(n.startswith("encoder.") for n in adapters)
    for name, a in adapters.items():
        decoder = name.startswith("decoder.")
        assert a.contrastive is not decoder and a.task_embedding.requires_grad is not decoder, name
        assert not a.gate.weight.requires_grad                               # official: the gate never trains
    aux = {}
    model.train()
    run("t5-tiny", model, TASKS, aux)
    assert len(aux["more_contrastive"]) == sum(n.startswith("encoder.") for n in adapters)
    for method, family, options in [("more", "t5", {}), ("more", "llama", {"official": True}),
                                    ("mtl-lora", "t5", {}), ("lora", "t5", {})]:
        model = configured(method, family, **options)
        fresh = copy.deepcopy(base_model("t5-tiny"))
        torch.manual_seed(0)
        attach_adapters(fresh, method, ["q", "v"], num_tasks=NUM_TASKS, rank=8, alpha=16, **options)
        assert state(model) == state(fresh), (method, family, options)
