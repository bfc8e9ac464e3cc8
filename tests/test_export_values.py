"""Every export path checked by value (issue 23, point 4): for each method that exports, each
task t, and each option of mtlref/export.py and export.py (plain peft, --uniform-rank,
--attention-only, MPT's row blocks joined into one Wqkv LoRA, --format merged in one file and
sharded, --prefix), the written files give W + ΔW_t of every adapted module, where W + ΔW_t is
computed here from the adapter's own tensors and the equation in its docstring
(mtlref/adapters/*.py), in float64, never through mtlref/export.py or as_lora / delta_weight.

Ranks and alphas differ per module (attach_adapters' rank_pattern / alpha_pattern: 2, 4, 6, 8 and
16, 5, 12 in turn), and MoRE's ranks differ per task too. The files are read as their readers read
them: peft's adapter_config.json (r, lora_alpha, rank_pattern and alpha_pattern looked up as peft's
get_pattern_key does, use_rslora, use_dora) and adapter_model.safetensors, reconstructed as
W + (α/r)·B·A (DoRA: m ⊙ V/‖V‖_row, peft's DoraLinearLayer); merged checkpoints through
model.safetensors or model.safetensors.index.json and its shards; the base W from the fixture's
own checkpoint on disk.

Measured (CPU, fp32 files against the float64 reference, `pytest -s` prints it): max |error|
1.3e-7 plain peft, 1.6e-7 uniform rank, 3.6e-8 attention-only, 1.3e-7 merged (one file and
sharded), 7.6e-8 through export.py; TOL = 1e-5.
"""
import copy
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, need
from mtlref import load_model
from mtlref.adapters import (DoRA, LoRA, MixLoRA, MoELoRA, MoRE, MoSLoRA, MTLLoRA, MultiLoRA, Poly, adapters_of, attach_adapters,
                             save_adapters, slots_of)
from mtlref.commands import export_main
from mtlref.export import PEFT_CONFIG, PEFT_WEIGHTS, export_merged, export_peft
from mtlref.layers import RowBlock
from test_adapters import base_model

