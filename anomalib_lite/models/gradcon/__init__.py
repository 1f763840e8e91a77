from anomalib_lite.models.gradcon.lightning_model import GradCon
from anomalib_lite.models.gradcon.torch_model import GradConModel

__all__ = ["GradCon", "GradConModel"]
