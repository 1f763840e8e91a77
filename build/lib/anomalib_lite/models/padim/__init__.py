from anomalib_lite.models.padim.lightning_model import Padim
from anomalib_lite.models.padim.torch_model import PadimModel

__all__ = ["Padim", "PadimModel"]