TOL = 1e-5
NUM_TASKS = 3
RANKS, ALPHAS = (2, 4, 6, 8), (16.0, 5.0, 12.0)          # cycled over the adapted modules
FAMILIES = {                                             # name: (fixture, targets)
    "llama-tiny": ("llama-tiny", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mpt-tiny": ("mpt-tiny", ["Wqkv.q", "Wqkv.k", "Wqkv.v", "out_proj", "up_proj", "down_proj"]),   # row blocks
    "mpt-qv": ("mpt-tiny", ["Wqkv.q", "Wqkv.v", "out_proj"]),           # row block k without an adapter
    "mpt-fused": ("mpt-tiny", ["Wqkv", "out_proj"]),                     # the fused slot itself
    "t5-tiny": ("t5-tiny", ["q", "k", "v", "o", "wi", "wo"]),
    "bert-tiny": ("bert-tiny", ["query", "key", "value", "dense"]),      # "dense" takes the pooler too
}
VARIANTS = {                                             # every method that exports, with its options
    "lora": ("lora", {}),
    "lora-st": ("lora", {"per_task": True}),
    "dora": ("dora", {}),
    "multilora": ("multilora", {"num_loras": 2}),
    "moelora": ("moelora", {"num_experts": 2, "task_dim": 8}),
    "mtl-lora": ("mtl-lora", {}),
    "mtl-lora-full": ("mtl-lora", {"full_lambda": True, "tau": 0.7}),
    "mtl-lora-no-lambda": ("mtl-lora", {"task_lambda": False}),
    "more": ("more", {}),
    "more-unscaled": ("more", {"linear_scaling": False}),
    "more-soft": ("more", {"selection": "soft", "scale_tasks": 5}),
    "more-subset": ("more", {"selection": "subset"}),
    "more-official": ("more", {"official": True}),
    "poly": ("poly", {"num_skills": 2}),
    "mhr": ("poly", {"num_skills": 2, "num_splits": 2}),
    "moslora": ("moslora", {}),
}
MIXLORA_FAMILIES = ["llama-tiny", "mpt-tiny", "t5-tiny", "bert-tiny"]
ERRORS: dict[str, float] = {}                            # the largest error seen per kind (pytest -s prints it)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    print("\nmax |error| per export path:", {k: f"{v:.2e}" for k, v in sorted(ERRORS.items())})


# ----------------------------------------------------------------------------- the models
def build(family: str, method: str, options: dict, seed: int = 0, num_tasks: int = NUM_TASKS, base=None):
    """A fresh copy of the family's base with `method` on its targets, rank and α cycled per
    module (rank_pattern / alpha_pattern), every trainable tensor moved off its init. Returns
    (model, {slot path: (r, α)})."""
    fixture, targets = FAMILIES[family]
    base = base_model(fixture) if base is None else base
    names = adapted_slots(family, method == "mixlora")
    ra = {n: (RANKS[i % len(RANKS)], ALPHAS[i % len(ALPHAS)]) for i, n in enumerate(names)}
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    attach_adapters(model, method, targets, num_tasks=num_tasks, rank=8, alpha=16,
                    rank_pattern={n: r for n, (r, _) in ra.items() if r != 8},
                    alpha_pattern={n: a for n, (_, a) in ra.items() if a != 16}, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        if options.get("selection") == "subset":     # per-task subsets S_t, the last task's empty
            for a in adapters_of(model).values():
                a.gate.weight.mul_(10.0)
                a.gate.bias.fill_(-0.3)
                a.task_embedding[-1].zero_()
    for n, a in adapters_of(model).items():
        if n in ra:
            A = a.poly_lora_A.transpose(-1, -2) if isinstance(a, Poly) else a.lora_A
            assert A.shape[-2] == ra[n][0], n                           # the pattern took
    return model.eval(), ra


SLOTS: dict[tuple[str, bool], list[str]] = {}


def adapted_slots(family: str, mixlora: bool) -> list[str]:
    """The projection slots that the family's targets adapt (MixLoRA: those outside its FFN
    blocks), found once by attaching to a copy of the base."""
    if (family, mixlora) not in SLOTS:
        fixture, targets = FAMILIES[family]
        method, options = ("mixlora", {"num_experts": 2}) if mixlora else ("lora", {})
        probe = attach_adapters(copy.deepcopy(base_model(fixture)), method, targets, **options)
        slots = slots_of(probe)
        SLOTS[family, mixlora] = sorted(n for n in adapters_of(probe) if n in slots)
    return SLOTS[family, mixlora]


BASES: dict[str, dict[str, torch.Tensor]] = {}


def base_state(fixture: str) -> dict[str, torch.Tensor]:
    """The fixture's own checkpoint as on disk (one file, or an index and its shards)."""
    if fixture not in BASES:
        d = need(FIXTURES / fixture)
        if (d / "model.safetensors").is_file():
            BASES[fixture] = load_file(str(d / "model.safetensors"))
        else:
            files = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
            BASES[fixture] = {k: v for f in sorted(files) for k, v in load_file(str(d / f)).items()}
    return BASES[fixture]


# ----------------------------------------------------------------------------- the reference
def d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def reference(adapter, W: torch.Tensor, t: int, r: int, alpha: float, options: dict, num_tasks: int):
    """(W + ΔW_t in float64, the rank of task t's LoRA as the export table of mtlref/export.py
    states it), from the adapter's tensors and its docstring's equation; s = α/r."""
    W, s = d(W), alpha / r
    if isinstance(adapter, Poly):                       # ΔW = s (A_t B_t)ᵀ, eval weights w = σ(ℓ_t)/Σ_s σ(ℓ_t)
        Q, S = options.get("num_splits", 1), options["num_skills"]
        z = torch.sigmoid(d(adapter.module_logits[t]).view(Q, S))
        w = z / z.sum(-1, keepdim=True)
        A = torch.cat([sum(w[q, k] * d(adapter.poly_lora_A[q, k]) for k in range(S)) for q in range(Q)], 0)
        B = torch.cat([sum(w[q, k] * d(adapter.poly_lora_B[q, k]) for k in range(S)) for q in range(Q)], 1)
        return W + s * (A @ B).T, r                     # heads: A_t's rows (in), B_t's columns (out)
    A, B = d(adapter.lora_A), d(adapter.lora_B)
    if isinstance(adapter, MoSLoRA):                    # ΔW = s B M A
        return W + s * B @ d(adapter.lora_mixer) @ A, r
    if isinstance(adapter, DoRA):                       # W' = m ⊙ V/‖V‖_c, V = W + s B A
        V = W + s * B @ A
        return d(adapter.magnitude)[:, None] * V / V.norm(dim=1, keepdim=True), r
    if isinstance(adapter, MultiLoRA):                  # ΔW = s Σ_i diag(scale_i) B_i A_i
        c = d(adapter.lora_scale)
        return W + s * sum(c[i][:, None] * (B[i] @ A[i]) for i in range(A.shape[0])), A.shape[0] * r
    if isinstance(adapter, MoELoRA):                    # ΔW = s Σ_e g_{t,e} B_e A_e, g_t = softmax(W_gate e_t)
        E = options["num_experts"]
        g = torch.softmax(d(adapter.gate.weight) @ d(adapter.task_embedding[t]), dim=-1)
        w = r // E                                      # expert e: rank rows/columns e·r/E:(e+1)·r/E
        return W + s * sum(g[e] * B[:, e * w:(e + 1) * w] @ A[e * w:(e + 1) * w] for e in range(E)), r
    if isinstance(adapter, MTLLoRA):                    # ΔW = s Σ_i softmax(w_t/τ)_i B^i Λ_t A
        pi = torch.softmax(d(adapter.task_weights[t]) / options.get("tau", 0.5), dim=-1)
        Bbar = sum(pi[i] * B[i] for i in range(B.shape[0]))
        if not options.get("task_lambda", True):
            lam = torch.eye(r, dtype=torch.float64)
        elif options.get("full_lambda"):
            lam = d(adapter.task_lambda[t])
        else:
            lam = torch.diag(d(adapter.task_lambda[t]))
        return W + s * Bbar @ lam @ A, r
    if isinstance(adapter, MoRE):
        size = options.get("scale_tasks") or num_tasks                    # |T| of Eq. 6
        lin = options.get("linear_scaling", True)
        if options.get("official"):                     # s Σ_{j<=r_t} (j/r)² B[:, j] A[j], r_t fixed at init
            k = int(adapter.rank_table[t])
            return W + s * sum((j / r) ** 2 * torch.outer(B[:, j - 1], A[j - 1]) for j in range(1, k + 1)), k
        logits = d(adapter.gate.weight) @ d(adapter.task_embedding[t]) + d(adapter.gate.bias)   # W_g e_t + b_g
        sel = options.get("selection", "ste")
        if sel == "ste":                                # Eq. 3-6: r_t = argmax p_t + 1, Ste(p)[r_t] = 1
            k = int(torch.softmax(logits, -1).argmax()) + 1
            return W + (k / size if lin else 1.0) * s * B[:, :k] @ A[:k], k
        if sel == "soft":                               # Σ_k p_t[k] c(k) s B[:, :k] A[:k]
            p = torch.softmax(logits, -1)
            return W + sum(p[k - 1] * (k / size if lin else 1.0) * s * B[:, :k] @ A[:k]
                           for k in range(1, r + 1)), r
        on = torch.sigmoid(logits) > 0.5                # subset: S_t, (|S_t|/|T|) s Σ_{j∈S_t} B[:, j] A[j]
        n = int(on.sum())
        return W + (n / size if lin else 1.0) * s * B[:, on] @ A[on], max(n, 1)   # empty: one zero column
    if isinstance(adapter, LoRA):                       # ΔW = s B A (LoRA-ST: task t's own A, B)
        if A.dim() == 3:
            A, B = A[t], B[t]
        return W + s * B @ A, r
    raise AssertionError(f"no reference for {type(adapter).__name__}")


def expected(model, fixture: str, ra: dict, t: int, options: dict, num_tasks: int = NUM_TASKS):
    """{checkpoint module: (W + ΔW_t float64, task t's LoRA rank)} over every adapted projection;
    row blocks fill their rows of the fused module (rows of blocks without an adapter stay W, rank 0)."""
    base, slots, out = base_state(fixture), slots_of(model), {}
    for name, adapter in adapters_of(model).items():
        if name not in slots:                           # MixLoRA's FFN experts: in no LoRA export
            assert isinstance(adapter, MixLoRA)
            continue
        slot = slots[name]
        r, alpha = ra[name]
        if isinstance(slot, RowBlock):
            module = name.rsplit(".", 1)[0]
            W = base[module + ".weight"]
            fused, k = out.get(module, (d(W).clone(), 0))
            rows, rank = reference(adapter, W[slot.start:slot.stop], t, r, alpha, options, num_tasks)
            fused[slot.start:slot.stop] = rows
            out[module] = (fused, k + rank)
        else:
            out[name] = reference(adapter, base[name + ".weight"], t, r, alpha, options, num_tasks)
    return out


def close(got: torch.Tensor, want: torch.Tensor, kind: str, where) -> None:
    assert got.shape == want.shape, (where, tuple(got.shape), tuple(want.shape))
    err = (got.double() - want).abs().max().item()
    ERRORS[kind] = max(ERRORS.get(kind, 0.0), err)
    assert err <= TOL, f"{where}: max |error| {err:.3g} > {TOL}"


# ----------------------------------------------------------------------------- the readers
def peft_key_value(pattern: dict, name: str, default):
    """peft's get_pattern_key: the first key k (in order) with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft(out, fixture: str, prefix: str = ""):
    """(config, {module: W' float64 as a peft LoRA (or DoRA) layer computes it}, {module: rank})
    from out/adapter_config.json + out/adapter_model.safetensors and the base checkpoint."""
    cfg = json.loads((out / PEFT_CONFIG).read_text())
    tensors = load_file(str(out / PEFT_WEIGHTS))
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and not cfg["fan_in_fan_out"]
    base, weights, ranks, keys = base_state(fixture), {}, {}, set()
    for name in cfg["target_modules"]:
        key = "base_model.model." + name
        A, B = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        keys |= {key + ".lora_A.weight", key + ".lora_B.weight"}
        r = peft_key_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = peft_key_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        assert A.shape[0] == r == B.shape[1], (name, tuple(A.shape), tuple(B.shape), r)
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        assert name.startswith(prefix), (name, prefix)
        module = name[len(prefix):]
        W = d(base[module + ".weight"])
        V = W + scale * d(B) @ d(A)
        if cfg.get("use_dora"):
            keys.add(key + ".lora_magnitude_vector")
            V = d(tensors[key + ".lora_magnitude_vector"])[:, None] * V / V.norm(dim=1, keepdim=True)
        weights[module], ranks[module] = V, r
    assert set(tensors) == keys, sorted(set(tensors) ^ keys)[:4]      # no tensor outside target_modules
    return cfg, weights, ranks


def read_merged(out):
    """(state, number of files) of a merged checkpoint: model.safetensors, or the index and its
    shards, each shard holding exactly the keys the index maps to it."""
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        assert not list(out.glob("model-*.safetensors"))
        return load_file(str(out / "model.safetensors")), 1
    assert not (out / "model.safetensors").exists()                   # a reader would take it first
    info = json.loads(index.read_text())
    files = sorted(set(info["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == files
    state = {}
    for f in files:
        part = load_file(str(out / f))
        assert sorted(part) == sorted(k for k, v in info["weight_map"].items() if v == f), f
        state.update(part)
    assert info["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    return state, n


def check_merged(state: dict, want: dict, fixture: str, kind: str, where) -> None:
    """Every key of the base, each adapted module's weight = want, everything else the base exactly."""
    base = base_state(fixture)
    assert set(state) == set(base), sorted(set(state) ^ set(base))[:4]
    assert {k.removesuffix(".weight") for k in state} >= set(want)
    for k, v in state.items():
        module = k.removesuffix(".weight")
        if k.endswith(".weight") and module in want:
            close(v, want[module][0], kind, (where, k))
        else:
            assert v.dtype == base[k].dtype and torch.equal(v, base[k]), (where, k)


# ----------------------------------------------------------------------------- peft
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_gives_w_plus_delta_w_of_each_task(family, variant, tmp_path):
    """Plain --format peft: one module per adapted projection (row blocks: their fused Wqkv),
    each with task t's own rank (MultiLoRA n·r, MoRE r_t or |S_t|, row blocks the sum), and
    W + (α/r) B A = W + ΔW_t under the config's r / rank_pattern / alpha_pattern (bert: with the
    "bert." prefix of the BertFor... classes)."""
    method, options = VARIANTS[variant]
    fixture = FAMILIES[family][0]
    prefix = "bert." if family == "bert-tiny" else ""
    model, ra = build(family, method, options)
    for t in range(NUM_TASKS):
        export_peft(model, t, tmp_path / str(t), prefix=prefix)
        cfg, got, ranks = read_peft(tmp_path / str(t), fixture, prefix)
        want = expected(model, fixture, ra, t, options)
        assert cfg["use_dora"] == (method == "dora") and not cfg["use_rslora"]
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
        for module, (w, k) in want.items():
            assert ranks[module] == k, (module, t, ranks[module], k)
            close(got[module], w, "peft", (family, variant, t, module))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_rank_pads_every_module_to_the_largest_rank_with_the_same_weights(family, variant, tmp_path):
    """--uniform-rank: one r for every module (no rank_pattern), the largest of task t's ranks,
    and still W + ΔW_t in every module."""
    method, options = VARIANTS[variant]
    fixture = FAMILIES[family][0]
    model, ra = build(family, method, options, seed=1)
    for t in range(NUM_TASKS):
        export_peft(model, t, tmp_path / str(t), uniform_rank=True)
        cfg, got, ranks = read_peft(tmp_path / str(t), fixture)
        want = expected(model, fixture, ra, t, options)
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        assert set(ranks.values()) == {cfg["r"]} and cfg["r"] == max(k for _, k in want.values())
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
        for module, (w, _) in want.items():
            close(got[module], w, "uniform-rank", (family, variant, t, module))


@pytest.mark.parametrize("uniform", [False, True], ids=["ranks", "uniform"])
@pytest.mark.parametrize("family", MIXLORA_FAMILIES)
def test_mixlora_attention_only_exports_its_attention_loras_exactly(family, uniform, tmp_path):
    """--attention-only: MixLoRA's attention LoRAs (their own ranks and alphas; MPT's row blocks
    as one Wqkv LoRA) are the whole export, each W + s B A; no FFN projection is in it. Without
    the option, and as a merged checkpoint, MixLoRA is refused."""
    fixture = FAMILIES[family][0]
    options = {"num_experts": 2, "top_k": 1}
    model, ra = build(family, "mixlora", options, seed=2)
    assert any(isinstance(a, MixLoRA) for a in adapters_of(model).values())
    with pytest.raises(ValueError, match="--attention-only"):
        export_peft(model, 0, tmp_path / "refused")
    with pytest.raises(ValueError, match="cannot be merged"):
        export_merged(model, 0, tmp_path / "merged", FIXTURES / fixture)
    for t in range(NUM_TASKS):
        export_peft(model, t, tmp_path / str(t), attention_only=True, uniform_rank=uniform)
        cfg, got, ranks = read_peft(tmp_path / str(t), fixture)
        want = expected(model, fixture, ra, t, options)
        assert want and set(got) == set(want), sorted(set(got) ^ set(want))[:4]
        assert (len(set(ranks.values())) == 1) if uniform else all(ranks[m] == k for m, (_, k) in want.items())
        for module, (w, _) in want.items():
            close(got[module], w, "attention-only", (family, uniform, t, module))


# ----------------------------------------------------------------------------- merged
@pytest.mark.parametrize("layout", ["one-file", "sharded"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_checkpoint_holds_w_plus_delta_w_of_each_task(family, variant, layout, tmp_path):
    """--format merged: every key of the base checkpoint, W + ΔW_t in each adapted module (MPT's
    row blocks in their rows of Wqkv), every other tensor the base's exactly; sharded (20 kB per
    shard) through model.safetensors.index.json, each shard exactly the keys it maps; the base's
    config.json beside it."""
    method, options = VARIANTS[variant]
    fixture = FAMILIES[family][0]
    model, ra = build(family, method, options, seed=3)
    shard = 20_000 if layout == "sharded" else 5 * 2 ** 30
    for t in range(NUM_TASKS):
        out = export_merged(model, t, tmp_path / str(t), FIXTURES / fixture, max_shard_bytes=shard)
        state, files = read_merged(out)
        assert (files > 1) == (layout == "sharded"), files
        check_merged(state, expected(model, fixture, ra, t, options), fixture, "merged-" + layout,
                     (family, variant, t))
        assert json.loads((out / "config.json").read_text()) == \
            json.loads((FIXTURES / fixture / "config.json").read_text())


def test_a_merged_export_into_an_earlier_ones_directory_leaves_none_of_its_weights(tmp_path):
    """Task 0 in one file, then task 1 sharded into the same directory, then task 2 in one file
    again: each time only the new task's weights are there (a stale model.safetensors beside an
    index is what Hugging Face's loader would read first)."""
    model, ra = build("llama-tiny", "mtl-lora", {}, seed=4)
    fixture = FAMILIES["llama-tiny"][0]
    for t, shard in ((0, 5 * 2 ** 30), (1, 20_000), (2, 5 * 2 ** 30)):
        export_merged(model, t, tmp_path, FIXTURES / fixture, max_shard_bytes=shard)
        state, files = read_merged(tmp_path)
        assert (files > 1) == (t == 1) and (tmp_path / "model.safetensors.index.json").exists() == (t == 1)
        check_merged(state, expected(model, fixture, ra, t, {}), fixture, "merged-again", t)


# ----------------------------------------------------------------------------- the command line
def run_dir(path, method, options, model_dir, tasks_file):
    """A train.py --out directory written by hand (no training): the adapters moved off their
    init, untrained heads, and the run config that load_run reads. Returns (backbone, ranks, names)."""
    from mtlref.data.tasks import load_jsonl_tasks
    from mtlref.objective import build_model
    from mtlref.tokenizer import load_tokenizer
    specs = [s for s, _ in load_jsonl_tasks(tasks_file).values()]
    backbone, ra = build("bert-tiny", method, options, seed=4, num_tasks=len(specs), base=load_model(model_dir))
    model = build_model(backbone, load_tokenizer(model_dir), specs, "head")
    names = [s.name for s in specs]
    save_adapters(backbone, path, extra_modules={"heads": model.heads},
                  extra_config={"task_names": names, "bench": "jsonl", "jsonl": str(tasks_file), "objective": "head",
                                "pooling": "mean", "model_dir": str(model_dir)})
    return backbone, ra, names


def test_the_cli_options_write_w_plus_delta_w(tiny_bert, tiny_tasks, tmp_path):
    """export.py on a run: plain peft, --uniform-rank with --prefix bert., --format merged with
    a --max-shard-gb small enough to shard (MoRE, per-module and per-task ranks), and
    --attention-only (MixLoRA): each task's files hold W + ΔW_t."""
    options = {}
    more, ra, names = run_dir(tmp_path / "more", "more", options, tiny_bert, tiny_tasks)
    for flags, prefix in (([], ""), (["--uniform-rank", "--prefix", "bert."], "bert.")):
        out = tmp_path / ("x" + "".join(flags))
        assert export_main(["--checkpoint", str(tmp_path / "more"), "--task", "all", "--out", str(out), *flags]) == \
            [out / n for n in names]
        for t, n in enumerate(names):
            cfg, got, ranks = read_peft(out / n, "bert-tiny", prefix)
            want = expected(more, "bert-tiny", ra, t, options, len(names))
            assert set(got) == set(want)
            assert [ranks[m] for m in want] == [max(k for _, k in want.values()) if prefix else k
                                                for _, k in want.values()]
            for module, (w, _) in want.items():
                close(got[module], w, "cli-peft", (flags, n, module))
    for t, n in enumerate(names):
        out = tmp_path / "merged" / n
        export_main(["--checkpoint", str(tmp_path / "more"), "--task", n, "--format", "merged",
                  "--max-shard-gb", str(20_000 / 2 ** 30), "--out", str(out)])
        state, files = read_merged(out)
        assert files > 1 and (out / "vocab.txt").is_file()
        check_merged(state, expected(more, "bert-tiny", ra, t, options, len(names)), "bert-tiny", "cli-merged", n)
    options = {"num_experts": 2, "top_k": 1}
    mix, ra, names = run_dir(tmp_path / "mix", "mixlora", options, tiny_bert, tiny_tasks)
    out = tmp_path / "attention"
    export_main(["--checkpoint", str(tmp_path / "mix"), "--task", "all", "--attention-only", "--out", str(out)])
    for t, n in enumerate(names):
        _, got, _ = read_peft(out / n, "bert-tiny")
        want = expected(mix, "bert-tiny", ra, t, options, len(names))
        assert want and set(got) == set(want)
        for module, (w, _) in want.items():
            close(got[module], w, "cli-attention-only", (n, module))
