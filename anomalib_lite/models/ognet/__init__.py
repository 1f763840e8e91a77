from anomalib_lite.models.ognet.lightning_model import Ognet
from anomalib_lite.models.ognet.torch_model import OgnetModel

__all__ = ["Ognet", "OgnetModel"]
