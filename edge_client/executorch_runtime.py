"""ExecuTorch behind the edge client's Runtime interface."""

from stamen.edge_client.bundle_runtime import BundleRuntime
from stamen.mobile_bridge.executorch_trainer import ExecuTorchTrainer


class ExecuTorchRuntime(BundleRuntime):
    """One static batch x seq shape per program (the bundle's ``inputs``)."""

    name = "executorch"
    trainer_class = ExecuTorchTrainer
