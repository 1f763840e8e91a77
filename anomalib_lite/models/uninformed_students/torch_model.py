"""Uninformed Students (Bergmann et al., "Uninformed Students: Student-Teacher Anomaly Detection
with Discriminative Latent Embeddings", CVPR 2020). No official code exists; this follows the paper.

Per patch size p (the paper's multi-scale model: 17, 33, 65): a frozen teacher descriptor network
(`patch_network.PatchDescriptor`, distilled beforehand: `uninformed_students.teacher`) and an
ensemble of M students of the same architecture, randomly initialised, that regress the teacher's
dense descriptors standardised by their mean and std over the training images (eq. 4).

Scoring (eqs. 5-7): at every pixel, with mu_k the students' predictions and t the standardised
teacher descriptor, the regression error e = ||mean_k mu_k - t||^2 and the predictive variance
v = mean_k ||mu_k||^2 - ||mean_k mu_k||^2; both standardised by their mean and std over the pixels
of held-out normal images (the paper: the validation set), added, and averaged over the scales.
Image score: the map's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyOutput,
    CalibratedOnNormalImages,
    PreparedOnTrainingImages,
    TrainableModel,
)
from anomalib_lite.models.uninformed_students.patch_network import PatchDescriptor
from anomalib_lite.schema import Range


def ensemble_error_and_variance(predictions: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """predictions M x B x d x H x W, target B x d x H x W -> (error, variance), each B x H x W.

    error = ||mean_k mu_k - t||^2; variance = mean_k ||mu_k||^2 - ||mean_k mu_k||^2 (eqs. 5, 6),
    i.e. the students' population variance summed over the descriptor's dimensions.
    """
    mean = predictions.mean(dim=0)
    error = (mean - target).pow(2).sum(dim=1)
    variance = predictions.pow(2).sum(dim=2).mean(dim=0) - mean.pow(2).sum(dim=1)
    return error, variance.clamp_min(0)


class UninformedStudentsModel(TrainableModel, PreparedOnTrainingImages, CalibratedOnNormalImages):
    """Teachers and student ensembles for each patch size; see the module docstring.

    `train_crop`: the students' loss is the paper's per-pixel regression error averaged over the
    image; with a size c it is averaged over a random c x c window of each image instead (the same
    objective, sampled), which makes a CPU step several times cheaper. null: the whole image.
    `score_patch_sizes` / `score_students`: score with some of the scales / the first students only
    (all by default): the paper's single-scale and ensemble-size comparisons from one trained model,
    e.g. `experiments/retest.py RUN score_patch_sizes=[65] score_students=1`.
    """

    def __init__(
        self,
        patch_sizes: Sequence[int] = (17, 33, 65),
        num_students: Annotated[int, Range(low=1)] = 3,
        descriptor_dim: Annotated[int, Range(low=1)] = 128,
        train_crop: int | None = None,
        score_patch_sizes: Sequence[int] | None = None,
        score_students: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_sizes = list(patch_sizes)
        unknown = set(score_patch_sizes or ()) - set(self.patch_sizes)
        if unknown:
            raise UserInputError(f"score_patch_sizes {sorted(unknown)} are not among the trained patch_sizes {self.patch_sizes}")
        if score_students is not None and not 1 <= score_students <= num_students:
            raise UserInputError(f"score_students must be between 1 and num_students ({num_students}), got {score_students}")
        self.scored_scales = [self.patch_sizes.index(p) for p in (score_patch_sizes or self.patch_sizes)]
        self.scored_students = score_students or num_students
        self.num_students = num_students
        self.descriptor_dim = descriptor_dim
        self.train_crop = train_crop
        self.teachers = nn.ModuleList(PatchDescriptor(p, descriptor_dim).requires_grad_(False) for p in self.patch_sizes)
        self.students = nn.ModuleList(
            nn.ModuleList(PatchDescriptor(p, descriptor_dim) for _ in range(num_students)) for p in self.patch_sizes
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        scales = len(self.patch_sizes)
        self.register_buffer("teacher_mean", torch.zeros(scales, descriptor_dim))
        self.register_buffer("teacher_std", torch.ones(scales, descriptor_dim))
        # Per scale: (mean, std) of the error and of the variance over held-out normal pixels.
        self.register_buffer("score_statistics", torch.full((scales, 2, 2), float("nan")))

    def train(self, mode: bool = True) -> UninformedStudentsModel:
        super().train(mode)
        self.teachers.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def teacher_descriptors(self, scale: int, padded: torch.Tensor) -> torch.Tensor:
        """Standardised dense teacher descriptors of (already padded) images at one scale."""
        raw = self.teachers[scale].dense(padded, padded=True)
        return (raw - self.teacher_mean[scale].view(1, -1, 1, 1)) / self.teacher_std[scale].view(1, -1, 1, 1)

    # -- teacher standardisation over the training images -------------------------------------------
    @torch.no_grad()
    def preparation_statistics(self, images: torch.Tensor) -> torch.Tensor:
        """B x scales x 2d: per image, the mean of each teacher descriptor dimension and of its square."""
        normalized = self.normalize(images)
        rows = []
        for teacher in self.teachers:
            dense = teacher.dense(normalized).double()
            rows.append(torch.cat([dense.mean(dim=(2, 3)), dense.pow(2).mean(dim=(2, 3))], dim=1))
        return torch.stack(rows, dim=1)

    def prepare(self, statistics: torch.Tensor) -> None:
        mean, square = statistics.mean(dim=0).chunk(2, dim=-1)
        self.teacher_mean.copy_(mean.float())
        self.teacher_std.copy_((square - mean.pow(2)).clamp_min(1e-12).sqrt().float())

    # -- training ------------------------------------------------------------------------------------
    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Sum over scales and students of the mean per-pixel squared error (eq. 4) against the
        standardised teacher, on the whole image or a random `train_crop` window."""
        normalized = self.normalize(images)
        total = images.new_zeros(())
        for scale, teacher in enumerate(self.teachers):
            padded = teacher.pad(normalized)
            if self.train_crop is not None and self.training:
                padded = self._random_window(padded, teacher.patch_size)
            target = self.teacher_descriptors(scale, padded)
            for student in self.students[scale]:
                total = total + (student.dense(padded, padded=True) - target).pow(2).sum(dim=1).mean()
        return total

    def _random_window(self, padded: torch.Tensor, patch_size: int) -> torch.Tensor:
        crop = self.train_crop
        height, width = padded.shape[-2] - patch_size + 1, padded.shape[-1] - patch_size + 1
        if crop >= min(height, width):
            return padded
        top = int(torch.randint(height - crop + 1, ()))
        left = int(torch.randint(width - crop + 1, ()))
        return padded[..., top : top + crop + patch_size - 1, left : left + crop + patch_size - 1]

    # -- scoring ---------------------------------------------------------------------------------------
    def calibration_maps(self, images: torch.Tensor) -> torch.Tensor:
        """B x (2 x scales) x H x W: regression error and predictive variance at every scale."""
        normalized = self.normalize(images)
        maps = []
        for scale in self.scored_scales:
            padded = self.teachers[scale].pad(normalized)
            target = self.teacher_descriptors(scale, padded)
            students = self.students[scale][: self.scored_students]
            predictions = torch.stack([student.dense(padded, padded=True) for student in students])
            maps.extend(ensemble_error_and_variance(predictions, target))
        return torch.stack(maps, dim=1)

    def calibrate(self, maps: torch.Tensor) -> None:
        values = maps.transpose(0, 1).flatten(1).double()  # (2 x scored scales) x pixels
        statistics = torch.stack([values.mean(dim=1), values.std(dim=1)], dim=1).float()
        self.score_statistics[self.scored_scales] = statistics.view(len(self.scored_scales), 2, 2)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        maps = self.calibration_maps(images)
        statistics = self.score_statistics[self.scored_scales].view(-1, 2)
        standardised = (maps - statistics[:, 0].view(1, -1, 1, 1)) / statistics[:, 1].clamp_min(1e-12).view(1, -1, 1, 1)
        maps = torch.where(torch.isnan(statistics).any(), maps, standardised)  # a tensor choice: exported graphs hold it
        anomaly_map = maps.view(-1, len(self.scored_scales), 2, *maps.shape[-2:]).sum(dim=2).mean(dim=1)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
