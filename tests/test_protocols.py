"""The papers' experiments as they run: presets resolve to the published settings, single-task
batches stay single-task through length grouping, T5 trains text-to-text (MoRE Eq. 9), LoRA-ST
trains each task alone, and the run writes the reported step's adapters."""
import argparse
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import DATA, ROOT, need
from mtlref import load_model, load_tokenizer
from mtlref.adapters import adapters_of, count_parameters
from mtlref.data.collate import Encoder, LengthGroupedBatches
from mtlref.data.samplers import MultiTaskSampler
from mtlref.data.tasks import Example, get_spec
from mtlref.data.templates import t5_target
from mtlref.heads import UNPARSED, Seq2SeqLM
from mtlref.layers import ForwardContext
from mtlref.presets import resolve_targets
from mtlref.evaluate import make_evaluator
from mtlref.objective import attach
from mtlref.settings import FLAG_KEYS, settings, step_budget
from mtlref.commands import eval_main, train_main



def flags(preset: str, method: str, single_task: bool = False, option=(), **given) -> argparse.Namespace:
    return argparse.Namespace(preset=preset, method=method, single_task=single_task, option=list(option),
                              **{k: given.get(k) for k in FLAG_KEYS})


# ----------------------------------------------------------------------------- presets
def test_more_glue_is_more_section_5_1_and_appendix_a():
    s = settings(flags("more-glue", "more"), "t5")
    assert (s.sampler, s.batches, s.split) == ("more", "single-task", "paper")
    assert (s.lr, s.warmup_steps, s.epochs, s.batch_size, s.max_length) == (3e-4, 500, 5, 32, 128)
    assert (s.lambda_con, s.options["tau"], s.options["task_dim"]) == (0.1, 0.05, 768)
    assert (s.alpha, s.dropout, s.weight_decay, s.eval_every) == (32, 0.1, 0.01, 1000)   # official code
    assert resolve_targets(s.targets, "t5") == ["q", "k", "v", "o", "wi", "wo"]
    assert settings(flags("more-glue", "multilora"), "t5").options["num_loras"] == 4


def test_mtl_lora_glue_per_method_and_per_family_values():
    s = settings(flags("mtl-lora-glue", "mtl-lora"), "llama")
    assert (s.rank, s.lr, s.options["num_up"], s.options["tau"], s.batch_size) == (8, 2e-4, 3, 0.1, 8)
    assert settings(flags("mtl-lora-glue", "mtl-lora"), "mpt").options["tau"] == 0.5          # A.1: MPT τ 0.5
    assert resolve_targets(s.targets, "mpt") == ["Wqkv.q", "Wqkv.k", "Wqkv.v", "out_proj"]
    st = settings(flags("mtl-lora-glue", "lora", single_task=True), "llama")
    assert (st.rank, st.lr, st.task_epochs) == (8, 4e-4, {"rte": 10, "mrpc": 5})
    assert settings(flags("mtl-lora-glue", "lora"), "llama").rank == 16                         # LoRA-MT


def test_commonsense_lora_and_dora_are_the_dora_papers():
    lora = settings(flags("mtl-lora-commonsense", "lora"), "llama")
    dora = settings(flags("mtl-lora-commonsense", "dora"), "llama")
    for s, rank in ((lora, 32), (dora, 16)):
        assert (s.rank, s.alpha, s.dropout, s.batch_size, s.warmup_steps) == (rank, 2 * rank, 0.05, 16, 100)
        assert s.targets == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert settings(flags("mtl-lora-commonsense", "mtl-lora"), "llama").options["tau"] == 0.8     # Table 7


def test_flags_override_the_preset_and_options_add_to_it():
    s = settings(flags("more-glue", "more", option=["tau=0.2", "official=true"], lr=1e-3, batches="mixed"), "t5")
    assert (s.lr, s.batches, s.options["tau"], s.options["official"]) == (1e-3, "mixed", 0.2, True)
    assert s.options["task_dim"] == 768                     # the preset's other options stay
    with pytest.raises(ValueError, match="KEY=VALUE"):
        settings(flags("cpu", "more", option=["tau"]), "bert")


