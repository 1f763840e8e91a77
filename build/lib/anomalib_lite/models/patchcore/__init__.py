from anomalib_lite.models.patchcore.lightning_model import Patchcore
from anomalib_lite.models.patchcore.torch_model import PatchcoreModel

__all__ = ["Patchcore", "PatchcoreModel"]
