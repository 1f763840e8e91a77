from anomalib_lite.models.vae.lightning_model import Vae
from anomalib_lite.models.vae.torch_model import VaeModel

__all__ = ["Vae", "VaeModel"]
