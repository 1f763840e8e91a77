from anomalib_lite.models.cutpaste.lightning_model import CutPaste
from anomalib_lite.models.cutpaste.torch_model import CutPasteModel

__all__ = ["CutPaste", "CutPasteModel"]
