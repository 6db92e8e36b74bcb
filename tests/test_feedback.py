"""Error feedback: the decoded updates' running sum tracks the true sum (what is missing is
exactly the current residual, which stays bounded), while top-k without feedback drifts; with
a decay the same holds for decayed sums; residuals are kept per plan and survive a save/load."""

from __future__ import annotations

import pytest
import torch

from stamen.compression.codecs import decode, encode
from stamen.compression.feedback import ErrorFeedback
from stamen.core.errors import UserError

SPEC = "topk(0.02)+int4+zstd(1)"


def updates(rounds: int, n: int = 4096, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A persistent direction plus noise, like successive pseudo-gradients of one model."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(1, n, generator=g)
    return [{"w": drift + torch.randn(1, n, generator=g), "b": 0.1 * torch.randn(16, generator=g)}
            for _ in range(rounds)]


def test_feedback_tracks_the_sum_and_plain_topk_drifts():
    n = 2048
    ef = ErrorFeedback()
    true_sum, ef_sum, plain_sum = torch.zeros(1, n), torch.zeros(1, n), torch.zeros(1, n)
    residual_norms, ef_errors = [], []
    for u in updates(300, n):
        ef_out = decode(ef.encode("plan-a", u, SPEC)).tensors
        true_sum += u["w"]
        ef_sum += ef_out["w"]
        plain_sum += decode(encode(u, SPEC)).tensors["w"]
        residual = ef.residuals["plan-a"]
        # What the server is missing is exactly the client's residual, every round.
        assert torch.allclose(ef_sum + residual["w"], true_sum, rtol=1e-5, atol=1e-3)
        residual_norms.append(float(residual["w"].norm()))
        ef_errors.append(float((ef_sum - true_sum).norm() / true_sum.norm()))
    assert max(residual_norms[150:]) < 1.1 * max(residual_norms[:150])  # bounded, not growing
    assert ef_errors[-1] < 0.1 and ef_errors[-1] < 0.6 * ef_errors[99]  # shrinks like 1/rounds
    assert float((plain_sum - true_sum).norm() / true_sum.norm()) > 0.8  # most mass lost for good


def test_decayed_feedback_keeps_the_decayed_sums_equal():
    """SparseLoCo's e ← β·e + Δ: the β-decayed running sum of what the server decoded plus the
    residual is exactly the β-decayed running sum of the true updates, every round (sums kept
    here in float64, independently of the codec), and the residual stays bounded."""
    beta, spec = 0.9, "topk(0.02, chunk=512)+int4+zstd(1)"
    ef = ErrorFeedback(decay=beta)
    true_sum, sent_sum = torch.zeros(1, 2048, dtype=torch.float64), torch.zeros(1, 2048, dtype=torch.float64)
    norms = []
    for u in updates(200, 2048):
        sent = decode(ef.encode("p", u, spec)).tensors["w"]
        true_sum = beta * true_sum + u["w"].double()
        sent_sum = beta * sent_sum + sent.double()
        residual = ef.residuals["p"]["w"].double()
        assert torch.allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-4 * float(true_sum.abs().max()))
        norms.append(float(residual.norm()))
    assert max(norms[100:]) < 1.1 * max(norms[:100])


def test_decay_outside_its_range_is_a_user_error():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match="decay"):
            ErrorFeedback(decay=bad)


def test_residuals_are_per_plan_and_survive_a_restart(tmp_path):
    first, second = ErrorFeedback(), ErrorFeedback()
    stream = updates(6)
    for u in stream[:3]:
        first.encode("aa11", u, SPEC)
        second.encode("aa11", u, SPEC)
        first.encode("bb22", {"w": u["w"][:, :100]}, SPEC)
    assert first.residuals["bb22"]["w"].shape == (1, 100)
    assert torch.equal(first.residuals["aa11"]["w"], second.residuals["aa11"]["w"])
    first.save(tmp_path / "ef.safetensors")
    restored = ErrorFeedback.load(tmp_path / "ef.safetensors")
    assert set(restored.residuals) == {"aa11", "bb22"}
    for u in stream[3:]:
        assert restored.encode("aa11", u, SPEC) == second.encode("aa11", u, SPEC)


def test_lossless_codec_leaves_no_residual():
    ef = ErrorFeedback()
    ef.encode("p", updates(1)[0], "fp32+zstd(1)")
    assert all(float(r.abs().max()) == 0.0 for r in ef.residuals["p"].values())
