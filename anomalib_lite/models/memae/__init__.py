from anomalib_lite.models.memae.lightning_model import MemAE
from anomalib_lite.models.memae.torch_model import MemAEModel

__all__ = ["MemAE", "MemAEModel"]
