"""Exact k-nearest-neighbour search against a memory bank in bounded memory."""

from __future__ import annotations

import torch

from anomalib_lite.models.components.tracing import batch_chunks


@torch.no_grad()
def nearest_neighbors(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of the `k` nearest bank rows of every query row (N x k each).

    Neighbours are ranked by |q|^2 - 2 q.b + |b|^2 without the constant |q|^2: one matrix product
    per `chunk_size` x `chunk_size` block (the `addmm` adds |b|^2 as it writes the block) and a
    running minimum (or top-k) over the bank blocks; only the k survivors' distances are computed,
    directly as |q - b|. Peak memory is O(chunk_size^2 + chunk_size * k * D) whatever the bank size.
    The time is that of the matrix products (torch.cdist would also take a square root of every
    entry of the full distance matrix).
    """
    if k > bank.shape[0]:
        raise ValueError(f"k={k} exceeds the memory bank size {bank.shape[0]}")
    bank_norms = bank.pow(2).sum(dim=1)
    all_distances, all_indices = [], []
    # Traced or exported, the number of queries is the input's (any batch): one block of them; the
    # loop over the bank (a constant) stays.
    for query in batch_chunks(queries, chunk_size):
        best = None
        for b_start in range(0, bank.shape[0], chunk_size):
            block = torch.addmm(bank_norms[b_start : b_start + chunk_size], query, bank[b_start : b_start + chunk_size].T, alpha=-2)
            best = _merge_nearest(best, _nearest_in_block(block, k, b_start), k)
        best_i = best[1]
        # The expanded square picks the neighbours; their distances are computed directly, since
        # |q|^2 - 2 q.b + |b|^2 cancels to rounding noise when q and b are close (tiny features).
        all_distances.append(torch.linalg.vector_norm(query.unsqueeze(1) - bank[best_i], dim=2))
        all_indices.append(best_i)
    return torch.cat(all_distances), torch.cat(all_indices)


@torch.no_grad()
def batched_nearest_neighbors(
    queries: torch.Tensor, banks: torch.Tensor, k: int = 1, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_neighbors` for B query sets, each against its own bank: B x N x D queries and
    B x M x D banks -> B x N x k distances and indices into each bank. The same ranking (the
    expanded square, `chunk_size` bank rows at a time) and the same direct distances; peak memory
    O(B * N * chunk_size)."""
    if k > banks.shape[1]:
        raise ValueError(f"k={k} exceeds the memory bank size {banks.shape[1]}")
    bank_norms = banks.pow(2).sum(dim=2)
    best = None
    for b_start in range(0, banks.shape[1], chunk_size):
        block_bank = banks[:, b_start : b_start + chunk_size]
        block = torch.baddbmm(bank_norms[:, None, b_start : b_start + chunk_size], queries, block_bank.transpose(1, 2), alpha=-2)
        best = _merge_nearest(best, _nearest_in_block(block, k, b_start), k)
    best_i = best[1]
    gathered = banks.gather(1, best_i.flatten(1).unsqueeze(-1).expand(-1, -1, banks.shape[-1]))
    neighbours = gathered.unflatten(1, best_i.shape[1:])  # B x N x k x D
    return torch.linalg.vector_norm(queries.unsqueeze(2) - neighbours, dim=3), best_i


def _nearest_in_block(block: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of a block of ranking scores, with their bank indices."""
    if k == 1:
        values, indices = block.min(dim=-1, keepdim=True)
    else:
        values, indices = block.topk(min(k, block.shape[-1]), dim=-1, largest=False)
    return values, indices + offset


def _merge_nearest(
    best: tuple[torch.Tensor, torch.Tensor] | None, block: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running k best of the bank blocks seen so far, merged with a new block's."""
    if best is None:
        return block
    (best_d, best_i), (block_d, block_i) = best, block
    if k == 1:
        closer = block_d < best_d
        return torch.where(closer, block_d, best_d), torch.where(closer, block_i, best_i)
    merged_d, order = torch.cat([best_d, block_d], dim=-1).topk(k, dim=-1, largest=False)
    return merged_d, torch.cat([best_i, block_i], dim=-1).gather(-1, order)
