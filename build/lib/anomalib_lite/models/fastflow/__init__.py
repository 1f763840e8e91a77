from anomalib_lite.models.fastflow.lightning_model import Fastflow
from anomalib_lite.models.fastflow.torch_model import FastflowModel

__all__ = ["Fastflow", "FastflowModel"]
