"""The peer: the same LoRA training step in transformers + peft (same checkpoint, batch, loss, rank,
alpha and targets), timed beside ours when both libraries happen to be importable. They are never
a dependency of mtlref; the JSON says "peer": null and why when they are absent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from experiments.bench.models import head_for, make_batch, task_loss
from experiments.bench.settings import METHODS, BenchConfig
from mtlref.heads import family
from mtlref.presets import resolve_targets
from mtlref.train import autocast


def peer_lora(cfg: BenchConfig, base) -> tuple[object | None, str]:
    """(a training-step closure for transformers + peft LoRA on the same checkpoint, batch,
    loss, rank, alpha and targets, or None; why). Runs in eval mode: no dropout, as ours."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{' and '.join(missing)} not importable here (never a dependency of mtlref)"
    try:
        return build_peer(cfg, base)
    except Exception as e:                     # a peer that cannot load this checkpoint is reported, not fatal
        return None, f"transformers + peft are importable but failed on {cfg.model}: {type(e).__name__}: {e}"


def build_peer(cfg: BenchConfig, base) -> tuple[object, str]:
    import peft
    import transformers
    fam = family(base)
    auto = {"bert": transformers.AutoModel, "t5": transformers.AutoModelForSeq2SeqLM}.get(
        fam, transformers.AutoModelForCausalLM)
    if Path(cfg.model).is_file():          # random weights: the peer gets ours (the keys are Hugging Face's)
        with torch.device(cfg.device):     # initialised on the device (a 7B init on the CPU takes minutes)
            hf = auto.from_config(transformers.AutoConfig.from_pretrained(cfg.model),
                                  torch_dtype=getattr(torch, cfg.dtype))
        hf.load_state_dict(base.state_dict(), strict=False)         # our values (speed does not depend on them)
    else:
        hf = auto.from_pretrained(cfg.model, torch_dtype=getattr(torch, cfg.dtype)).to(cfg.device)
    lora = METHODS["lora"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=resolve_targets(cfg.targets, fam)))
    hf.eval()
    batch = make_batch(base, cfg.batch_size, cfg.seq_len, cfg.num_tasks, cfg.device, seed=cfg.seed)
    head = head_for(base, cfg)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(cfg.device):
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if fam == "t5":
                kw["decoder_input_ids"] = batch["decoder_input_ids"]
            out = hf(**kw)
        out = out.last_hidden_state if fam == "bert" else out.logits
        task_loss(out, batch, fam, head).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, f"transformers {transformers.__version__} + peft {peft.__version__}"
