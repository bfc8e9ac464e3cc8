"""The adapter methods behind one interface (base.Adapter), one file per method, and the
functions that attach, count, merge, save and load them. This file is the package's face: the
registry and the names the rest of mtlref imports from `mtlref.adapters`.

    REGISTRY                 method name -> class                                   registry.py
    attach_adapters(model, method, targets, num_tasks=1, rank=8, alpha=16, dropout=0.0, **options)
    detach_adapters, adapters_of, slots_of, count_parameters, merge_adapters       attach.py
    save_adapters(model, path, extra_modules=None, extra_config=None)
    load_adapters(model, path, extra_modules=None) -> config dict
    init_adapters_from, transfer_options, adapter_state, copy_strictly             io.py
"""
from mtlref.adapters.attach import (FORMAT, SLOT_TYPES, adapters_of, attach_adapters, count_parameters,
                                    detach_adapters, matches, merge_adapters, require_config, slots_of)
from mtlref.adapters.base import Adapter
from mtlref.adapters.dora import DoRA
from mtlref.adapters.hydralora import HydraLoRA
from mtlref.adapters.io import (CONFIG_FILE, CONFIG_KEYS, WEIGHTS_FILE, adapter_state, copy_strictly,
                                init_adapters_from, load_adapters, recorded_options, save_adapters,
                                transfer_options)
from mtlref.adapters.lora import LoRA
from mtlref.adapters.mixlora import MixLoRA
from mtlref.adapters.moelora import MoELoRA
from mtlref.adapters.moslora import MoSLoRA
from mtlref.adapters.more import MoRE
from mtlref.adapters.mtl_lora import MTLLoRA
from mtlref.adapters.multilora import MultiLoRA
from mtlref.adapters.poly import Poly
from mtlref.adapters.registry import REGISTRY

__all__ = ["REGISTRY", "Adapter", "DoRA", "HydraLoRA", "LoRA", "MixLoRA", "MoELoRA", "MoRE", "MoSLoRA", "MTLLoRA",
           "MultiLoRA", "Poly",
           "FORMAT", "SLOT_TYPES", "adapters_of", "attach_adapters", "count_parameters", "detach_adapters",
           "matches", "merge_adapters", "require_config", "slots_of",
           "CONFIG_FILE", "CONFIG_KEYS", "WEIGHTS_FILE", "adapter_state", "copy_strictly", "init_adapters_from",
           "load_adapters", "recorded_options", "save_adapters", "transfer_options"]
