from anomalib_lite.models.dae.lightning_model import DenoisingAutoencoder
from anomalib_lite.models.dae.torch_model import DenoisingAutoencoderModel

__all__ = ["DenoisingAutoencoder", "DenoisingAutoencoderModel"]
