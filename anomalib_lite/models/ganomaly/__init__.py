from anomalib_lite.models.ganomaly.lightning_model import Ganomaly
from anomalib_lite.models.ganomaly.torch_model import GanomalyModel

__all__ = ["Ganomaly", "GanomalyModel"]
