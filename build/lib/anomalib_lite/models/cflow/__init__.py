from anomalib_lite.models.cflow.lightning_model import Cflow
from anomalib_lite.models.cflow.torch_model import CflowModel

__all__ = ["Cflow", "CflowModel"]
