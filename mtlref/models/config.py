"""What every family's Config.from_hf shares: checking config.json's keys."""
from __future__ import annotations

import warnings


def check_config_keys(cfg: dict, required, read, ignored, name: str, module: str) -> None:
    """config.json must give `required`; a key neither read nor listed as ignored is warned
    about, never silently dropped (keys starting with "_", such as _name_or_path, are the hub's
    bookkeeping). name: "a LLaMA", "an MPT"; module: the family's file."""
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config.json: missing {missing}; {name} config.json must give them")
    unknown = sorted(k for k in set(cfg) - set(read) - set(ignored) if not k.startswith("_"))   # _name_or_path ...
    if unknown:
        warnings.warn(f"config.json keys {unknown} are not used by mtlref's {name.split()[-1]}; if one changes the "
                      f"model, support it in mtlref/models/{module}.py (else list it in IGNORED_KEYS)")
