from anomalib_lite.models.cpr.lightning_model import Cpr
from anomalib_lite.models.cpr.torch_model import CprModel

__all__ = ["Cpr", "CprModel"]
