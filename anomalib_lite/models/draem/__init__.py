from anomalib_lite.models.draem.lightning_model import Draem
from anomalib_lite.models.draem.torch_model import DraemModel

__all__ = ["Draem", "DraemModel"]
