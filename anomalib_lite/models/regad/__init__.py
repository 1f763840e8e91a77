from anomalib_lite.models.regad.lightning_model import Regad
from anomalib_lite.models.regad.torch_model import RegadModel

__all__ = ["Regad", "RegadModel"]
