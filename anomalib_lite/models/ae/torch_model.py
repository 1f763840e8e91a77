"""Convolutional autoencoder: reconstruct normal images, score the reconstruction error.

The network is the DCGAN-style encoder-decoder of `components.autoencoders` with a latent vector
(Bergmann et al., VISAPP 2019, "Improving unsupervised defect segmentation by applying structural
similarity to autoencoders": a 100-dimensional latent from an 8 x 8 bottom at 128 px). The map is
the per-pixel squared error (`error: l2`), or 1 - SSIM (`error: ssim`, their SSIM-AE, which also
trains on the SSIM loss); the image score its maximum or mean.
"""

from __future__ import annotations

from anomalib_lite.models.components.reconstruction import ConvAutoencoderModel


class AutoencoderModel(ConvAutoencoderModel):
    """Trained to reproduce the normal images themselves (`ConvAutoencoderModel`'s arguments)."""
