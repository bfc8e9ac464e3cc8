"""Examples -> token ids -> padded batches that carry per-sample task ids.

How each family reads an example:
- BERT: the sentence pair as `[CLS] a [SEP] b [SEP]` with token types, truncated longest-first.
- T5: the text-to-text input string (templates.t5_input), EOS last, truncated at the end
  but keeping EOS. With text_to_text (MoRE Eq. 9, the T5 protocol) the decoder is trained on
  the label's target text (templates.t5_target) + EOS: decoder_input_ids are the targets
  shifted right after decoder_start_token_id, target_ids carry -100 on padding.
- Unlabelled rows (predict.py's): labels NaN and, for T5, no decoder targets.
- LLaMA / MPT: the MTL-LoRA Table 9 prompt (templates.render) after BOS; a prompt longer
  than max_length keeps its END (where the question and "Answer:" are) and BOS.
- Generation (commonsense, decoders only): BOS + the LLM-Adapters prompt + the response +
  EOS; the loss is on the response and EOS only (target ids -100 on the prompt); a sequence
  longer than max_length keeps its response and the END of the prompt (the question).
Token ids are computed lazily and memoised, so a run tokenises only what it samples.
"""
from __future__ import annotations

import torch

from mtlref.data import templates


class Encoder:
    """text_to_text: T5 with its decoder trained on the target text (needs decoder_start, the
    model's config.decoder_start_token_id); specs: {task: TaskSpec} for users' own tasks, whose
    label names are not in the registry."""

    def __init__(self, tok, family: str, max_length: int, text_to_text: bool = False,
                 decoder_start: int = 0, specs: dict | None = None):
        if text_to_text and family != "t5":
            raise ValueError(f"text-to-text training (--objective gen) is T5's protocol; a {family} model "
                             "trains per-task heads (--objective head)")
        self.tok, self.family, self.max_length = tok, family, max_length
        self.text_to_text, self.decoder_start, self.specs = text_to_text, decoder_start, specs or {}
        self.cache: dict[tuple, tuple[list[int], list[int] | None]] = {}
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0

    def target_ids(self, ex) -> list[int]:
        """The T5 target: the label's text + EOS (T5's tokenizer adds EOS)."""
        spec = self.specs.get(ex.task)
        return self.tok.encode(templates.t5_target(ex.task, ex.label, spec))

    def encode(self, ex) -> tuple[list[int], list[int] | None]:
        """-> (input ids, token types (BERT) | response mask (generation) | target ids (T5
        text-to-text) | None)."""
        L = self.max_length
        if ex.target is not None:
            if self.family not in ("llama", "mpt"):
                raise ValueError(f"{ex.source}: generative tasks ({ex.task}) train a decoder (llama, mpt), "
                                 f"not {self.family}")
            bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
            answer = self.tok.encode(" " + ex.target if self.family == "mpt" else ex.target) + [self.tok.eos_id]
            answer = answer[: L - len(bos) - 1]
            prompt = bos + self.tok.encode(templates.render(ex.task, ex.text, ex.text_pair))[-(L - len(bos) - len(answer)):]
            return prompt + answer, [0] * len(prompt) + [1] * len(answer)
        if self.family == "bert":
            enc = self.tok.encode_pair(ex.text, ex.text_pair, max_length=L)
            return enc["input_ids"], enc["token_type_ids"]
        if self.family == "t5":
            ids = self.tok.encode(templates.t5_input(ex.task, ex.text, ex.text_pair))
            ids = ids if len(ids) <= L else ids[: L - 1] + ids[-1:]
            return ids, (self.target_ids(ex) if self.text_to_text and ex.label is not None else None)
        ids = self.tok.encode(templates.render(ex.task, ex.text, ex.text_pair))
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        keep = L - len(bos)
        return bos + ids[-keep:], None

    def get(self, key: tuple, ex) -> tuple[list[int], list[int] | None]:
        if key not in self.cache:
            self.cache[key] = self.encode(ex)
        return self.cache[key]

    def collate(self, items: list[tuple[int, tuple, object]]) -> dict[str, torch.Tensor]:
        """items: (task_id, key, example) -> right-padded batch; key, e.g. ("train", 17),
        names the example for the token-id memo."""
        encoded = [self.get((t, key), ex) for t, key, ex in items]
        T = max(len(ids) for ids, _ in encoded)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        generative = items[0][2].target is not None
        types = torch.zeros((B, T), dtype=torch.long) if self.family == "bert" or generative else None
        for b, (ids, tt) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
            if types is not None and tt is not None:
                types[b, : len(tt)] = torch.tensor(tt)
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "task_ids": torch.tensor([t for t, _, _ in items], dtype=torch.long)}
        if generative:                                   # next-token targets on the response only
            batch["target_ids"] = torch.where(types.bool(), input_ids, torch.full_like(input_ids, -100))
        else:
            if self.text_to_text and all(tt is not None for _, tt in encoded):   # T5: [start] + target[:-1]
                targets = [tt for _, tt in encoded]
                D = max(len(t) for t in targets)
                dec = torch.full((B, D), self.pad_id, dtype=torch.long)
                tgt = torch.full((B, D), -100, dtype=torch.long)
                dmask = torch.zeros((B, D), dtype=torch.long)
                for b, t in enumerate(targets):
                    dec[b, : len(t)] = torch.tensor([self.decoder_start] + t[:-1])
                    tgt[b, : len(t)] = torch.tensor(t)
                    dmask[b, : len(t)] = 1
                batch.update(decoder_input_ids=dec, decoder_attention_mask=dmask, target_ids=tgt)
            batch["labels"] = torch.tensor([float("nan" if ex.label is None else ex.label) for _, _, ex in items],
                                           dtype=torch.float32)
            if types is not None:
                batch["token_type_ids"] = types
        return batch


