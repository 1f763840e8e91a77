"""DRAEM's training objective: L2 + SSIM for the reconstruction, focal loss for the segmentation."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def ssim_loss(images: torch.Tensor, targets: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """1 - mean SSIM (Gaussian window, sigma 1.5, data range 1), the DRAEM authors' SSIM loss.

    kornia's `ssim_loss` returns (1 - SSIM) / 2, hence the factor 2. kornia pads the image
    borders by reflection where the authors' code pads with zeros: values differ within half a
    window of the border only.
    """
    return 2 * kornia.losses.ssim_loss(images, targets, window_size=window_size, max_val=1.0, reduction="mean")


def softmax_focal_loss(
    logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Focal loss -(1 - p_t)^gamma log p_t of 2-class logits (B x 2 x H x W) against 0/1 masks, mean.

    With two classes the softmax probability of class 1 is sigmoid(l1 - l0), so this is
    torchvision's sigmoid focal loss on the logit difference. `alpha=None`: no class weighting,
    as the authors' FocalLoss (alpha None; their 1e-5 label smoothing is left out). A number
    weights anomalous pixels by alpha and normal ones by 1 - alpha (kornia's and torchvision's
    convention): anomalib 2.7 passes kornia alpha=1, which gives normal pixels no weight at all (and
    kornia's mean also divides by the two class channels: its term is half of this one).
    """
    if logits.shape[1] != 2:
        raise ValueError(f"expected 2-class logits (B x 2 x H x W), got shape {tuple(logits.shape)}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"focal alpha must be in [0, 1] or None, got {alpha}")
    weight = -1 if alpha is None else alpha  # torchvision: a negative alpha means no weighting
    return sigmoid_focal_loss(logits[:, 1] - logits[:, 0], masks.to(logits), alpha=weight, gamma=gamma, reduction="mean")


class DraemLoss(nn.Module):
    """L2(reconstruction, clean) + (1 - SSIM)(reconstruction, clean) + focal(segmentation, mask), 1:1:1."""

    def __init__(self, ssim_window: int = 11, focal_gamma: float = 2.0, focal_alpha: float | None = None) -> None:
        super().__init__()
        self.ssim_window = ssim_window
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha

    def forward(
        self, reconstruction: torch.Tensor, clean: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = {
            "l2": F.mse_loss(reconstruction, clean),
            "ssim": ssim_loss(reconstruction, clean, self.ssim_window),
            "focal": softmax_focal_loss(logits, masks, self.focal_gamma, self.focal_alpha),
        }
        return {"loss": terms["l2"] + terms["ssim"] + terms["focal"], **terms}
