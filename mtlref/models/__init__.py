"""Hand-written backbones: LLaMA, MPT, T5, BERT. Every projection is an AdaptedLinear slot.

FAMILIES maps config.json's model_type to the family's module, each with Config.from_hf, Model
and hf_key (mtlref/pretrained.py loads through it)."""
from mtlref.models import bert, llama, mpt, t5

FAMILIES = {"llama": llama, "mpt": mpt, "t5": t5, "bert": bert}
