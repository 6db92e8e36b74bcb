"""stamen: federated training across very unequal hardware.

The public names below are imported on first use, so ``import stamen.mobile_bridge`` (which a
runtime-only device does) never drags in torch model code it must not depend on."""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "GPT": "stamen.core.model",
    "GPTConfig": "stamen.core.model",
    "ModelSpec": "stamen.core.model",
    "PRESETS": "stamen.core.model",
    "TrainConfig": "stamen.core.train",
    "train_steps": "stamen.core.train",
    "load_corpus": "stamen.core.data",
    "partition": "stamen.core.data",
    "UserError": "stamen.core.errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stamen' has no attribute {name!r}")
