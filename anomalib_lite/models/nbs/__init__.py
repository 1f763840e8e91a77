from anomalib_lite.models.nbs.lightning_model import Nbs
from anomalib_lite.models.nbs.torch_model import NbsModel

__all__ = ["Nbs", "NbsModel"]
