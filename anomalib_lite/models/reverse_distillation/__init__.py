from anomalib_lite.models.reverse_distillation.lightning_model import ReverseDistillation
from anomalib_lite.models.reverse_distillation.torch_model import ReverseDistillationModel

__all__ = ["ReverseDistillation", "ReverseDistillationModel"]
