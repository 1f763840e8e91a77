from anomalib_lite.models.patch_svdd.lightning_model import PatchSvdd
from anomalib_lite.models.patch_svdd.torch_model import PatchSvddModel

__all__ = ["PatchSvdd", "PatchSvddModel"]
