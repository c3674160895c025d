"""The model families strata runs, by the config.json that names them. A new family is its
module in strata/model/models/ (defining FAMILY) and its line in FAMILIES."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from strata.model.family import Family
from strata.model.spec import ModelSpec, UnsupportedModelError

FAMILIES = (  # the module of each, defining FAMILY
    "strata.model.models.llama",
    "strata.model.models.mistral",
    "strata.model.models.qwen2",
    "strata.model.models.qwen3",
    "strata.model.models.phi3",
    "strata.model.models.gemma2",
    "strata.model.models.gemma3",
    "strata.model.models.qwen3_moe",
)


@functools.cache
def families() -> dict[str, Family]:
    """Every family, by each config.json `architectures` entry it takes."""
    out = {}
    for name in FAMILIES:
        family: Family = importlib.import_module(name).FAMILY
        out.update(dict.fromkeys(family.architectures, family))
    return out


def family_of(cfg: dict[str, Any]) -> Family:
    """The family of a parsed config.json: by `architectures`, else by `model_type`; raises
    UnsupportedModelError naming what the config asked for."""
    known = families()
    by_type = {f.model_type: f for f in known.values()}
    for arch in cfg.get("architectures") or []:
        if arch in known:
            return known[arch]
    if not cfg.get("architectures") and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    asked = cfg.get("architectures") or cfg.get("model_type")
    raise UnsupportedModelError(
        f"unsupported architecture {asked!r}; strata supports {sorted(known)}"
    )


def model_spec(cfg: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a parsed config.json, mapped by its family."""
    return family_of(cfg).spec(cfg)
