"""A run's whole scoring as one plain module, from raw image to verdict: what export traces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self.size = resize.size
        self.crop = resize.crop

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Always resized, even at the run's size (exact there): one graph for every input size.
        pixels = F.interpolate(images.float() / 255, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        pixels = pixels.clamp(0, 1)  # as the data sets read files (`ImageResize.to_tensor`)
        if self.crop:
            top, left = (self.size[0] - self.crop[0]) // 2, (self.size[1] - self.crop[1]) // 2
            pixels = pixels[..., top : top + self.crop[0], left : left + self.crop[1]]
        output = self.model(pixels)
        pred_label, normalized_map = self.post_processor(output.pred_score, output.anomaly_map)
        return output.pred_score, output.anomaly_map, pred_label, normalized_map
