"""NBS (Chu and Kitani, ECCV 2020): neural batch sampling for semi-supervised anomaly detection.

An autoencoder is trained on patches of normal images; while it trains, the reconstruction loss
of an anomalous pixel fluctuates where a normal pixel's falls. The *loss profile* of a pixel,
its losses after the last `history` updates (a FIFO), is the input of a predictor trained on the
few labelled anomalous images; a policy network, the *neural batch sampler*, chooses where the
autoencoder's next patches come from so as to make the profiles of the labelled anomalies most
separable (REINFORCE, reward = minus the predictor's loss at the end of an episode, after which
the autoencoder starts again from new weights).

The pieces here are the networks and the profile arithmetic; the episode loop (which batches,
which rewards, when the autoencoder is reset) is in `lightning_model.py`.

Scoring without training on the test images. The paper records a test image's profile while
the autoencoder trains, the image passing through it after every update. Here the last
`history` autoencoder states of the last finished episode are kept (`snapshots`, in the
checkpoint), and a test image's profile is its loss under each of them: the same sequence of
losses, the same for every image, without the test set taking part in training.

Fidelity: the paper's full text was not reachable when this was written (only its abstract and
secondary descriptions), so the architectures and several settings are this implementation's,
chosen after a 2025 follow-up by other authors (patches of 64 px, a history of 10 maps, a dilated
convolutional predictor, 9-way moves of a sampling window, an autoencoder reset every 20
updates): see the method's yaml. The sampler here chooses grid cells of the batch's images from a
state map (the cell's current loss, its loss change, how often it was sampled), instead of moving
a window step by step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput, blur_anomaly_map
from anomalib_lite.models.components.autoencoders import ConvAutoencoder
from anomalib_lite.models.components.interfaces import TrainableModel
from anomalib_lite.schema import PositiveInt

LOSS_FLOOR = 1e-6  # profiles are log losses: a floor keeps a perfectly reconstructed pixel finite


def squared_error_map(autoencoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x H x W: the per-pixel squared reconstruction error, averaged over channels."""
    return (autoencoder(images) - images).pow(2).mean(dim=1)


def log_profile(loss_maps: list[torch.Tensor] | torch.Tensor, history: int) -> torch.Tensor:
    """B x `history` x H x W log losses from the newest `history` maps of a FIFO (oldest first).

    A FIFO not yet full is padded by repeating its oldest map, so the predictor always receives
    `history` channels (from the first update of an episode on).
    """
    maps = list(loss_maps) if isinstance(loss_maps, (list, tuple)) else list(loss_maps.unbind(1))
    if not maps:
        raise ValueError("a loss profile needs at least one loss map")
    maps = maps[-history:]
    maps = [maps[0]] * (history - len(maps)) + maps
    return torch.stack(maps, dim=1).clamp_min(LOSS_FLOOR).log()