def test_step_budget_epochs_and_lora_st_task_epochs():
    s = settings(flags("mtl-lora-glue", "lora", single_task=True), "llama")
    assert step_budget(s, {"rte": 2490}, "rte") == (10 * 2490 // 8, 0)        # RTE: 10 epochs of batch 8
    assert step_budget(s, {"mrpc": 3668}, "mrpc") == (5 * 3668 // 8, 0)
    assert step_budget(s, {"cola": 8551}, "cola") == (8551 // 8, 0)           # the others: one epoch
    more = settings(flags("more-glue", "more"), "t5")
    assert step_budget(more, {"a": 1000, "b": 600}) == (5 * 1600 // 32, 500)
    ratio = settings(flags("mtl-lora-commonsense", "moelora"), "llama")       # warm-up 3 % of the steps
    assert step_budget(ratio, {"boolq": 8000}) == (3000, 90)


# ----------------------------------------------------------------------------- batches
class CharTok:
    pad_id, bos_id, eos_id = 0, None, None

    def encode_pair(self, a, b=None, max_length=None):
        ids = [1] + [3 + ord(c) % 50 for c in a] + [2]
        return {"input_ids": ids[:max_length], "token_type_ids": [0] * len(ids[:max_length])}


def corpus():
    g = torch.Generator().manual_seed(0)
    return {t: [Example(t, "x" * int(torch.randint(1, 60, (1,), generator=g)), None, i % 2, f"{t}:{i}")
                for i in range(n)] for t, n in (("a", 90), ("b", 60), ("c", 40))}


@pytest.mark.parametrize("pool", [1, 8])
def test_single_task_batches_survive_length_grouping(pool):
    """Sampler -> grouping -> collate: every batch holds one task, the task mixture is the
    sampler's, and grouping only re-cuts within a task (it cuts the padding too)."""
    data = corpus()
    ids = {"a": 0, "b": 1, "c": 2}

    def batches(p):
        sampler = MultiTaskSampler({t: len(v) for t, v in data.items()}, "more", batch_size=8, seed=4, mixed=False)
        it = iter(LengthGroupedBatches(sampler, Encoder(CharTok(), "bert", 64), data, ids, pool=p, seed=4))
        return [next(it) for _ in range(48)]

    got, plain = batches(pool), batches(1)
    assert all(len(set(b["task_ids"].tolist())) == 1 for b in got), "a batch mixes tasks"
    assert Counter(int(b["task_ids"][0]) for b in got) == Counter(int(b["task_ids"][0]) for b in plain)
    rows = lambda bs: sorted((int(t), tuple(r[m.bool()].tolist()))
                             for b in bs for t, r, m in zip(b["task_ids"], b["input_ids"], b["attention_mask"]))
    assert rows(got) == rows(plain)
    if pool > 1:
        assert sum(b["input_ids"].numel() for b in got) < sum(b["input_ids"].numel() for b in plain)


# ----------------------------------------------------------------------------- T5 text-to-text
def test_t5_text_to_text_batches(t5_real_vocab):
    tok = load_tokenizer(t5_real_vocab)
    enc = Encoder(tok, "t5", 128, text_to_text=True, decoder_start=0)
    cola = Example("cola", "The book was read by me.", None, 1, "x:1")
    stsb = Example("stsb", "A man sings.", "A man is singing.", 3.7, "x:2")
    batch = enc.collate([(0, ("train", 0), cola), (1, ("train", 1), stsb)])
    assert t5_target("stsb", 3.7) == "3.6"                    # T5 rounds the score to 0.2 (ties to even)
    for row, want in ((0, "acceptable"), (1, "3.6")):
        target = tok.encode(want)                             # the label's text + EOS
        n = len(target)
        assert batch["target_ids"][row, :n].tolist() == target and (batch["target_ids"][row, n:] == -100).all()
        assert batch["decoder_input_ids"][row, :n].tolist() == [0] + target[:-1]
        assert batch["decoder_attention_mask"][row].sum() == n
    assert tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist(),
                      skip_special_tokens=True) == "cola sentence: The book was read by me."


def test_seq2seq_loss_is_the_cross_entropy_of_the_targets_and_answers_parse(t5_real_vocab):
    model = load_model(t5_real_vocab)
    tok = load_tokenizer(t5_real_vocab)
    specs = [get_spec("rte"), get_spec("stsb")]
    lm = Seq2SeqLM(model, specs, tok)
    enc = Encoder(tok, "t5", 64, text_to_text=True)
    exs = [Example("rte", "A cat sat.", "A cat is sitting.", 0, "x:1"), Example("rte", "No.", "Yes.", 1, "x:2")]
    batch = enc.collate([(0, ("t", i), e) for i, e in enumerate(exs)])
    logits = lm(batch)
    want = torch.stack([F.cross_entropy(logits[b, : int(m.sum())], batch["target_ids"][b, : int(m.sum())],
                                        reduction="sum") for b, m in enumerate(batch["decoder_attention_mask"])])
    torch.testing.assert_close(lm.loss(logits, batch), want.sum() / batch["decoder_attention_mask"].sum())
    assert lm.max_new_tokens == [max(len(tok.encode(w)) for w in ("entailment", "not_entailment")),
                                 max(len(tok.encode(f"{v / 5:.1f}")) for v in range(26))]
    preds = lm.predict_batch(batch)                           # a random model: mostly no label at all
    assert all(p in (0.0, 1.0, UNPARSED) for p in preds.tolist())


def test_unparsed_answers_count_as_wrong_and_are_reported():
    class Fixed(Seq2SeqLM):                                   # answers fixed predictions
        def __init__(self, answers):
            torch.nn.Module.__init__(self)
            self.answers = answers

        def predict_batch(self, batch):
            return torch.tensor([self.answers[i] for i in batch["labels"].long().tolist()])
    # labels double as indices into the answers; MRPC reports F1, whose classes must be 0/1
    exs = [Example("mrpc", f"s{i}", "t", i % 2, f"x:{i}") for i in range(4)]

    class Enc:
        def get(self, key, ex):
            return [1], None

        def collate(self, items):
            return {"input_ids": torch.ones(len(items), 1, dtype=torch.long),
                    "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
                    "task_ids": torch.tensor([t for t, _, _ in items]),
                    "labels": torch.tensor([float(int(ex.source.split(":")[1])) for _, _, ex in items])}
    answers = [UNPARSED, UNPARSED, 0.0, 1.0]                  # gold 0 1 0 1: two unparsed, two right
    res = make_evaluator(Fixed(answers), Enc(), [get_spec("mrpc")], {"mrpc": {"test": exs}}, "test", 8, "cpu")()
    m = res["tasks"]["mrpc"]
    assert m["accuracy"] == 0.5 and m["unparsed"] == 0.5
    # as the wrong class: the unparsed gold 0 is a false positive, the unparsed gold 1 a false negative
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def test_t5_head_objective_adapts_only_the_encoder(t5_real_vocab):
    model = load_model(t5_real_vocab)
    s = settings(flags("more-glue", "lora"), "t5")
    attach(model, "lora", s, 2, "head")
    names = list(adapters_of(model))
    assert names and all(n.startswith("encoder.") for n in names)
    assert count_parameters(model)[0] == sum(a.lora_A.numel() + a.lora_B.numel() for a in adapters_of(model).values())


def test_official_more_on_t5_adds_only_the_encoders_contrastive_loss(t5_real_vocab):
    model = load_model(t5_real_vocab)
    s = settings(flags("more-glue", "more", option=["official=true", "task_dim=none"]), "t5")
    attach(model, "more", s, 2, "gen")
    on = {n.split(".")[0] for n, a in adapters_of(model).items() if a.contrastive}
    assert on == {"encoder"} and any(n.startswith("decoder.") for n in adapters_of(model))


# ----------------------------------------------------------------------------- end to end
def read(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_more_glue_on_a_t5_with_the_real_vocabulary(t5_real_vocab, tmp_path, capsys):
    """The MoRE GLUE protocol end to end on real GLUE: L_gen + λ L_con, Eq. 7 sampling, single-task
    batches, the paper's split; the best validation step is scored on the test sets; every saved
    lora_B has moved; eval.py reprints the same numbers."""
    need(DATA / "glue")
    out = tmp_path / "run"
    m = train_main(["--method", "more", "--preset", "more-glue", "--model", str(t5_real_vocab),
                        "--data-dir", str(DATA), "--max-steps", "6", "--eval-every", "3", "--batch-size", "8",
                        "--max-eval-examples", "12", "--eval-batch-size", "16", "--out", str(out)])
    assert (m["split"], m["objective"]) == ("test", "gen")
    s = m["settings"]
    assert (s["sampler"], s["batches"], s["split"], s["lambda_con"]) == ("more", "single-task", "paper", 0.1)
    assert set(m["tasks"]) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "mnli_mm"}
    assert all(0.0 <= r["unparsed"] <= 1.0 for r in m["tasks"].values())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [3, 6]
    assert all("more_contrastive" in r["loss"] for r in log if "loss" in r)
    assert m["best_step"] == 3                                # ties later on (strict >): the first stays best
    if m["best_step"] != m["steps"]:                          # <out>/ holds the reported (best) step's adapters
        assert (out / "adapter.safetensors").read_bytes() == (out / "best" / "adapter.safetensors").read_bytes()
        last = load_file(str(out / "last" / "adapter.safetensors"))
        assert any(not torch.equal(v, load_file(str(out / "adapter.safetensors"))[k]) for k, v in last.items())
    weights = load_file(str(out / "adapter.safetensors"))
    bs = [v for k, v in weights.items() if k.endswith("lora_B")]
    assert len(bs) == 2 * 6 + 2 * 10 and all(bool(b.abs().sum() > 0) for b in bs)
    assert any(k.startswith("decoder.") and "EncDecAttention" in k for k in weights)   # cross-attention trains
    capsys.readouterr()
    again = eval_main(["--checkpoint", str(out)])
    assert again["tasks"] == m["tasks"] and again["average"] == m["average"]


@pytest.mark.slow
def test_lora_st_trains_each_task_alone(tiny_bert, tiny_tasks, tmp_path):
    """--single-task: each task's adapter and head equal a run on that task alone with the same
    seed (so training one task moves nothing of another), stacked into one per-task LoRA."""
    common = ["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--batch-size", "4",
              "--max-length", "16", "--max-steps", "3", "--method", "lora", "--seed", "5", "--lr", "5e-3"]
    st = train_main(common + ["--single-task", "--out", str(tmp_path / "st")])
    stacked = load_file(str(tmp_path / "st" / "adapter.safetensors"))
    for i, task in enumerate(["sentiment", "pair"]):
        alone = train_main(common + ["--tasks", task, "--out", str(tmp_path / task)])
        single = load_file(str(tmp_path / task / "adapter.safetensors"))
        for k, v in single.items():
            if k.startswith("heads."):
                assert torch.equal(stacked[k.replace("heads.0.", f"heads.{i}.")], v), k
            else:
                assert torch.equal(stacked[k][i], v), k
        assert st["steps"][task] == alone["steps"] == 3
    assert not torch.equal(stacked["encoder.layer.0.attention.self.query.adapter.lora_B"][0],
                           stacked["encoder.layer.0.attention.self.query.adapter.lora_B"][1])
    again = eval_main(["--checkpoint", str(tmp_path / "st")])
    assert again["tasks"] == st["tasks"]
    # --resume once every task has finished: each is loaded, not trained again, and its wall time is
    # counted as the earlier processes' (a resumed grid cell sums both)
    resumed = train_main(common + ["--single-task", "--resume", "--out", str(tmp_path / "st")])
    tasks_wall = sum(json.loads((tmp_path / "st" / "tasks" / t / "metrics.json").read_text())["wall_s"]
                     for t in ("sentiment", "pair"))
    assert resumed["tasks"] == st["tasks"] and st["wall_s_before_resume"] == 0
    assert resumed["wall_s_before_resume"] == round(tasks_wall, 1)


def test_eq10_lambda_and_the_balance_weight_reach_the_loop(tiny_bert, tiny_tasks, tmp_path, monkeypatch):
    import mtlref.run
    seen = []
    real_fit = mtlref.run.fit
    monkeypatch.setattr(mtlref.run, "fit", lambda model, batches, cfg, **kw: (seen.append(cfg), real_fit(
        model, batches, cfg, **kw))[1])
    base = ["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--batch-size", "4",
            "--max-length", "16", "--max-steps", "1"]
    train_main(base + ["--method", "more", "--out", str(tmp_path / "a")])
    train_main(base + ["--method", "mixlora", "--lambda-con", "0.3", "--balance-weight", "0.002",
                           "--out", str(tmp_path / "b")])
    assert seen[0].aux_weights == {"more_contrastive": 0.1, "mixlora_balance": 0.01}    # MoRE §5.1, MixLoRA
    assert seen[1].aux_weights == {"more_contrastive": 0.3, "mixlora_balance": 0.002}


@pytest.mark.parametrize("options,objective", [((), "gen"), (("official=true", "task_dim=none"), "gen"),
                                               ((), "head")])
def test_every_tensor_counted_as_trainable_gets_a_gradient(t5_real_vocab, options, objective):
    """What metrics.json counts as trainable is what trains: T5 text-to-text adapts both stacks,
    T5 heads only the encoder, MoRE's official mode freezes its gate."""
    from mtlref.objective import build_model
    from mtlref.train import LoopConfig, train_step
    model = load_model(t5_real_vocab)
    tok = load_tokenizer(t5_real_vocab)
    s = settings(flags("more-glue", "more", option=options, objective=objective), "t5")
    specs = [get_spec("rte"), get_spec("cola")]
    attach(model, "more", s, 2, objective)
    with torch.no_grad():                                   # B != 0, so every A receives a gradient too
        for a in adapters_of(model).values():
            a.lora_B.normal_()
    lm = build_model(model, tok, specs, objective).train()
    enc = Encoder(tok, "t5", 64, text_to_text=objective == "gen")
    batch = enc.collate([(0, ("t", 0), Example("rte", "A b.", "C d.", 0, "x:1")),
                         (1, ("t", 1), Example("cola", "It is.", None, 1, "x:2"))])
    loss, parts = train_step(lm, batch, LoopConfig(max_steps=1))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for _, p in trainable), \
        [n for n, p in trainable if p.grad is None or not bool(p.grad.abs().sum() > 0)][:5]
    assert count_parameters(model)[0] == sum(p.numel() for _, p in trainable)
    assert any(n.startswith("decoder.") for n, _ in trainable) == (objective == "gen")
    gates = [p for n, p in model.named_parameters() if ".gate." in n]
    assert all(p.requires_grad != ("official=true" in options) for p in gates)


def test_no_script_imports_another_script():
    """train.py, eval.py, bench.py and the library import the library, never a script: the run's
    assembly lives in mtlref/run.py."""
    import ast
    scripts = {"train", "eval", "bench", "export"}
    for path in [ROOT / "train.py", ROOT / "eval.py", ROOT / "bench.py", *sorted((ROOT / "mtlref").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not scripts & {n.split(".")[0] for n in names}, f"{path.name} imports a script: {names}"


def test_the_clis_shorten_openmps_spin_before_torch_starts():
    """train.py and eval.py set GOMP_SPINCOUNT (a short spin: the fair share on a shared machine,
    docs/BENCHMARKS.md) before their first `import torch`; a user's own value wins."""
    import ast
    for script in ("train.py", "eval.py"):
        body = ast.parse((ROOT / script).read_text()).body
        lines = [ast.unparse(node) for node in body]
        spin = next(i for i, text in enumerate(lines) if "GOMP_SPINCOUNT" in text)
        first_torch = next(i for i, text in enumerate(lines) if text.startswith("import torch") or "from mtlref" in text)
        assert spin < first_torch and "setdefault" in lines[spin], script


def test_a_run_records_its_threads_precision_and_device(tiny_bert, tiny_tasks, tmp_path):
    m = train_main(["--bench", "jsonl", "--jsonl", str(tiny_tasks), "--model", str(tiny_bert), "--max-steps", "1",
                        "--batch-size", "4", "--max-length", "16", "--out", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["threads"] == m["threads"] == torch.get_num_threads()
    assert saved["openmp"]["GOMP_SPINCOUNT"] == __import__("os").environ.get("GOMP_SPINCOUNT")   # as the run found it
    assert (saved["precision"], saved["device"]) == ("auto", "cpu")             # what the arithmetic ran in
