"""Uninformed Students as a LightningModule: the teachers are loaded from their cached
distillations (or distilled first) when fitting starts; the students then train on the normal
images with the framework's loop, and the epoch with the lowest held-out loss is kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.uninformed_students.teacher import load_or_distill_teachers
from anomalib_lite.models.uninformed_students.torch_model import UninformedStudentsModel


class UninformedStudents(TrainedModule):
    """UninformedStudentsModel's arguments (patch_sizes, num_students, descriptor_dim, train_crop)
    and `teacher`: how the teachers are distilled when no cached artefact matches (`images`: a
    folder, or null for procedural textures; `cache_dir`, `steps`, `batch_size`, ...; see
    `uninformed_students.teacher`)."""

    model_class = UninformedStudentsModel
    model: UninformedStudentsModel

    def __init__(self, teacher: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher_settings = dict(teacher)

    def build_model(self, backbone: Mapping[str, Any] | None, **model_args: Any) -> UninformedStudentsModel:
        self.backbone_settings = dict(backbone) if backbone is not None else None  # only for distilling the teachers
        return self.model_class(**model_args)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return  # a fitted model's teachers are in its checkpoint
        if self.backbone_settings is None:
            raise ValueError("Uninformed Students distils its teachers from a backbone: method.backbone is missing")
        load_or_distill_teachers(
            self.model.teachers, self.backbone_settings, self.model.normalize,
            device=self.trainer.strategy.root_device, **self.teacher_settings,
        )
        self.model.teachers.to(self.device)
