"""What a method's plain torch model offers the framework: the three kinds of model, as ABCs.

A method's `torch_model.py` subclasses one of them; its LightningModule (`anomalib_lite.engine`)
then only calls these methods, so nothing is found by attribute name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from anomalib_lite.models.components.anomaly_map import AnomalyOutput


class AnomalyModel(nn.Module, ABC):
    """Every method in eval mode: B x 3 x H x W images in [0, 1] -> `AnomalyOutput` (score, map).

    `not_exportable`: why the model's scoring is not one fixed computation an exported graph can
    hold (e.g. a search or gradients at test time), or None: it exports (`anomalib_lite.export`).
    """

    not_exportable: ClassVar[str | None] = None

    @abstractmethod
    def forward(self, images: torch.Tensor) -> AnomalyOutput: ...


# What `embed` returns: one tensor, or named tensors (e.g. a global vector and feature maps of
# several resolutions) that share the first dimension B; `fit` receives the same kind.
Embeddings = torch.Tensor | dict[str, torch.Tensor]


class FittedOnEmbeddings(ABC):
    """Part of the model is fitted to the embeddings of every normal training image (a memory bank,
    Gaussians, a density), in one pass without gradients."""

    # What `fit` found, for the run's metrics.json (e.g. a coreset's size and coverage radius): `fit` sets it.
    fit_report: Mapping[str, float | int] = MappingProxyType({})

    @abstractmethod
    def embed(self, images: torch.Tensor) -> Embeddings:
        """Per-image embeddings (first dimension B), gathered over the whole training set for `fit`."""

    @abstractmethod
    def fit(self, embeddings: Embeddings) -> None:
        """Build the model (memory bank, Gaussians, ...) from every training image's embedding, in dataset order."""


class MemoryBankModel(AnomalyModel, FittedOnEmbeddings):
    """Fitted in one pass, without gradients (PatchCore, PaDiM): embed every training image, then fit."""


class PreparedOnTrainingImages(ABC):
    """A trained model that needs statistics of the training images before its first step (e.g.
    a frozen teacher's per-channel mean and std, which standardise the students' targets): one
    pass over the training images without gradients, in eval mode, before training starts."""

    @abstractmethod
    def preparation_statistics(self, images: torch.Tensor) -> Embeddings:
        """Per-image statistics (first dimension B; one tensor or named tensors), gathered over the
        training set for `prepare`."""

    @abstractmethod
    def prepare(self, statistics: Embeddings) -> None:
        """Set the model's statistics from every training image's, in dataset order."""


class CalibratedOnNormalImages(ABC):
    """A model whose scores are standardised on held-out normal images (never the test set): the
    per-pixel components it combines (e.g. a regression error and an ensemble variance) are put
    on one scale before they are added. Calibrated at the start of every validation, from the
    validation set's normal images, with the weights being validated; the calibration lives in
    buffers, so a checkpoint carries it."""

    @abstractmethod
    def calibration_maps(self, images: torch.Tensor) -> torch.Tensor:
        """B x K x h x w: the K uncalibrated per-pixel components of every image."""

    @abstractmethod
    def calibrate(self, maps: torch.Tensor) -> None:
        """Fit the scales from the components of every held-out normal image (N x K x h x w)."""


class Reconstructs(ABC):
    """A model that scores an image by what it makes of it (autoencoders, GAN generators): its
    reconstruction, for pictures of input | reconstruction | error (`experiments/reconstruction_figure.py`)."""

    @abstractmethod
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W images in [0, 1] -> the model's reconstructions, in [0, 1]."""


class TrainableModel(AnomalyModel):
    """Fitted by gradient descent on normal images.

    A trained model that scores by a density or memory fitted on its own embeddings (CutPaste's
    Gaussian) also subclasses `FittedOnEmbeddings`: it is refitted on the training images before
    every validation, so each epoch is scored (and a checkpoint saved) with its own fit.
    """

    @abstractmethod
    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective on a batch of normal images (also the validation loss), a scalar."""