def balanced_bce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over anomalous and over normal pixels separately, then halved:
    anomalies cover a few percent of the labelled pixels, and plain BCE would learn "normal"."""
    masks = masks.float()
    losses = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    anomalous = masks > 0.5
    terms = [losses[part].mean() for part in (anomalous, ~anomalous) if bool(part.any())]
    return torch.stack(terms).mean()


class LossProfilePredictor(nn.Module):
    """B x history x H x W log-loss profiles -> B x H x W anomaly logits.

    Dilated 3 x 3 convolutions (dilations 1, 2, 4, 8: a 31 px receptive field at full
    resolution), ReLU, then a 1 x 1 convolution; the profile is standardised by a BatchNorm first
    (log losses move as the autoencoder learns).
    """

    def __init__(self, history: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(history)]
        channels = history
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(width, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, profiles: torch.Tensor) -> torch.Tensor:
        return self.body(profiles)[:, 0]


class BatchSamplerPolicy(nn.Module):
    """The neural batch sampler: B x 3 x g x g cell states -> B x g x g logits of drawing a patch
    there. A cell's state: its mean log loss under the current autoencoder, the change of that
    loss since the cell's image was last scored, and how often the episode has sampled it."""

    STATE_CHANNELS = 3

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(self.STATE_CHANNELS, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.body(states)[:, 0]


def draw_cells(logits: torch.Tensor, count: int, excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `count` cells (with replacement) from the softmax over all B x g x g `logits`, never
    from the images `excluded` (B booleans) marks. Returns the cells as K x 3 rows of (image, row,
    column) and the draw's log-probability (a scalar with the policy's gradient)."""
    batch, rows, columns = logits.shape
    if excluded is not None:
        if bool(excluded.all()):
            raise ValueError("every image of the batch is excluded: there is no cell to draw")
        logits = logits.masked_fill(excluded[:, None, None], float("-inf"))
    distribution = torch.distributions.Categorical(logits=logits.flatten())
    choice = distribution.sample((count,))
    cells = torch.stack([choice // (rows * columns), choice // columns % rows, choice % columns], dim=1)
    return cells, distribution.log_prob(choice).sum()


def cell_crops(images: torch.Tensor, cells: torch.Tensor, grid: int, patch_size: int, jitter: torch.Tensor) -> torch.Tensor:
    """K x 3 x P x P patches: for each chosen cell (K x 3 rows of image, row, column), a window of
    `patch_size` centred in the cell, moved by `jitter` (K x 2, in [-0.5, 0.5) cell sides) and
    kept inside the image."""
    height, width = images.shape[-2:]
    if patch_size > min(height, width):
        raise UserInputError(f"method.patch_size={patch_size} is larger than the images ({height} x {width})")
    cell_h, cell_w = height / grid, width / grid
    centre_y = (cells[:, 1].float() + 0.5 + jitter[:, 0]) * cell_h
    centre_x = (cells[:, 2].float() + 0.5 + jitter[:, 1]) * cell_w
    top = (centre_y - patch_size / 2).round().long().clamp(0, height - patch_size)
    left = (centre_x - patch_size / 2).round().long().clamp(0, width - patch_size)
    return torch.stack([
        images[int(b), :, int(y):int(y) + patch_size, int(x):int(x) + patch_size]
        for b, y, x in zip(cells[:, 0].tolist(), top.tolist(), left.tolist())
    ])


class NbsModel(TrainableModel):
    """The patch autoencoder (live and its kept snapshots), the predictor and the sampler.

    `patch_size`: the autoencoder's training patches (fully convolutional: it reconstructs whole
    images at test); `latent_channels`, `width`, `depth`: its `ConvAutoencoder` (a latent map,
    `depth` halvings); `history`: the loss maps in a profile; `grid`: the sampler's cells per
    side; `blur_sigma`: Gaussian blur of the predicted map before the image score (its maximum).
    """

    def __init__(
        self,
        patch_size: PositiveInt = 64,
        latent_channels: PositiveInt = 32,
        width: PositiveInt = 32,
        depth: PositiveInt = 3,
        history: PositiveInt = 10,
        grid: PositiveInt = 8,
        predictor_width: PositiveInt = 32,
        sampler_width: PositiveInt = 16,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if patch_size % 2**depth:
            raise UserInputError(f"method.patch_size={patch_size} must be divisible by 2^depth = {2 ** depth}")
        self.patch_size, self.history, self.grid, self.blur_sigma = patch_size, history, grid, blur_sigma
        self.autoencoder = ConvAutoencoder(patch_size, latent_channels, width=width, depth=depth, flat=False)
        # The scoring autoencoders: the last `history` states of the last finished episode.
        self.snapshots = nn.ModuleList(copy.deepcopy(self.autoencoder) for _ in range(history))
        self.snapshots.requires_grad_(False)
        self.predictor = LossProfilePredictor(history, predictor_width)
        self.sampler = BatchSamplerPolicy(sampler_width)
        self.divisor = 2**depth

    def check_size(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        if height % self.divisor or width % self.divisor:
            raise UserInputError(
                f"NBS reconstructs whole images: their sides ({height} x {width}) must be divisible by {self.divisor} "
                "(2^method.depth); choose dataset.image_size / crop_size accordingly"
            )

    def reset_autoencoder(self) -> None:
        """New random weights (and BatchNorm statistics) for the live autoencoder: a new episode."""
        for module in self.autoencoder.modules():
            if hasattr(module, "reset_parameters") and module is not self.autoencoder:
                module.reset_parameters()
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()

    def keep_snapshots(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Score with these autoencoder states (oldest first; fewer than `history` are padded by
        repeating the oldest, as `log_profile` pads)."""
        if not states:
            raise ValueError("no autoencoder state to keep")
        states = states[-self.history:]
        states = [states[0]] * (self.history - len(states)) + states
        for snapshot, state in zip(self.snapshots, states):
            snapshot.load_state_dict(state)

    def patch_loss(self, patches: torch.Tensor) -> torch.Tensor:
        """The autoencoder's training objective on a batch of patches (mean squared error)."""
        return squared_error_map(self.autoencoder, patches).mean()

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: the live autoencoder's reconstruction error on whole normal images."""
        self.check_size(images)
        return squared_error_map(self.autoencoder, images).mean()

    def profile(self, images: torch.Tensor) -> torch.Tensor:
        """B x history x H x W: the images' log-loss profile under the kept snapshots (eval mode)."""
        self.check_size(images)
        return log_profile([squared_error_map(snapshot.eval(), images) for snapshot in self.snapshots], self.history)

    def cell_log_loss(self, loss_maps: torch.Tensor) -> torch.Tensor:
        """B x g x g: the mean log loss of every sampler cell of B x H x W loss maps."""
        return F.adaptive_avg_pool2d(loss_maps[:, None].clamp_min(LOSS_FLOOR).log(), self.grid)[:, 0]

    @staticmethod
    def cell_states(cell_loss: torch.Tensor, previous: torch.Tensor, visits: torch.Tensor) -> torch.Tensor:
        """B x 3 x g x g sampler states (see `BatchSamplerPolicy`): the cells' mean log loss now,
        minus `previous` (their last one; pass `cell_loss` itself where there is none), and the
        log of 1 + `visits` (B x g x g counts)."""
        return torch.stack([cell_loss, cell_loss - previous, visits.float().log1p()], dim=1)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        # Logits, not probabilities: a sigmoid saturates and would tie the strongest anomalies.
        anomaly_map = blur_anomaly_map(self.predictor(self.profile(images)), self.blur_sigma)
        return AnomalyOutput(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
