"""The engine: the LightningModules every method builds on, and what they carry.

`AnomalyModule` (validation fits the post-processor, test returns `AnomalyOutput`s),
`MemoryBankModule` (one pass, no optimiser), `TrainedModule` / `SynthesisTrainedModule`
(optimisers from the config, best epoch by a label-free signal); `PostProcessor` (thresholds and
colour scale); `PredictionCollector` (a loop's predictions, gathered over DDP ranks);
`PassTracker` (the seam to the progress display); `DDPStrategy`; `checkpoint` (a run's model
read back as data: `load_model`).
May import: `components`, `data`, `metrics`, `schema`, `errors`, `utils`; never callbacks, train,
predict or a method.
"""

from anomalib_lite.engine.checkpoint import load_model
from anomalib_lite.engine.collector import PredictionCollector
from anomalib_lite.engine.memory_bank import MemoryBankModule
from anomalib_lite.engine.module import VALIDATION_METRICS, AnomalyModule
from anomalib_lite.engine.post_processing import PostProcessor
from anomalib_lite.engine.progress import PassTracker
from anomalib_lite.engine.trained import CHECKPOINT_DIR, SynthesisTrainedModule, TrainedModule

__all__ = [
    "CHECKPOINT_DIR", "VALIDATION_METRICS", "AnomalyModule", "MemoryBankModule", "PassTracker", "PostProcessor",
    "PredictionCollector", "SynthesisTrainedModule", "TrainedModule", "load_model",
]
