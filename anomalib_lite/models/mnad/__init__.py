from anomalib_lite.models.mnad.lightning_model import Mnad
from anomalib_lite.models.mnad.torch_model import MnadModel

__all__ = ["Mnad", "MnadModel"]
