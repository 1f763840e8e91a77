"""PatchCore as a LightningModule: one pass fills the memory bank, the coreset callback thins it."""

from __future__ import annotations

from typing import Any

import torch

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import MemoryBankModule
from anomalib_lite.models.patchcore.torch_model import PatchcoreModel


class Patchcore(MemoryBankModule):
    """The coreset knobs live here (the callback reads them); `model_args` are PatchcoreModel's
    (levels, embedding_dim, pool_per_level, patch_size, num_neighbors, blur_sigma, nn_chunk_size)."""

    def __init__(
        self,
        backbone: dict,
        coreset_ratio: float = 0.1,
        coreset_projection_dim: int = 128,
        coreset_seed: int = 0,
        **model_args: Any,
    ) -> None:
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise UserInputError(f"method.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.save_hyperparameters()
        self.coreset_ratio = coreset_ratio
        self.coreset_projection_dim = coreset_projection_dim
        self.coreset_seed = coreset_seed
        self.model = PatchcoreModel(backbone=dict(backbone), **model_args)

    # The coreset callback's interface (any memory-bank method with a coreset can offer it).
    @property
    def memory_bank(self) -> torch.Tensor:
        return self.model.memory_bank

    def keep_memory_bank_rows(self, indices: torch.Tensor) -> None:
        self.model.memory_bank = self.model.memory_bank[indices.to(self.model.memory_bank.device)].contiguous()