def eval_batches(encoder: Encoder, task_id: int, split: str, examples: list, batch_size: int):
    """Single-task batches of one evaluation set, sorted by length (less padding);
    yields (original indices, batch)."""
    # the memo key names the example's own task: mnli_mm shares mnli's task id and head
    key = [(split, ex.task, i) for i, ex in enumerate(examples)]
    order = sorted(range(len(examples)), key=lambda i: len(encoder.get((task_id, key[i]), examples[i])[0]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        yield idx, encoder.collate([(task_id, key[i], examples[i]) for i in idx])


class LengthGroupedBatches:
    """Batches from a MultiTaskSampler with less padding: `pool` consecutive batches are drawn,
    their samples sorted by token length and cut again into `pool` batches, which come out in
    a seeded random order. The task mixture is the sampler's; only who shares a batch changes.
    (A mixed GLUE batch otherwise pads every sentence to its longest RTE/QNLI pair.)
    Single-task batches (sampler.mixed False, MoRE Eq. 8's "a batch where all samples belong
    to the same task") stay single-task: the pool's batches are grouped by their task and
    only the items of one task are sorted and re-cut, into as many batches as it drew.
    State = the sampler's state at the pool's start + how many of its batches were given, so a
    resumed run continues exactly. pool=1 gives the sampler's batches unchanged.
    Data parallel: the sampler draws GLOBAL batches (num_replicas=1) and rank r keeps items
    r, r + num_replicas, ... of each regrouped batch, so N processes see exactly the batches
    that one process with the same global batch sees."""

    def __init__(self, sampler, encoder: Encoder, examples: dict[str, list], task_ids: dict[str, int],
                 pool: int = 8, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.sampler, self.encoder, self.examples, self.ids = sampler, encoder, examples, task_ids
        self.pool, self.seed, self.num_replicas, self.rank = max(1, pool), seed, num_replicas, rank
        self.start, self.given = sampler.state_dict(), 0

    def item(self, task: str, i: int):
        return self.ids[task], ("train", i), self.examples[task][i]

    def __iter__(self):
        it = iter(self.sampler)
        skip, self.given = self.given, 0
        while True:
            self.start = self.sampler.state_dict()
            batches = [next(it) for _ in range(self.pool)]
            groups: dict[str | None, list] = {}              # mixed: one group; else one per task
            for b in batches:
                groups.setdefault(None if self.sampler.mixed else b[0][0], []).append(b)
            size, chunks = len(batches[0]), []
            for group in groups.values():
                items = [self.item(t, i) for b in group for t, i in b]
                if self.pool > 1:
                    items.sort(key=lambda x: len(self.encoder.get((x[0], x[1]), x[2])[0]))
                chunks += [items[k * size:(k + 1) * size] for k in range(len(group))]
            order = torch.randperm(self.pool, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + self.start["batch"])).tolist()
            for j, k in enumerate(order):
                if j < skip:
                    continue
                self.given = j + 1
                yield self.encoder.collate(chunks[k][self.rank::self.num_replicas])
            skip, self.given = 0, 0

    def state_dict(self) -> dict:
        return {"sampler": self.start, "given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.start, self.given = state["sampler"], int(state["given"])
