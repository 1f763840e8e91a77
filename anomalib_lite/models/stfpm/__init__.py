from anomalib_lite.models.stfpm.lightning_model import Stfpm
from anomalib_lite.models.stfpm.torch_model import StfpmModel

__all__ = ["Stfpm", "StfpmModel"]
