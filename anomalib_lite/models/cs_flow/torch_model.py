"""CS-Flow (Rudolph et al., "Fully Convolutional Cross-Scale-Flows for Image-based Defect
Detection", WACV 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, FeatureExtractor, TrainableModel
from anomalib_lite.models.components.flows import gaussian_log_likelihood
from anomalib_lite.models.cs_flow.cross_scale import CrossScaleCoupling
from anomalib_lite.schema import Levels


def cross_scale_flow(
    channels: int, coupling_blocks: int, hidden_channels: int, kernel_sizes: Sequence[int], clamp: float
) -> Ff.GraphINN:
    """Three inputs -> [cross-scale coupling -> fixed random channel permutation per scale] x blocks."""
    inputs = [Ff.InputNode(channels, 1, 1, name=f"scale{i}") for i in range(3)]  # any map size works
    outputs = [node.out0 for node in inputs]
    nodes: list[Ff.Node] = list(inputs)
    for block in range(coupling_blocks):
        coupling = Ff.Node(
            outputs, CrossScaleCoupling,
            {"hidden_channels": hidden_channels, "kernel_size": kernel_sizes[block], "clamp": clamp},
            name=f"coupling{block}",
        )
        nodes.append(coupling)
        outputs = []
        for scale in range(3):
            permute = Ff.Node(
                (coupling, scale), Fm.PermuteRandom, {"seed": 3 * block + scale}, name=f"permute{block}_{scale}"
            )
            nodes.append(permute)
            outputs.append(permute.out0)
    nodes += [Ff.OutputNode(out, name=f"z{i}") for i, out in enumerate(outputs)]
    flow = Ff.GraphINN(nodes)
    # FrEIA's topological sort orders sibling nodes (the three permutations after a coupling) by
    # object hash, so `module_list`, which names the state_dict entries, came out in another
    # order in every construction, and a checkpoint loaded one scale's permutation into another's
    # node. Registered in build order, the names mean the same node every time.
    flow.module_list = nn.ModuleList(node.module for node in nodes if node.module is not None)
    # Checkpoints written before that hold their permutations in arbitrary slots; the permutations
    # are constants of their seeds, so they are restored from the seeds after every load.
    permutations = [(node.module, 3 * block + scale) for node in nodes if node.name.startswith("permute")
                    for block, scale in [map(int, node.name.removeprefix("permute").split("_"))]]
    flow.register_load_state_dict_post_hook(lambda module, keys: _reset_permutations(permutations))
    return flow


def _reset_permutations(permutations: list[tuple[Fm.PermuteRandom, int]]) -> None:
    with torch.no_grad():
        for module, seed in permutations:
            # FrEIA's own draw: np.random.seed(seed); np.random.permutation(channels).
            order = torch.from_numpy(np.random.RandomState(seed).permutation(module.in_channels))
            module.perm.copy_(order)
            module.perm_inv.copy_(torch.argsort(order))


class CsFlowModel(TrainableModel):
    """One flow over the same backbone level seen at three input scales (image, 1/2, 1/4).

    Training maximises the likelihood of all three maps together (per-dimension NLL). The paper
    scores with the squared norm of z (the Gaussian log-density of the outputs, without the
    log-determinant): image score = mean of z^2 over every position of every scale; map = per
    scale the channel mean of z^2, upsampled to the image, averaged over scales.

    `normalize_features` (on by default, as in the config) layer-normalises each input map without
    learnable parameters, as FastFlow does. The paper trains 240 epochs on raw features; with the
    few epochs a CPU affords, raw Lite0 features left the flow far from unit scale and its z^2 map
    was dominated by the image corners (pixel AUROC 0.46 on bottle after 4 epochs; on the tiny
    synthetic set 0.36 raw vs 0.91 normalised after 20 epochs).
    """

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (3,),
        coupling_blocks: int = 4,
        hidden_channels: int = 1024,
        kernel_sizes: Sequence[int] = (3, 3, 3, 5),
        clamp: float = 3.0,
        normalize_features: bool = True,
    ) -> None:
        super().__init__()
        self.normalize_features = normalize_features
        if len(levels) != 1:
            raise ValueError(f"CS-Flow uses one backbone level (seen at three input scales), got levels={list(levels)}")
        if len(kernel_sizes) != coupling_blocks:
            raise ValueError(f"kernel_sizes needs one entry per coupling block ({coupling_blocks}), got {kernel_sizes}")
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        channels = self.feature_extractor.channels[0]
        self.flow = cross_scale_flow(channels, coupling_blocks, hidden_channels, list(kernel_sizes), clamp)

    def scale_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for factor in (1.0, 0.5, 0.25):
            scaled = images if factor == 1.0 else F.interpolate(
                images, scale_factor=factor, mode="bilinear", align_corners=False, antialias=True
            )
            feature = next(iter(self.feature_extractor(scaled).values()))
            if self.normalize_features:
                feature = F.layer_norm(feature, feature.shape[1:])
            maps.append(feature)
        return maps

    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        z, log_jac_det = self.flow(self.scale_features(images))
        return list(z), log_jac_det

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per dimension (nats), averaged over the batch."""
        z, log_jac_det = self.encode(images)
        flat = torch.cat([zi.flatten(1) for zi in z], dim=1)
        return (-gaussian_log_likelihood(flat, log_jac_det) / flat.shape[1]).mean()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        z, _ = self.encode(images)
        score = torch.cat([zi.pow(2).flatten(1) for zi in z], dim=1).mean(dim=1)
        maps = [
            F.interpolate(zi.pow(2).mean(dim=1, keepdim=True), size=images.shape[-2:], mode="bilinear", align_corners=False)
            for zi in z
        ]
        return AnomalyOutput(score, torch.cat(maps, dim=1).mean(dim=1))
