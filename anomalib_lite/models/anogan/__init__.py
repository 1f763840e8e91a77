from anomalib_lite.models.anogan.lightning_model import AnoGan
from anomalib_lite.models.anogan.torch_model import AnoGanModel

__all__ = ["AnoGan", "AnoGanModel"]
