"""Per-task heads, MT-DNN style (one head per task over a shared adapted backbone).

- Decoders (LLaMA, MPT): a bias-free linear on the hidden state of the last real token whose
  rows start as the LM head's rows for the label words' first sub-tokens (MTL-LoRA, NLU
  section), so at step 0 the head's logits ARE the LM head's scores of the label words.
- Encoders (BERT, T5's encoder): a linear on the pooled output (mean over real tokens by
  default, as all-MiniLM-L6-v2 was trained; `cls` and BERT's `pooler` are options).
- Regression (STS-B): one output, trained with mean squared error on the 0-5 score.
Seq2SeqLM is T5's own protocol instead of heads (MoRE Eq. 9): the decoder is trained with
cross-entropy on the label's target text and evaluation generates the answer and parses it.
Every head model here answers `predict_batch(batch)` with one float prediction per sample; the
LM (CausalLM, commonsense) answers in text: generate_answers, for eval.py and predict.py alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlref.data.templates import render, t5_label, t5_target
from mtlref.generate import generate
from mtlref.layers import ForwardContext

DECODERS = ("llama", "mpt")


def family(model: nn.Module) -> str:
    """'llama' | 'mpt' | 't5' | 'bert', from the module that defines the model class."""
    return type(model).__module__.rsplit(".", 1)[-1]


def output_embedding(model: nn.Module) -> torch.Tensor:
    """The LM head's weight [V, H] (the input embedding when the head is tied)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head.weight
    fam = family(model)
    if fam == "llama":
        return model.model.embed_tokens.weight
    if fam == "mpt":
        return model.transformer.wte.weight
    raise ValueError(f"a {fam} model has no LM head to initialise label-word heads from")


def label_word_ids(tok, words: list[str]) -> list[int]:
    """First sub-token of each answer word as it follows 'Answer:' (a leading space for
    byte-level BPE; SentencePiece marks the word start itself)."""
    spaced = type(tok).__name__.lower().startswith("bpe") or "bpe" in type(tok).__name__.lower()
    return [tok.encode((" " + w) if spaced else w)[0] for w in words]


