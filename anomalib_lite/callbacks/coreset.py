"""Greedy k-center coreset sampling of a filled memory bank (PatchCore and any memory-bank method)."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from anomalib_lite.models.components import greedy_coreset

log = logging.getLogger(__name__)


class CoresetSampling(Callback):
    """After fit's last epoch, keep `coreset_ratio` of the module's memory bank.

    Acts on modules offering `coreset_ratio`, `memory_bank` and `keep_memory_bank_rows`; others
    are left alone. Under DDP every rank holds the gathered bank; rank 0 samples it once (seeded)
    and broadcasts the indices, so every rank ends with the bank a single process would build.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ratio = getattr(pl_module, "coreset_ratio", None)
        if ratio is None or not hasattr(pl_module, "keep_memory_bank_rows") or ratio >= 1:
            return
        bank = pl_module.memory_bank
        k = max(1, round(bank.shape[0] * ratio))
        start = time.perf_counter()
        indices = None
        if trainer.is_global_zero:
            indices = greedy_coreset(
                bank, k, projection_dim=pl_module.coreset_projection_dim, seed=pl_module.coreset_seed,
                progress=trainer.progress_bar_callback is not None,
            ).cpu()
        indices = trainer.strategy.broadcast(indices, src=0)
        pl_module.keep_memory_bank_rows(indices)
        log.info("coreset: kept %d of %d patches in %.1f s", k, bank.shape[0], time.perf_counter() - start)
