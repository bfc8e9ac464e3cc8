"""The run's model around the backbone: the objective (per-task heads, T5 text-to-text or the LM),
the adapters attached for it, the model that computes its loss, and the encoder that feeds it."""
from __future__ import annotations

from mtlref.adapters import adapters_of, attach_adapters
from mtlref.data.collate import Encoder
from mtlref.heads import CausalLM, MultiTaskModel, Seq2SeqLM, family
from mtlref.presets import resolve_targets
from mtlref.settings import Settings


def objective_of(s: Settings, fam: str, bench: str) -> str:
    """'lm' (commonsense: the LM answers), 'gen' (T5 text-to-text, MoRE Eq. 9: the default for T5)
    or 'head' (per-task heads: decoders as MTL-LoRA, BERT; T5 with --objective head)."""
    if bench == "commonsense":
        return "lm"
    if s.objective == "auto":
        return "gen" if fam == "t5" else "head"
    if s.objective == "gen" and fam != "t5":
        raise ValueError(f"--objective gen is T5's text-to-text protocol; a {fam} model trains per-task heads "
                         "(--objective head)")
    return s.objective


def attach(backbone, method: str, s: Settings, num_tasks: int, objective: str, meta_ok: bool = False) -> list[str]:
    """Attach the run's adapters; returns the targets. With T5 per-task heads only the encoder
    runs, so adapters go only where a gradient reaches them (the encoder). meta_ok: the base
    is on the meta device, for counting only (mtlref/params.py)."""
    fam = family(backbone)
    targets = resolve_targets(s.targets, fam)
    within = "encoder" if fam == "t5" and objective == "head" else None
    attach_adapters(backbone, method, targets, num_tasks=num_tasks, rank=s.rank, alpha=s.alpha,
                    dropout=s.dropout or 0.0, within=within, meta_ok=meta_ok, **s.options)
    for name, adapter in adapters_of(backbone).items():   # a method's family-specific mode (Adapter hook):
        adapter.configure_for(fam, objective, name)       # MoRE official on T5: the encoder's L_con only
    return targets


def build_model(backbone, tok, specs, objective: str, pooling: str = "mean"):
    if objective == "lm":
        return CausalLM(backbone)
    if objective == "gen":
        return Seq2SeqLM(backbone, specs, tok)
    return MultiTaskModel(backbone, specs, tok, pooling=pooling)


def compile_backbone(model) -> None:
    """--compile: torch.compile the backbone with its adapters, in place (nn.Module.compile: the
    parameters, state_dict keys and checkpoints stay the eager module's). Stays eager: the per-task
    heads (a data-dependent loop over the tasks of a batch, and tiny), T5's encoder-only call of the
    head objective (`encode`), generation loops and --merged copies. Sequence lengths vary from batch
    to batch: the first recompile makes the graph dynamic in them (torch's automatic dynamic shapes),
    so a run compiles about twice per mode (train, eval), not once per length. Adapters skip their
    task-id range check inside a compiled graph (the caller checks the ids first)."""
    model.backbone.compile()


def make_encoder(tok, backbone, specs, max_length: int, objective: str) -> Encoder:
    return Encoder(tok, family(backbone), max_length, text_to_text=objective == "gen",
                   decoder_start=getattr(backbone.config, "decoder_start_token_id", 0) or 0,
                   specs={sp.name: sp for sp in specs})
