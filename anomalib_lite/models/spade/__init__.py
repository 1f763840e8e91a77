from anomalib_lite.models.spade.lightning_model import Spade
from anomalib_lite.models.spade.torch_model import SpadeModel

__all__ = ["Spade", "SpadeModel"]
