"""Exact k-nearest-neighbour search against a memory bank in bounded memory."""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_neighbors(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of the `k` nearest bank rows of every query row.

    The distance matrix is built `chunk_size` x `chunk_size` at a time and merged into a running
    top-k, so peak memory is O(chunk_size^2 + queries * k) whatever the bank size.
    """
    if k > bank.shape[0]:
        raise ValueError(f"k={k} exceeds the memory bank size {bank.shape[0]}")
    all_distances, all_indices = [], []
    for q_start in range(0, queries.shape[0], chunk_size):
        query_chunk = queries[q_start : q_start + chunk_size]
        best_d = torch.full((query_chunk.shape[0], k), float("inf"), device=queries.device)
        best_i = torch.zeros((query_chunk.shape[0], k), dtype=torch.long, device=queries.device)
        for b_start in range(0, bank.shape[0], chunk_size):
            distances = torch.cdist(query_chunk, bank[b_start : b_start + chunk_size])
            chunk_k = min(k, distances.shape[1])
            chunk_d, chunk_i = distances.topk(chunk_k, dim=1, largest=False)
            merged_d = torch.cat([best_d, chunk_d], dim=1)
            merged_i = torch.cat([best_i, chunk_i + b_start], dim=1)
            best_d, order = merged_d.topk(k, dim=1, largest=False)
            best_i = merged_i.gather(1, order)
        all_distances.append(best_d)
        all_indices.append(best_i)
    return torch.cat(all_distances), torch.cat(all_indices)
