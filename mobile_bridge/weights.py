"""Checks on the weights a runtime is given, against the bundle's manifest."""

from __future__ import annotations

import torch

from stamen.mobile_bridge.manifest import BundleError, Manifest


def check_weights(manifest: Manifest, weights: dict[str, torch.Tensor]) -> None:
    """The weights must be exactly the plan's kept tensors, in the manifest's shapes: a wrong
    plan's weights would otherwise be written over the wrong bytes."""
    want = {s.name: s.shape for s in manifest.params}
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise BundleError(f"weights do not match the bundle's plan: missing {missing[:3]}, extra {extra[:3]}")
    for name, shape in want.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise BundleError(f"{name}: shape {tuple(weights[name].shape)}, the bundle wants {tuple(shape)}")
