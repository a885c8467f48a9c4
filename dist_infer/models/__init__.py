"""Model families: one file per family, found by the HF `model_type` it reads.

A family (models/base.py `Family`) declares three things and nothing outside its
file names its weights or shapes:
- `config_from_hf`: its HF config -> `ModelConfig` (the engine never reads the HF config);
- `weight_rules`: the sharding rule of each HF weight name (`partition` reads them) and
  `layer_sources`/`top_sources`: which checkpoint tensors each engine parameter is built
  from (`build` reads them);
- `decoder_layer`: its stage layer, built from the shared parallel layers (engine/layers.py).

This registry maps model types to the modules that define them; a family module is
imported only when a model of its type is met. A family defined outside dist_infer joins it
in every process (mpirun ranks included) through an entry point of the group
`dist_infer.models` (name: the model type, value: the module), or the environment variable
DIST_INFER_MODELS="type=module,type2=module2"; in one process, `register(type, module)`.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points

# HF model_type -> the module defining its family (its `FAMILY`).
FAMILY_MODULES = {
    "llama": "dist_infer.models.llama",
    "mistral": "dist_infer.models.llama",
    "qwen2": "dist_infer.models.llama",
    "baichuan": "dist_infer.models.baichuan",
    "gpt2": "dist_infer.models.gpt2",
    "gptj": "dist_infer.models.gptj",
    "mixtral": "dist_infer.models.mixtral",
}
BUILT_IN = tuple(FAMILY_MODULES)


def register(model_type: str, module: str) -> None:
    """Add a family defined outside dist_infer (its module must define `FAMILY`)."""
    FAMILY_MODULES[model_type] = module


@functools.cache
def _plugins() -> None:
    """Families from installed packages' entry points and DIST_INFER_MODELS, read once."""
    for ep in entry_points(group="dist_infer.models"):
        FAMILY_MODULES.setdefault(ep.name, ep.value)
    for item in filter(None, os.environ.get("DIST_INFER_MODELS", "").split(",")):
        model_type, _, module = item.partition("=")
        FAMILY_MODULES[model_type.strip()] = module.strip()


def is_supported(model_type: str) -> bool:
    _plugins()
    return model_type in FAMILY_MODULES


def family_of(model_type: str):
    """The `Family` of a HF model type; a clear error for one no family reads."""
    from dist_infer.errors import CheckpointError

    if not is_supported(model_type):
        raise CheckpointError(f"model type {model_type!r} is not supported; dist_infer runs "
                              f"{', '.join(FAMILY_MODULES)} (add a family: README \"Model families\").")
    try:
        return importlib.import_module(FAMILY_MODULES[model_type]).FAMILY
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"the family of model type {model_type!r} ({FAMILY_MODULES[model_type]}) cannot be "
                              f"loaded: {exc}. Check DIST_INFER_MODELS or the package that provides it.") from None
