"""Denoising autoencoder (Vincent et al., ICML 2008): the autoencoder of `ae`, trained to turn
corrupted normal images back into the clean ones, so that at test time it "repairs" what does not
look normal. Scored like the AE, by the reconstruction error of the (uncorrupted) test image."""

from __future__ import annotations

import torch

from anomalib_lite.models.components.reconstruction import ConvAutoencoderModel, reconstruction_loss


class DenoisingAutoencoderModel(ConvAutoencoderModel):
    """`ConvAutoencoderModel`'s arguments; the corruption is drawn by the LightningModule."""

    def denoising_loss(self, corrupted: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `corrupted` against `clean` (the configured error, mean)."""
        return reconstruction_loss(clean, self.reconstruct(corrupted), self.error, self.ssim_window)
