"""Exact k-nearest-neighbour search against a memory bank in bounded memory."""

from __future__ import annotations

import torch


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
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        query_blocks = [queries]
    else:
        query_blocks = [queries[start : start + chunk_size] for start in range(0, queries.shape[0], chunk_size)]
    for query in query_blocks:
        best_d = best_i = None
        for b_start in range(0, bank.shape[0], chunk_size):
            block = torch.addmm(bank_norms[b_start : b_start + chunk_size], query, bank[b_start : b_start + chunk_size].T, alpha=-2)
            if k == 1:
                block_d, block_i = block.min(dim=1, keepdim=True)
            else:
                block_d, block_i = block.topk(min(k, block.shape[1]), dim=1, largest=False)
            block_i += b_start
            if best_d is None:
                best_d, best_i = block_d, block_i
            elif k == 1:
                closer = block_d < best_d
                best_d, best_i = torch.where(closer, block_d, best_d), torch.where(closer, block_i, best_i)
            else:
                merged_d, order = torch.cat([best_d, block_d], dim=1).topk(k, dim=1, largest=False)
                best_d, best_i = merged_d, torch.cat([best_i, block_i], dim=1).gather(1, order)
        # The expanded square picks the neighbours; their distances are computed directly, since
        # |q|^2 - 2 q.b + |b|^2 cancels to rounding noise when q and b are close (tiny features).
        all_distances.append(torch.linalg.vector_norm(query.unsqueeze(1) - bank[best_i], dim=2))
        all_indices.append(best_i)
    return torch.cat(all_distances), torch.cat(all_indices)
