"""mtlref: a plain, exact reference implementation of multi-task low-rank adaptation
(MTL-LoRA, MoRE) and the baselines they compare against."""

from mtlref.adapters import attach_adapters, count_parameters, load_adapters, merge_adapters, save_adapters
from mtlref.pretrained import load_model
from mtlref.generate import generate
from mtlref.predict import load_run
from mtlref.tokenizer import load_tokenizer

__all__ = ["load_model", "load_tokenizer", "generate", "attach_adapters", "count_parameters",
           "merge_adapters", "save_adapters", "load_adapters", "load_run"]
