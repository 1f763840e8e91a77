from anomalib_lite.models.efficient_ad.lightning_model import EfficientAd
from anomalib_lite.models.efficient_ad.torch_model import EfficientAdModel

__all__ = ["EfficientAd", "EfficientAdModel"]
