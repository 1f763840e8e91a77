"""What one NBS episode remembers between its training steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Episode:
    """The state of the episode under way; a new episode starts from a new `Episode`.

    `history`: how many labelled loss maps (the predictor's profile) and autoencoder states (the
    scoring snapshots) are kept, the most recent last.
    """

    history: int
    grid: int
    steps: int = 0
    log_probs: list[torch.Tensor] = field(default_factory=list)  # the sampler's draws, for REINFORCE
    labelled_maps: list[torch.Tensor] = field(default_factory=list)
    autoencoder_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    visits: dict[int, torch.Tensor] = field(default_factory=dict)  # image index -> g x g draws this episode
    cell_loss: dict[int, torch.Tensor] = field(default_factory=dict)  # image index -> its cells' last loss

    def earlier_cell_loss(self, index: list[int], cell_loss: torch.Tensor) -> torch.Tensor:
        """B x g x g: each image's cell losses when it was last seen (its current ones if never)."""
        return torch.stack([self.cell_loss.get(i, loss) for i, loss in zip(index, cell_loss)])

    def visit_counts(self, index: list[int], device: torch.device) -> torch.Tensor:
        """B x g x g: how often each cell of each image was drawn this episode."""
        return torch.stack([self.visits.get(i, self._zeros(device)) for i in index])

    def record_draws(self, index: list[int], cells: torch.Tensor, device: torch.device) -> None:
        """Count the drawn cells (rows of batch position, row, column)."""
        for b, row, column in cells.tolist():
            self.visits.setdefault(index[b], self._zeros(device))[row, column] += 1

    def remember_losses(self, index: list[int], cell_loss: torch.Tensor) -> None:
        """Each image's current cell losses (B x g x g), for the change the sampler sees next time."""
        for i, loss in zip(index, cell_loss):
            self.cell_loss[i] = loss

    def remember_step(self, labelled_map: torch.Tensor, autoencoder_state: dict[str, torch.Tensor]) -> None:
        """The labelled images' loss maps and the autoencoder's weights after this step."""
        self.labelled_maps = [*self.labelled_maps, labelled_map][-self.history:]
        self.autoencoder_states = [*self.autoencoder_states, autoencoder_state][-self.history:]

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.grid, self.grid, device=device)
