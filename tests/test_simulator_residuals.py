"""The simulator keeps devices' error-feedback residuals on disk between tasks: a device's
uploads are byte for byte those of a residual kept in memory, and the scratch file goes with
``close``."""

import torch

from stamen.compression.feedback import ErrorFeedback
from stamen.simulator.residuals import ResidualStore

SPEC = "topk(0.05)+int8+zstd(3)"


def test_spilled_residuals_give_the_same_uploads_as_kept_ones():
    g = torch.Generator().manual_seed(0)
    store, kept = ResidualStore(), {0: ErrorFeedback(), 1: ErrorFeedback()}
    try:
        assert store.get(0).residuals == {}, "a device that never trained has no residual"
        for round_ in range(4):
            for device in (0, 1):
                delta = {"w": torch.randn(32, 64, generator=g), "b": torch.randn(32, generator=g)}
                plan = "plan-a" if round_ % 2 else "plan-b"  # residuals are kept per plan
                ef = store.get(device)
                spilled = ef.encode(plan, delta, SPEC)
                store.put(device, ef)
                assert spilled == kept[device].encode(plan, delta, SPEC)
        back = store.get(1).residuals
        assert back.keys() == kept[1].residuals.keys() == {"plan-a", "plan-b"}
        for plan, tensors in kept[1].residuals.items():
            assert all(torch.equal(back[plan][n], t) for n, t in tensors.items())
        assert store.path.exists()
    finally:
        store.close()
    assert not store.path.exists()
