from anomalib_lite.models.ss_flow.lightning_model import SsFlow
from anomalib_lite.models.ss_flow.torch_model import SsFlowModel

__all__ = ["SsFlow", "SsFlowModel"]
