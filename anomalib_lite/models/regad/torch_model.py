"""RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022).

A backbone whose feature levels 1-3 are each followed by a spatial transformer (STN) is trained,
on *other* categories, to register pairs of normal images of one category: a Siamese objective
(SimSiam's symmetric negative cosine with stop-gradient, through an encoder and a predictor of
1x1 convolutions) on the last level's transformed features of a query and the mean of its k
support images (`registration.py`). On a new category nothing is trained: the k support images,
augmented 22-fold, pass through the registration network; their registered features of levels
1-3 (each STN's output warped back to the image frame by the inverse transforms) give one Gaussian
per position (PaDiM's), and a test image is scored by the Mahalanobis distance of its own
registered features, upsampled, blurred (sigma 4); image score = the map's maximum.

Following the authors' code (github.com/MediaBrain-SJTU/RegAD) where the paper is silent: the STN's
localisation network (conv3x3 64 - BN - ReLU - max-pool, conv3x3 16 - BN - ReLU - max-pool, then
FC 1024 - ReLU - FC), its last layer zero with the identity as bias, so every STN starts as the
identity; `stn_mode="rotation_scale"` (the code's default: a rotation angle and two scales on the
diagonal); images not normalised (the code leaves its normalisation commented out;
`normalize_inputs=True` applies the backbone's); all levels' channels kept, covariance + 0.01 I.
The localisation FC reads a pooled map of the size the code hard-codes for 224 px inputs
(14, 7, 4 for levels 1-3), so other input sizes give the same network (adaptive pooling; at 224 px
it is the identity). ResNet-18 in the paper; any timm backbone here.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    MemoryBankModel,
    ResizableBuffersMixin,
    batch_chunks,
    fit_position_gaussians,
    level_stride,
    position_mahalanobis,
    smooth_anomaly_map,
)
from anomalib_lite.schema import Levels

# Parameters each STN mode predicts, and their identity values (the last FC layer's initial bias).
STN_IDENTITY = {
    "affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "translation": (0.0, 0.0),
    "rotation": (0.0,),
    "scale": (1.0, 1.0),
    "shear": (0.0, 0.0),
    "rotation_scale": (0.0, 1.0, 1.0),
    "translation_scale": (0.0, 0.0, 1.0, 1.0),
    "rotation_translation": (0.0, 0.0, 0.0),
    "rotation_translation_scale": (0.0, 0.0, 0.0, 1.0, 1.0),
}

# The support set's augmentations (the authors' test code): small rotations and translations
# (in grid_sample's normalised coordinates, reflection padding), a flip, greyscale, quarter turns.
SUPPORT_ROTATIONS = tuple(s * math.pi * f for f in (1 / 4, 3 / 16, 1 / 8, 1 / 16) for s in (-1, 1))
SUPPORT_TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
NUM_SUPPORT_VIEWS = 1 + len(SUPPORT_ROTATIONS) + len(SUPPORT_TRANSLATIONS) + 1 + 1 + 3


def affine_matrices(mode: str, parameters: torch.Tensor) -> torch.Tensor:
    """B x n STN parameters -> B x 2 x 3 affine matrices (grid_sample's normalised coordinates).

    As the authors' code builds them: `rotation_scale` puts the scales on the rotation's diagonal
    only ([[s1 cos a, -sin a], [sin a, s2 cos a]]), not a rotation composed with a scaling.
    """
    if mode not in STN_IDENTITY:
        raise ValueError(f"unknown STN mode {mode!r} (choose from: {', '.join(STN_IDENTITY)})")
    if mode == "affine":
        return parameters.view(-1, 2, 3)
    p = parameters
    one, zero = p.new_ones(p.shape[0]), p.new_zeros(p.shape[0])
    a00, a01, a02, a10, a11, a12 = one, zero, zero, zero, one, zero
    if mode.startswith("rotation"):
        cos, sin = torch.cos(p[:, 0]), torch.sin(p[:, 0])
        a00, a01, a10, a11 = cos, -sin, sin, cos
        if mode == "rotation_scale":
            a00, a11 = cos * p[:, 1], cos * p[:, 2]
        elif mode == "rotation_translation":
            a02, a12 = p[:, 1], p[:, 2]
        elif mode == "rotation_translation_scale":
            a02, a12, a00, a11 = p[:, 1], p[:, 2], cos * p[:, 3], cos * p[:, 4]
    elif mode == "translation":
        a02, a12 = p[:, 0], p[:, 1]
    elif mode == "translation_scale":
        a02, a12, a00, a11 = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    elif mode == "scale":
        a00, a11 = p[:, 0], p[:, 1]
    elif mode == "shear":
        a01, a10 = p[:, 0], p[:, 1]
    return torch.stack([torch.stack([a00, a01, a02], 1), torch.stack([a10, a11, a12], 1)], 1)


def warp(features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample B x C x h x w maps through B x 2 x 3 affine matrices (reflection at the borders)."""
    grid = affine_grid(theta, *features.shape[-2:])
    return F.grid_sample(features, grid, padding_mode="reflection", align_corners=False)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, height, width), align_corners=False)` (B x h x w x 2), written
    out with the same operations and bit for bit the same values: OpenVINO has no conversion rule
    for `aten::affine_grid_generator`."""

    def pixel_centres(steps: int) -> torch.Tensor:  # -1 + 1/steps ... 1 - 1/steps
        return torch.linspace(-1, 1, steps, dtype=theta.dtype, device=theta.device) * (steps - 1) / steps

    ones = theta.new_ones(1, 1)
    base = torch.stack(torch.broadcast_tensors(pixel_centres(width)[None, :], pixel_centres(height)[:, None], ones), dim=-1)
    return (base.view(1, -1, 3).expand(theta.shape[0], -1, -1) @ theta.transpose(1, 2)).view(-1, height, width, 2)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse transforms of B x 2 x 3 affine matrices [A | t]: [A^-1 | -A^-1 t], A^-1 as the
    2 x 2 adjugate over the determinant (ONNX has no matrix inverse; the same values as linalg.inv)."""
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    adjugate = torch.stack([torch.stack([d, -b], dim=1), torch.stack([-c, a], dim=1)], dim=1)
    inverse = adjugate / (a * d - b * c)[:, None, None]
    return torch.cat([inverse, -inverse @ theta[:, :, 2:]], dim=2)


def localisation_side(level: int, reference_input: int = 224) -> int:
    """The side of the localisation network's last map for a `reference_input` px image (two
    stride-2 max-pools of the level's map): the FC input size the authors' code hard-codes."""
    side = reference_input // level_stride(level)
    for _ in range(2):
        side = (side + 1) // 2
    return side


class SpatialTransformer(nn.Module):
    """Predicts an affine transform from a feature map and resamples the map with it."""

    def __init__(self, channels: int, level: int, mode: str = "rotation_scale") -> None:
        super().__init__()
        if mode not in STN_IDENTITY:
            raise ValueError(f"unknown STN mode {mode!r} (choose from: {', '.join(STN_IDENTITY)})")
        self.mode = mode
        side = localisation_side(level)
        self.localisation = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(side), nn.Flatten(),
        )
        identity = STN_IDENTITY[mode]
        self.regressor = nn.Sequential(nn.Linear(16 * side * side, 1024), nn.ReLU(), nn.Linear(1024, len(identity)))
        nn.init.zeros_(self.regressor[2].weight)
        with torch.no_grad():
            self.regressor[2].bias.copy_(torch.tensor(identity))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x C x h x w -> (the transformed maps, the B x 2 x 3 transforms)."""
        theta = affine_matrices(self.mode, self.regressor(self.localisation(features)))
        return warp(features, theta.to(features.dtype)), theta


class RegistrationNetwork(nn.Module):
    """The backbone with an STN after each of its feature levels: each transformed map feeds the
    next stage (forward hooks replace the level's output), as in the authors' network."""

    def __init__(self, backbone: dict, levels: Levels = (1, 2, 3), stn_mode: str = "rotation_scale", normalize_inputs: bool = False) -> None:
        super().__init__()
        if not normalize_inputs:
            backbone = {**backbone, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.levels = list(levels)
        self.feature_extractor = FeatureExtractor(levels=self.levels, frozen=False, **backbone)
        self.channels = list(self.feature_extractor.channels)
        self.transformers = nn.ModuleList(
            SpatialTransformer(channels, level, stn_mode) for channels, level in zip(self.channels, self.levels)
        )
        self._thetas: list[torch.Tensor] = []
        network = self.feature_extractor.backbone
        for index, name in enumerate(network.feature_info.module_name()):
            network.get_submodule(name).register_forward_hook(self._transform_hook(index))

    def _transform_hook(self, index: int):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            transformed, theta = self.transformers[index](output)
            self._thetas.append(theta)
            return transformed
        return hook

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """B x 3 x H x W in [0, 1] -> (each level's transformed map, each level's transform)."""
        self._thetas = []
        maps = list(self.feature_extractor(images).values())
        thetas, self._thetas = self._thetas, []
        return maps, thetas

    def registered(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each level's transformed map warped back to the image frame: by the inverse of its own
        transform, then of every earlier level's (the authors' `stn*_output`)."""
        maps, thetas = self(images)
        inverses = [invert_affine(theta.detach().double()).to(maps[0].dtype) for theta in thetas]
        registered = []
        for index, level_map in enumerate(maps):
            level_map = level_map.detach()
            for inverse in reversed(inverses[: index + 1]):
                level_map = warp(level_map, inverse)
            registered.append(level_map)
        return registered


def _conv_bn_relu(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


class RegistrationHead(nn.Module):
    """SimSiam's encoder (three 1x1 convolutions) and predictor (two) on the last level's maps."""

    def __init__(self, in_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_bn_relu(in_channels, channels), *_conv_bn_relu(channels, channels), nn.Conv2d(channels, channels, 1, bias=False)
        )
        self.predictor = nn.Sequential(*_conv_bn_relu(channels, channels), nn.Conv2d(channels, channels, 1, bias=False))

    def loss(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Symmetric negative cosine similarity (per position, averaged), stop-gradient on the targets."""
        z_query, z_support = self.encoder(query), self.encoder(support)
        p_query, p_support = self.predictor(z_query), self.predictor(z_support)
        return -(
            F.cosine_similarity(p_query, z_support.detach(), dim=1).mean()
            + F.cosine_similarity(p_support, z_query.detach(), dim=1).mean()
        ) / 2


class Registration(nn.Module):
    """What is trained on the other categories: the STN backbone and the Siamese head."""

    def __init__(self, backbone: dict, levels: Levels, stn_mode: str, normalize_inputs: bool, head_channels: int) -> None:
        super().__init__()
        self.network = RegistrationNetwork(backbone, levels, stn_mode, normalize_inputs)
        self.head = RegistrationHead(self.network.channels[-1], head_channels)

    def loss(self, queries: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """B queries (B x 3 x H x W) against their k supports each (B x k x 3 x H x W): the
        supports' last-level maps are averaged over k before the head."""
        batch, shots = supports.shape[:2]
        query_map = self.network(queries)[0][-1]
        support_map = self.network(supports.flatten(0, 1))[0][-1]
        support_map = support_map.view(batch, shots, *support_map.shape[1:]).mean(dim=1)
        return self.head.loss(query_map, support_map)


def augment_support(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 22 x 3 x H x W: each image, rotated by +-pi/16 ... +-pi/4, translated
    by +-0.1 and +-0.2 (of the half-size), flipped, greyscale, and turned by 90, 180, 270 degrees."""
    batch = images.shape[0]
    views = [images]
    for angle in SUPPORT_ROTATIONS:
        cos, sin = math.cos(angle), math.sin(angle)
        views.append(warp(images, images.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(batch, 2, 3)))
    for dx, dy in SUPPORT_TRANSLATIONS:
        views.append(warp(images, images.new_tensor([[1.0, 0.0, dx], [0.0, 1.0, dy]]).expand(batch, 2, 3)))
    views.append(kornia.geometry.transform.hflip(images))
    views.append(kornia.color.rgb_to_grayscale(images).expand(-1, 3, -1, -1))
    for degrees in (90.0, 180.0, 270.0):
        angle = images.new_full((batch,), degrees)
        views.append(kornia.geometry.transform.rotate(images, angle, padding_mode="reflection"))
    return torch.stack(views, dim=1)


class RegadModel(ResizableBuffersMixin, MemoryBankModel):
    """The registration network (trained elsewhere, loaded before fitting) and the support set's
    per-position Gaussians.

    `augment_support`: the 22 views of each support image (the authors'); False fits on the
    images as they are. The registration network stays in eval mode here: it is trained only by
    `registration.train_registration`, on other categories.
    """

    resizable_buffers = ("mean", "inv_covariance")

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2, 3),
        stn_mode: str = "rotation_scale",
        normalize_inputs: bool = False,
        head_channels: int = 256,
        augment_support: bool = True,
        covariance_eps: float = 0.01,
        blur_sigma: float = 4.0,
        fit_chunk_size: int = 256,
        embed_chunk_size: int = 32,
    ) -> None:
        super().__init__()
        self.registration = Registration(backbone, levels, stn_mode, normalize_inputs, head_channels)
        self.registration.requires_grad_(False).eval()
        self.augment_support = augment_support
        self.covariance_eps = covariance_eps
        self.blur_sigma = blur_sigma
        self.fit_chunk_size = fit_chunk_size
        self.embed_chunk_size = embed_chunk_size
        self.register_buffer("mean", torch.empty(0))  # d x (h*w)
        self.register_buffer("inv_covariance", torch.empty(0))  # (h*w) x d x d

    def train(self, mode: bool = True) -> RegadModel:
        super().train(mode)
        self.registration.eval()  # fitted and scored with its BatchNorms' running statistics
        return self

    @torch.no_grad()
    def registered_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x d x h x w: the registered levels concatenated at the first level's
        resolution (deeper levels upsampled by nearest, as the authors' `embedding_concat`)."""
        outputs = []
        for chunk in batch_chunks(images, self.embed_chunk_size):
            maps = self.registration.network.registered(chunk)
            size = maps[0].shape[-2:]
            outputs.append(torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest") for m in maps], 1))
        return torch.cat(outputs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Support images -> B x V x d x h x w: the registered features of each image's V views
        (22 with `augment_support`, else 1)."""
        views = augment_support(images) if self.augment_support else images.unsqueeze(1)
        features = self.registered_features(views.flatten(0, 1))
        return features.view(*views.shape[:2], *features.shape[1:])

    def fit(self, embeddings: torch.Tensor) -> None:
        """One Gaussian per position over every view of every support image."""
        samples = embeddings.flatten(0, 1)
        if samples.shape[0] < 2:
            raise ValueError("RegAD needs at least 2 support views to estimate a covariance (set method.augment_support=true)")
        self.mean, self.inv_covariance = fit_position_gaussians(samples, self.covariance_eps, self.fit_chunk_size)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.mean.numel() == 0:
            raise RuntimeError("RegAD is not fitted: fit it on a support set before inference")
        distance_map = position_mahalanobis(self.registered_features(images), self.mean, self.inv_covariance)
        anomaly_map = smooth_anomaly_map(distance_map, images.shape[-2:], self.blur_sigma)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
