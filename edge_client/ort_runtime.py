"""ONNX Runtime Training behind the edge client's Runtime interface."""

from stamen.edge_client.bundle_runtime import BundleRuntime
from stamen.mobile_bridge.ort_trainer import OrtTrainer


class OrtRuntime(BundleRuntime):
    """Dynamic batch and sequence length; about as fast as eager torch on CPU."""

    name = "ort"
    trainer_class = OrtTrainer
