"""The sync-vs-async comparison's pieces: the synchronous federation and the target."""

from dataclasses import replace

from stamen.server.config import load_config
from stamen.simulator.compare import TARGET_FRACTION, device_cohort, synchronous, target_loss


def test_synchronous_rounds_hold_every_gpu_node_and_close_at_the_deadline():
    fed = load_config()
    fed = replace(fed, aggregation=replace(fed.aggregation, paced_by=("gpu",)))
    sync = synchronous(fed, 10, gpu_nodes=2)
    assert sync.aggregation.paced_by == ()  # a round counts every update
    a = sync.aggregation
    assert (a.mode, a.buffer_k, a.tau_max, a.max_wait_s, a.min_quorum) == ("rounds", 12, 0, fed.scheduler.task_deadline_s, 1)
    assert sync.tiers == fed.tiers and sync.scheduler == fed.scheduler


def test_target_is_a_fixed_fraction_of_the_async_drop():
    evals = [{"val_loss": 5.0}, {"val_loss": 3.5}, {"val_loss": 3.0}]
    assert TARGET_FRACTION == 0.9
    assert abs(target_loss(evals) - (5.0 - 0.9 * 2.0)) < 1e-12


def test_sync_rounds_take_as_many_devices_as_the_async_versions_merged():
    fed = load_config()
    run = {"flushes": [{"updates": u} for u in (20, 14, 19, 25)]}
    assert device_cohort(fed, run, gpu_nodes=2) == fed.aggregation.buffer_k  # K counts every update
    paced = replace(fed, aggregation=replace(fed.aggregation, buffer_k=2, paced_by=("gpu",)))
    assert device_cohort(paced, run, gpu_nodes=2) == 20 - 2  # the median version's, less the nodes
