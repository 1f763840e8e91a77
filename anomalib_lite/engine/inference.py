"""A run's whole scoring as one plain module, from raw image to verdict: what export traces."""

from __future__ import annotations

import torch
from torch import nn

from anomalib_lite.data.samples import ImageResize
from anomalib_lite.engine.post_processing import PostProcessor
from anomalib_lite.models.components.interfaces import AnomalyModel

OUTPUT_NAMES = ("pred_score", "anomaly_map", "pred_label", "normalized_map")


class InferenceModel(nn.Module):
    """uint8 B x 3 x H x W RGB images of any size -> (`OUTPUT_NAMES`): image score (B), anomaly
    map (B x h x w at the model's input size, the method's units), verdict (B, bool: score above
    the image threshold) and the map on the heatmaps' [0, 1] scale (0.5 = pixel threshold).

    The steps are the run's: /255, the antialiased bilinear resize and centre crop
    (`ImageResize.resize_batch`; a resize to the same size is exact), the torch model, the
    post-processor fitted on held-out normal images.
    """

    def __init__(self, model: AnomalyModel, resize: ImageResize, post_processor: PostProcessor) -> None:
        super().__init__()
        self.model = model
        self.post_processor = post_processor
        self.resize = resize

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # clamp: as the data sets read files (`ImageResize.to_tensor`).
        pixels = self.resize.resize_batch(images.float() / 255, always_resample=True).clamp(0, 1)
        output = self.model(pixels)
        pred_label, normalized_map = self.post_processor(output.pred_score, output.anomaly_map)
        return output.pred_score, output.anomaly_map, pred_label, normalized_map
