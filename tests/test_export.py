"""Serving: every exportable method's task-t adapter, written in peft's LoRA format and read
back into a plain mtlref LoRA model, gives that task's outputs of the original model (fp32);
the peft key names of each family; import(export(x)) is the identity; a merged checkpoint
reloads and equals merge_adapters; bad input is one clear error."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtlref import load_model
from mtlref.adapters import adapters_of, attach_adapters, load_adapters, merge_adapters, save_adapters
from mtlref.export import PEFT_CONFIG, PEFT_WEIGHTS, export_merged, export_peft, load_peft_adapter, peft_adapter
from test_adapters import FIXTURES, base_model, randomise, run

TARGETS = {"llama-tiny": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "mpt-tiny": ["Wqkv.q", "Wqkv.k", "Wqkv.v", "out_proj", "up_proj", "down_proj"],   # row blocks
           "mpt-fused": ["Wqkv", "out_proj"],
           "t5-tiny": ["q", "k", "v", "o", "wi", "wo"],
           "bert-tiny": ["query", "key", "value", "dense"]}
EXPORTABLE = {"lora": ("lora", {}), "lora-st": ("lora", {"per_task": True}), "dora": ("dora", {}),
              "multilora": ("multilora", {}), "moelora": ("moelora", {"num_experts": 4, "task_dim": 8}),
              "mtl-lora": ("mtl-lora", {}), "mtl-lora-full": ("mtl-lora", {"full_lambda": True}),
              "more": ("more", {}), "more-official": ("more", {"official": True}),
              "more-subset": ("more", {"selection": "subset"}), "poly": ("poly", {"num_skills": 2}),
              "moslora": ("moslora", {})}
NUM_TASKS = 3


def fixture(name):
    return base_model("mpt-tiny" if name == "mpt-fused" else name)


def adapted(name, variant):
    method, options = EXPORTABLE[variant]
    model = copy.deepcopy(fixture(name))
    torch.manual_seed(0)
    attach_adapters(model, method, TARGETS[name], num_tasks=NUM_TASKS, rank=8, alpha=16, **options)
    model = randomise(model)
    if variant == "more-subset":           # half of the columns on for some tasks, none for others
        with torch.no_grad():
            for a in adapters_of(model).values():
                a.gate.weight.zero_()
                a.gate.bias.copy_(torch.linspace(-1, 1, a.rank))
    return model.eval()


def family_run(name, model, task_ids):
    return run("mpt-tiny" if name == "mpt-fused" else name, model, task_ids)


@pytest.mark.parametrize("variant", EXPORTABLE)
@pytest.mark.parametrize("name", list(TARGETS))
def test_each_task_exports_as_one_lora_with_the_same_outputs(name, variant, tmp_path):
    model = adapted(name, variant)
    for t in range(NUM_TASKS):
        with torch.no_grad():
            want = family_run(name, model, torch.full((4,), t))
        export_peft(model, t, tmp_path / str(t))
        plain = copy.deepcopy(fixture(name))
        load_peft_adapter(plain, tmp_path / str(t))
        assert plain.adapter_config["method"] == ("dora" if variant == "dora" else "lora")
        with torch.no_grad():
            got = family_run(name, plain.eval(), None)
        for g, w in zip(got, want):
            assert (g - w).abs().max().item() <= 1e-5, (name, variant, t)


def test_more_ranks_differ_per_module_and_task_and_the_config_says_so():
    model = adapted("t5-tiny", "more")
    ranks = {n: a.rank_map().tolist() for n, a in adapters_of(model).items()}
    for t in range(NUM_TASKS):
        config, tensors = peft_adapter(model, t)
        got = {n: tensors[f"base_model.model.{n}.lora_A.weight"].shape[0] for n in ranks}
        assert got == {n: r[t] for n, r in ranks.items()}                # rank r_t of each module
        for n, k in got.items():                                         # scaling 1: α = r everywhere
            assert config["rank_pattern"].get(n, config["r"]) == k == config["alpha_pattern"].get(n, config["lora_alpha"])
    padded, tensors = peft_adapter(model, 0, uniform_rank=True)
    assert padded["rank_pattern"] == {} and all(t.shape[0] == 8 for k, t in tensors.items() if "lora_A" in k)


# One module of each family, with the peft keys a user's Hugging Face class reads.
EXPECTED_KEYS = {
    "llama-tiny": ("model.layers.0.self_attn.q_proj", ["lora_A.weight", "lora_B.weight"]),
    "mpt-tiny": ("transformer.blocks.0.attn.Wqkv", ["lora_A.weight", "lora_B.weight"]),
    "t5-tiny": ("encoder.block.0.layer.0.SelfAttention.q", ["lora_A.weight", "lora_B.weight"]),
    "bert-tiny": ("encoder.layer.0.attention.self.query", ["lora_A.weight", "lora_B.weight"]),
}


@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_the_peft_key_names_of_each_family(name):
    model = adapted(name, "lora")
    config, tensors = peft_adapter(model, 0, base_model_name_or_path="base")
    module, suffixes = EXPECTED_KEYS[name]
    for s in suffixes:
        assert f"base_model.model.{module}.{s}" in tensors
    assert module in config["target_modules"] and config["peft_type"] == "LORA"
    assert config["task_type"] == {"llama-tiny": "CAUSAL_LM", "mpt-tiny": "CAUSAL_LM", "t5-tiny": "SEQ_2_SEQ_LM",
                                   "bert-tiny": "FEATURE_EXTRACTION"}[name]
    _, prefixed = peft_adapter(model, 0, prefix="bert.") if name == "bert-tiny" else (None, {})
    assert not prefixed or f"base_model.model.bert.{module}.lora_A.weight" in prefixed
    dora, dt = peft_adapter(adapted(name, "dora"), 0)
    assert dora["use_dora"] and f"base_model.model.{module}.lora_magnitude_vector" in dt


def test_mpt_row_blocks_become_one_block_diagonal_wqkv_lora():
    model = adapted("mpt-tiny", "lora")
    _, tensors = peft_adapter(model, 1)
    A = tensors["base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight"]
    B = tensors["base_model.model.transformer.blocks.0.attn.Wqkv.lora_B.weight"]
    fused = model.transformer.blocks[0].attn.Wqkv
    C = fused.in_features
    assert A.shape == (24, C) and B.shape == (3 * C, 24)
    for i, b in enumerate(fused.row_blocks()):
        a = b.adapter
        torch.testing.assert_close(A[8 * i:8 * (i + 1)], a.lora_A.detach(), rtol=0, atol=0)
        torch.testing.assert_close(B[b.start:b.stop, 8 * i:8 * (i + 1)], 2.0 * a.lora_B.detach(), rtol=0, atol=0)
        assert not B[b.start:b.stop].abs().sum() - B[b.start:b.stop, 8 * i:8 * (i + 1)].abs().sum()   # zero elsewhere


@pytest.mark.parametrize("variant", ["lora", "dora", "more"])
def test_import_of_export_is_the_identity(variant, tmp_path):
    model = adapted("llama-tiny", variant)
    export_peft(model, 2, tmp_path / "a")
    plain = copy.deepcopy(fixture("llama-tiny"))
    load_peft_adapter(plain, tmp_path / "a")
    export_peft(plain, 0, tmp_path / "b")
    first, second = load_file(str(tmp_path / "a" / PEFT_WEIGHTS)), load_file(str(tmp_path / "b" / PEFT_WEIGHTS))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "a" / PEFT_CONFIG).read_text()) == json.loads((tmp_path / "b" / PEFT_CONFIG).read_text())
    save_adapters(plain, tmp_path / "mtlref")                   # the imported adapters save and load as mtlref's
    again = copy.deepcopy(fixture("llama-tiny"))
    load_adapters(again, tmp_path / "mtlref")
    with torch.no_grad():
        assert torch.equal(run("llama-tiny", again, None)[0], run("llama-tiny", plain, None)[0])


def test_peft_rank_patterns_and_rslora_are_read(tmp_path):
    """A peft adapter written by hand: rank 4 with alpha 8, one module of rank 2 (rank_pattern)
    with alpha 6 (alpha_pattern), then rsLoRA: ΔW = (α/r or α/√r) B A."""
    base = fixture("llama-tiny")
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    g = torch.Generator().manual_seed(3)
    shapes = {q: (4, base.model.layers[0].self_attn.q_proj), v: (2, base.model.layers[1].self_attn.v_proj)}
    tensors = {}
    for n, (k, slot) in shapes.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(k, slot.in_features, generator=g)
        tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(slot.out_features, k, generator=g)
    save_file(tensors, str(tmp_path / PEFT_WEIGHTS))
    for rslora in (False, True):
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.v_proj": 2},
                  "alpha_pattern": {"v_proj": 6}, "target_modules": ["q_proj", "v_proj"], "use_rslora": rslora}
        (tmp_path / PEFT_CONFIG).write_text(json.dumps(config))
        model = copy.deepcopy(base)
        load_peft_adapter(model, tmp_path)
        merged = merge_adapters(model, 0)
        for n, (k, slot) in shapes.items():
            alpha = 8 if n == q else 6
            scale = alpha / (k ** 0.5 if rslora else k)
            want = slot.weight + scale * tensors[f"base_model.model.{n}.lora_B.weight"] @ \
                tensors[f"base_model.model.{n}.lora_A.weight"]
            got = dict(merged.named_modules())[n].weight
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny", "bert-tiny", "mpt-tiny"])
def test_a_merged_checkpoint_reloads_and_equals_merge_adapters(name, tmp_path):
    model = adapted(name, "mtl-lora")
    export_merged(model, 1, tmp_path / "one", FIXTURES / name)
    export_merged(model, 1, tmp_path / "sharded", FIXTURES / name, max_shard_bytes=20_000)
    want = merge_adapters(model, 1).state_dict()
    for d in ("one", "sharded"):
        loaded = load_model(tmp_path / d)
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "one" / "config.json").read_text()) == \
        json.loads((FIXTURES / name / "config.json").read_text())


def test_what_cannot_be_exported_says_why(tmp_path):
    model = copy.deepcopy(fixture("llama-tiny"))
    attach_adapters(model, "mixlora", ["q_proj", "gate_proj", "up_proj", "down_proj"], num_tasks=2, num_experts=4)
    with pytest.raises(ValueError, match="routes every token.*--attention-only"):
        peft_adapter(model, 0)
    config, tensors = peft_adapter(model, 0, attention_only=True)
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    per_sample = copy.deepcopy(fixture("llama-tiny"))
    attach_adapters(per_sample, "more", ["q_proj"], num_tasks=2, task_embedding=False)
    with pytest.raises(TypeError, match="per sample"):
        peft_adapter(per_sample, 0)


def test_bad_peft_input_is_one_clear_error(tmp_path):
    model = adapted("llama-tiny", "lora")
    export_peft(model, 0, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory"):
        load_peft_adapter(copy.deepcopy(fixture("llama-tiny")), tmp_path)
    cfg = json.loads((tmp_path / "ok" / PEFT_CONFIG).read_text())
    (tmp_path / "ok" / PEFT_CONFIG).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        load_peft_adapter(copy.deepcopy(fixture("llama-tiny")), tmp_path / "ok")
    (tmp_path / "ok" / PEFT_CONFIG).write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(ValueError, match="rank 4 for .* but its lora_A has 8 rows"):
        load_peft_adapter(copy.deepcopy(fixture("llama-tiny")), tmp_path / "ok")
    (tmp_path / "ok" / PEFT_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is not a projection of this bert model"):
        load_peft_adapter(copy.deepcopy(fixture("bert-tiny")), tmp_path / "ok")
    export_peft(adapted("mpt-tiny", "lora"), 0, tmp_path / "mpt")
    w = load_file(str(tmp_path / "mpt" / PEFT_WEIGHTS))
    renamed = {k.replace("transformer.blocks", "model.layers").replace("attn.Wqkv", "self_attn.q_proj"): v
               for k, v in w.items() if "Wqkv" in k and "blocks.0." in k}
    save_file(renamed, str(tmp_path / "ok" / PEFT_WEIGHTS))
    (tmp_path / "ok" / PEFT_CONFIG).write_text(json.dumps({**cfg, "r": 24, "lora_alpha": 24}))
    with pytest.raises(ValueError, match="trained on another base model"):
        load_peft_adapter(copy.deepcopy(fixture("llama-tiny")), tmp_path / "ok")


def test_every_option_value_is_recorded_and_old_files_load_with_their_defaults(tmp_path):
    """Format 3 records each option's value, defaults included; a format-1 file (options given
    only) loads with format 1's defaults; a format-2 MoRE file (before scale_tasks) loads with the
    value that reproduces it; a file lacking any other option is an error."""
    more = adapted("llama-tiny", "more")
    save_adapters(more, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["format"] == 3 and saved["options"]["scale_tasks"] is None
    two = saved | {"format": 2, "options": {k: v for k, v in saved["options"].items() if k != "scale_tasks"}}
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(two))
    assert load_adapters(copy.deepcopy(fixture("llama-tiny")), tmp_path / "m")["options"] == saved["options"]
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(two | {"format": 3}))
    with pytest.raises(ValueError, match=r"options \['scale_tasks'\] of more are missing"):
        load_adapters(copy.deepcopy(fixture("llama-tiny")), tmp_path / "m")
    model = adapted("llama-tiny", "mtl-lora")
    save_adapters(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["format"] == 3
    assert saved["options"] == {"num_up": 3, "tau": 0.5, "full_lambda": False, "weights_init": "kaiming",
                                "task_lambda": True}
    old = {k: v for k, v in saved.items() if k != "format"} | {"options": {}}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(old))
    fresh = copy.deepcopy(fixture("llama-tiny"))
    options = load_adapters(fresh, tmp_path / "a")["options"]
    assert options["tau"] == 0.5 and options["weights_init"] == "normal"    # format 1: the default of its day
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved | {"options": {"num_up": 3}}))
    with pytest.raises(ValueError, match=r"options \['full_lambda', 'task_lambda', 'tau', 'weights_init'\]"):
        load_adapters(copy.deepcopy(fixture("llama-tiny")), tmp_path / "a")


@pytest.mark.slow
def test_the_cli_exports_every_task_of_a_run_with_its_head(tiny_bert, tiny_tasks, tmp_path):
    from mtlref.commands import export_main, train_main
    from mtlref.export import HEAD_CONFIG, HEAD_WEIGHTS
    run_dir = tmp_path / "run"
    train_main(["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--method",
                        "mtl-lora", "--batch-size", "4", "--max-length", "16", "--max-steps", "2", "--lr", "5e-2",
                        "--out", str(run_dir)])
    written = export_main(["--checkpoint", str(run_dir), "--task", "all", "--out", str(tmp_path / "x")])
    assert [p.name for p in written] == ["sentiment", "pair"]
    heads = load_file(str(run_dir / "adapter.safetensors"))
    for t, p in enumerate(written):
        assert {PEFT_CONFIG, PEFT_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS} <= {f.name for f in p.iterdir()}
        head = load_file(str(p / HEAD_WEIGHTS))
        assert torch.equal(head["weight"], heads[f"heads.{t}.weight"])
        info = json.loads((p / HEAD_CONFIG).read_text())
        assert info["task"] == p.name and info["reads"] == "mean pooling of the encoder output"
    merged = export_main(["--checkpoint", str(run_dir), "--task", "pair", "--format", "merged",
                                  "--out", str(tmp_path / "m")])
    assert (merged[0] / "vocab.txt").is_file() and load_model(merged[0]) is not None
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(run_dir), "--task", "nope", "--out", str(tmp_path / "y")])