class MultiTaskModel(nn.Module):
    """Backbone (with adapters) + one head per task.

    forward(batch, ctx) -> (logits [B, C_max] with -inf beyond each task's classes, or the
    regression score in column 0 for regression tasks).
    """

    def __init__(self, backbone: nn.Module, tasks: list, tok=None, pooling: str = "mean"):
        super().__init__()
        self.backbone = backbone
        self.family = family(backbone)
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.num_outputs = [t.num_labels for t in tasks]
        self.regression = [t.kind == "regression" for t in tasks]
        self.pooling = pooling
        hidden = self._hidden_size()
        self.heads = nn.ModuleList()
        for t, n in zip(tasks, self.num_outputs):
            decoder_words = self.family in DECODERS and t.kind != "regression" and getattr(t, "answer_words", None)
            head = nn.Linear(hidden, n, bias=not decoder_words)
            with torch.no_grad():
                if decoder_words:                     # MT-DNN head initialised from the label words
                    ids = label_word_ids(tok, list(t.answer_words))
                    head.weight.copy_(output_embedding(backbone)[ids].float())
                else:
                    nn.init.normal_(head.weight, std=0.02)
                    nn.init.zeros_(head.bias)
            self.heads.append(head)

    def _hidden_size(self) -> int:
        cfg = self.backbone.config
        for name in ("hidden_size", "d_model", "dim"):
            if hasattr(cfg, name):
                return int(getattr(cfg, name))
        raise ValueError(f"cannot read the hidden size from {type(cfg).__name__}")

    def features(self, batch: dict, ctx: ForwardContext) -> torch.Tensor:
        """One vector per sample [B, H] in fp32."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.family in DECODERS:
            h = self.backbone(ids, attention_mask=mask, ctx=ctx, return_hidden=True)
            last = mask.sum(1) - 1                                    # right padding: last real token
            return h[torch.arange(h.shape[0], device=h.device), last].float()
        if self.family == "t5":
            h = self.backbone.encode(ids, attention_mask=mask, ctx=ctx)
        else:
            h = self.backbone(ids, attention_mask=mask, token_type_ids=batch.get("token_type_ids"), ctx=ctx)
            if self.pooling == "pooler":
                return self.backbone.pool(h, ctx).float()
        if self.pooling == "cls":
            return h[:, 0].float()
        m = mask.unsqueeze(-1).to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp_min(1)).float()

    def forward(self, batch: dict, ctx: ForwardContext | None = None) -> torch.Tensor:
        task_ids = batch["task_ids"]
        ctx = ctx if ctx is not None else ForwardContext(task_ids=task_ids)
        feats = self.features(batch, ctx)
        out = feats.new_full((feats.shape[0], max(self.num_outputs)), float("-inf"))
        for t in task_ids.unique().tolist():                        # heads are tiny; tasks ≤ a few
            rows = (task_ids == t).nonzero(as_tuple=True)[0]
            out[rows, : self.num_outputs[t]] = self.heads[t](feats[rows]).to(out.dtype)   # bf16 under autocast
        return out

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean over samples of cross-entropy (classification) or squared error (regression)."""
        task_ids, labels = batch["task_ids"], batch["labels"]
        is_reg = torch.tensor(self.regression, device=out.device)[task_ids]
        per = torch.zeros_like(labels, dtype=torch.float32)
        if (~is_reg).any():
            rows = ~is_reg
            per[rows] = F.cross_entropy(out[rows], labels[rows].long(), reduction="none")
        if is_reg.any():
            per[is_reg] = (out[is_reg, 0] - labels[is_reg].float()) ** 2
        return per.mean()

    def predict(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        """Class index, or the regression score, per sample (float)."""
        is_reg = torch.tensor(self.regression, device=out.device)[batch["task_ids"]]
        return torch.where(is_reg, out[:, 0], out.argmax(-1).float())

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return self.predict(self(batch).float(), batch)


UNPARSED = -1.0     # what a text-to-text answer that is no label becomes (templates.t5_label)


class Seq2SeqLM(nn.Module):
    """T5 text-to-text over several tasks (MoRE Eq. 9, L_gen = -Σ_t y_t log ŷ_t): the encoder reads
    the task-prefixed input, the decoder is trained with cross-entropy on the label's target text
    + EOS (mean over the target tokens of the batch, as T5ForConditionalGeneration's loss), and
    predict_batch generates greedily and parses the text back to a label id or a score;
    an answer that is no label gives UNPARSED (-1), which is never a gold label."""

    def __init__(self, backbone: nn.Module, tasks: list, tok):
        super().__init__()
        self.backbone, self.tok, self.tasks = backbone, tok, list(tasks)
        self.task_names = [t.name for t in tasks]
        # the longest target of each task, in tokens with EOS: how far generation has to go
        self.max_new_tokens = [max(len(tok.encode(t5_target(t.name, y, t))) for y in self._targets(t)) for t in tasks]

    @staticmethod
    def _targets(spec) -> list:
        if spec.kind == "regression":                  # T5's STS-B targets: 0.0, 0.2, ..., 5.0
            return [float(v) for v in np.round(np.arange(0, 26) * 0.2, 1)]
        return list(range(len(spec.labels)))

    def forward(self, batch: dict, ctx: ForwardContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else ForwardContext(task_ids=batch["task_ids"])
        return self.backbone(batch["input_ids"], attention_mask=batch["attention_mask"],
                             decoder_input_ids=batch["decoder_input_ids"],
                             decoder_attention_mask=batch["decoder_attention_mask"], ctx=ctx)   # (B, D, V)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate_answers(self, batch: dict) -> list[str]:
        """Greedy answers, one string per sample. A batch may mix tasks: it generates up to the
        longest limit of its tasks and cuts each row at its own task's, so a row's answer is the
        one a single-task batch gives it (greedy rows do not depend on each other)."""
        task_ids = batch["task_ids"].tolist()
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        outs = generate(self.backbone, self.tok, prompts, max_new_tokens=max(self.max_new_tokens[t] for t in task_ids),
                        task_ids=batch["task_ids"])
        return [self.tok.decode(o[: self.max_new_tokens[t]], skip_special_tokens=True) for o, t in zip(outs, task_ids)]

    def predict_batch(self, batch: dict) -> torch.Tensor:
        """The greedy answers parsed: label id, score, or UNPARSED."""
        preds = [t5_label(self.tasks[t].name, answer, self.tasks[t])
                 for t, answer in zip(batch["task_ids"].tolist(), self.generate_answers(batch))]
        return torch.tensor([float(p) for p in preds], device=batch["input_ids"].device)


class CausalLM(nn.Module):
    """Commonsense reasoning as LLM-Adapters trains it: the LM head answers, and the loss is
    next-token cross-entropy on the response tokens (target_ids, -100 elsewhere)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict, ctx: ForwardContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else ForwardContext(task_ids=batch["task_ids"])
        return self.backbone(batch["input_ids"], attention_mask=batch["attention_mask"], ctx=ctx)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits at position i predict token i+1
        return F.cross_entropy(out[:, :-1].flatten(0, 1), batch["target_ids"][:, 1:].flatten(), ignore_index=-100)


def generate_answers(backbone, tok, examples: list, task_ids: list[int], max_new_tokens: int = 32,
                     temperature: float = 0.0, top_k=None, top_p=None, generator=None) -> list[str]:
    """A decoder's answers to LLM-Adapters' prompts (commonsense): BOS + the prompt, keeping its
    end where it is longer than the model's positions leave room for with max_new_tokens."""
    device = next(backbone.parameters()).device
    bos = [tok.bos_id] if tok.bos_id is not None else []
    limit = getattr(backbone, "max_positions", None)
    keep = None if limit is None else limit - max_new_tokens - len(bos)        # a long prompt keeps its end
    prompts = [bos + tok.encode(render(ex.task, ex.text, ex.text_pair))[-keep if keep else 0:] for ex in examples]
    outs = generate(backbone, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, generator=generator, task_ids=torch.tensor(task_ids, dtype=torch.long, device=device))
    return [tok.decode(o) for o in outs]
