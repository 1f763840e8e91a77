from anomalib_lite.models.ae.lightning_model import Autoencoder
from anomalib_lite.models.ae.torch_model import AutoencoderModel

__all__ = ["Autoencoder", "AutoencoderModel"]
