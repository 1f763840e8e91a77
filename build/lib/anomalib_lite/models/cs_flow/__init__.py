from anomalib_lite.models.cs_flow.lightning_model import CsFlow
from anomalib_lite.models.cs_flow.torch_model import CsFlowModel

__all__ = ["CsFlow", "CsFlowModel"]
