"""The methods: registry name -> the class that implements it behind the `Adapter` interface
(adapters/base.py). The package face (mtlref.adapters) hands REGISTRY on."""
from __future__ import annotations

from mtlref.adapters.base import Adapter
from mtlref.adapters.dora import DoRA
from mtlref.adapters.hydralora import HydraLoRA
from mtlref.adapters.lora import LoRA
from mtlref.adapters.mixlora import MixLoRA
from mtlref.adapters.moelora import MoELoRA
from mtlref.adapters.moslora import MoSLoRA
from mtlref.adapters.more import MoRE
from mtlref.adapters.mtl_lora import MTLLoRA
from mtlref.adapters.multilora import MultiLoRA
from mtlref.adapters.poly import Poly

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoRA, "dora": DoRA, "multilora": MultiLoRA, "moelora": MoELoRA,
    "mixlora": MixLoRA, "mtl-lora": MTLLoRA, "more": MoRE,
    "hydralora": HydraLoRA, "moslora": MoSLoRA, "poly": Poly,
}
