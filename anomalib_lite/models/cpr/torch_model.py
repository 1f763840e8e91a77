"""CPR (Li et al., "Target before Shooting: Accurate Anomaly Detection and Localization under One
Millisecond via Cascade Patch Retrieval", IEEE TIP 2024).

Anomaly detection as patch retrieval, in cascade:
- **Global retrieval (GRB)**: every image is described by bag-of-words histograms over S x S blocks
  of its first-level backbone features (a k-means codebook of 12 words, fitted on the training
  features); a query retrieves the K = 10 training images whose histograms are closest (KL
  divergence per block, summed over the best 4/5 of the blocks, so a local defect does not
  change the ranking).
- **Local retrieval (LRB)**: a learned metric. Per level, a head (1x1 conv - BN - ReLU, an
  Inception block, 1x1 conv to 384 dims) maps the frozen backbone's features to descriptors; a
  query position is scored by its cosine distance to the nearest descriptor *within an r x r
  region around the same position* of the K retrieved images (r = 3 on the stride-4 level, 1 on
  the stride-8 one); levels summed.
- **Foreground estimation (FEB)**, for objects: a linear discriminant between the image border's
  dominant k-means cluster (background) and the centre's other features (foreground), normalised
  to [0, 1]; the map is multiplied by max(foreground of the query, of its retrieved images).
- Map blurred (sigma 4); image score = sum of its T = 512 largest values (DeSTSeg's).
The LRB is trained (the only trained part) on synthetic anomalies: pairs of a training image with
an anomaly and one of its retrieved images; a contrastive loss pulls the descriptors of the same
normal position together (cosine above 0.8) and pushes apart those of anomalous positions and of
distant positions (cosine below -0.2; the latter, objects only, weighted by their backbone-feature
distance), each hinge cubed.

Everything follows the authors' code (github.com/flyinghu123/CPR) where the paper leaves it open:
the two levels at strides 4 and 8, the foreground band widths (3/80 of the side as background,
the central 2/5 as foreground), the 1 % trimmed min-max of the discriminant, the point counts
(300 positives, negatives, anomaly points per pair), the photometric jitter of both images (salt
and pepper, lightness). Deviations: the point coordinates address pixel centres (the code's
x / (W - 1) puts the first pixel on the feature map's edge); the training images retrieve among
the others by the same histograms, excluding themselves explicitly (the code drops the first hit,
which is the image itself); foreground bands are at least one feature row wide (the code's
`int(3/80 h)` is 0, and its slice then takes the whole map, below 27 rows).
The retrieval gallery (the LRB descriptors of every training image) is recomputed from the stored
training images whenever the head has changed, and held in half precision.
"""

from __future__ import annotations

import logging
import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import nn

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    PreparedOnTrainingImages,
    ResizableBuffersMixin,
    TrainableModel,
    batch_chunks,
    blur_anomaly_map,
    level_stride,
)
from anomalib_lite.schema import Levels

log = logging.getLogger(__name__)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """torchvision's Inception `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, eps=0.001),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """Four branches of out/4 channels each: 1x1; 1x1 (in/4) then 3x3; 1x1; 3x3 average pool then 1x1."""

    def __init__(self, in_channels: int = 192, out_channels: int = 256) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"Inception's output channels must be divisible by 4, got {out_channels}")
        quarter = out_channels // 4
        self.branches = nn.ModuleList([
            conv_bn_relu(in_channels, quarter),
            nn.Sequential(conv_bn_relu(in_channels, in_channels // 4), conv_bn_relu(in_channels // 4, quarter, 3)),
            conv_bn_relu(in_channels, quarter),
            nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), conv_bn_relu(in_channels, quarter)),
        ])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(features) for branch in self.branches], dim=1)


class LocalRetrievalHead(nn.Module):
    """The LRB's metric for one level: 1x1 conv (192) - BN - ReLU - Inception (256) - 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int = 384) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, 192, 1), nn.BatchNorm2d(192), nn.ReLU(inplace=True),
            Inception(192, 256), nn.Conv2d(256, out_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def block_histograms(codes: torch.Tensor, grid: int, num_words: int) -> torch.Tensor:
    """B x h x w codeword indices -> B x grid^2 x (num_words + 1): each block's word frequencies.

    Blocks of ceil(side / grid) cells; the excess is padded (split between the two sides) and
    counted as word 0. (The code pads the whole excess on every side, which gives grid x grid
    blocks only for some sizes: 6 x 6 at 16 cells.)
    """
    height, width = codes.shape[-2:]
    block = (math.ceil(height / grid), math.ceil(width / grid))
    excess_h, excess_w = block[0] * grid - height, block[1] * grid - width
    padded = F.pad(codes + 1, (excess_w // 2, excess_w - excess_w // 2, excess_h // 2, excess_h - excess_h // 2))
    words = F.unfold(padded.unsqueeze(1).float(), kernel_size=block, stride=block).long()
    return F.one_hot(words, num_words + 1).float().mean(dim=1)  # B x blocks x words


def histogram_distances(query: torch.Tensor, bank: torch.Tensor, keep: float = 0.8) -> torch.Tensor:
    """B x blocks x words and N x blocks x words -> B x N: KL(query || bank) per block, summed over
    the `keep` fraction of blocks that match best."""
    query, bank = query[:, None] + 1e-8, bank[None] + 1e-8
    per_block = (query * torch.log(query / bank)).sum(-1)  # B x N x blocks
    kept = int(per_block.shape[-1] * keep)
    return per_block.sort(dim=-1).values[..., :kept].sum(-1)


def region_min_distance(query: torch.Tensor, gallery: torch.Tensor, neighbours: torch.Tensor, region: int) -> torch.Tensor:
    """Cosine distance of each query position to its nearest descriptor within a region x region
    window around the same position in its K retrieved gallery images.

    query B x C x h x w and gallery N x C x h x w, both L2-normalised; neighbours B x K gallery
    indices -> B x h x w. Window positions outside the map do not count (the code divides their
    distance by ~0). One image at a time when run: a batch's K gallery maps in float would be
    gigabytes; traced or exported, the whole batch at once (`batch_chunks`).
    """
    chunks = zip(batch_chunks(query, 1), batch_chunks(neighbours, 1))
    return torch.cat([_windowed_min_distance(images, gallery[indices], region) for images, indices in chunks])


def _windowed_min_distance(query: torch.Tensor, retrieved: torch.Tensor, region: int) -> torch.Tensor:
    """B x C x h x w query and its B x K x C x h x w retrieved maps -> B x h x w (`region_min_distance`)."""
    batch, _, height, width = query.shape
    radius = region // 2
    inside = F.pad(query.new_ones(height, width), (radius, radius, radius, radius)) > 0
    padded = F.pad(retrieved.float(), (radius, radius, radius, radius))  # B x K x C x (h + 2r) x (w + 2r)
    best = query.new_full((batch, height, width), float("inf"))
    for dy in range(region):
        for dx in range(region):
            window = padded[..., dy : dy + height, dx : dx + width]
            distance = 1 - torch.einsum("bchw,bkchw->bkhw", query.float(), window).amax(dim=1)
            best = torch.where(inside[dy : dy + height, dx : dx + width], torch.minimum(best, distance), best)
    return best


def trimmed_min_max(values: torch.Tensor, ratio: float = 0.01) -> tuple[float, float]:
    """The code's `FMinMaxScaler`: the k-th smallest and k-th largest value, k = ratio * n."""
    k = max(1, int(values.numel() * ratio))
    flat = values.flatten()
    return float(flat.kthvalue(k).values), float(flat.kthvalue(flat.numel() - k + 1).values)


def fit_foreground_discriminant(
    features: torch.Tensor, seed: int = 66, kmeans_samples: int = 50000, lda_samples: int = 15000,
    background_band: float = 3 / 80, foreground_half: float = 1 / 5,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FEB from N x C x h x w training features -> (C weights, bias): foreground = clamp(x . w + b, 0, 1).

    Two k-means clusters; the one most frequent in the border band is the background; an LDA
    separates that cluster's border features from the other cluster's features in the central
    square; its decision values are min-max normalised (1 % trimmed). None when either side has
    no features (e.g. images without a distinct background)."""
    count, channels, height, width = features.shape
    rng = np.random.RandomState(seed)
    flat = features.permute(0, 2, 3, 1).reshape(-1, channels).double().cpu().numpy()
    kmeans = KMeans(2, n_init=10, random_state=rng).fit(flat[rng.permutation(len(flat))[:kmeans_samples]])
    codes = kmeans.predict(flat).reshape(count, height, width)
    band_h, band_w = max(1, int(background_band * height)), max(1, int(background_band * width))
    border = np.ones((height, width), dtype=bool)
    border[band_h:-band_h, band_w:-band_w] = False
    centre = np.zeros((height, width), dtype=bool)
    top, left = int(height / 2 - height * foreground_half), int(width / 2 - width * foreground_half)
    centre[max(top, 0) : int(height / 2 + height * foreground_half), max(left, 0) : int(width / 2 + width * foreground_half)] = True
    background_word = np.bincount(codes[:, border].flatten(), minlength=2).argmax()
    background = flat[((codes == background_word) & border).flatten()]
    foreground = flat[((codes != background_word) & centre).flatten()]
    samples = min(lda_samples, len(background), len(foreground))
    if samples < 2:
        return None
    data = np.concatenate([background[rng.permutation(len(background))[:samples]], foreground[rng.permutation(len(foreground))[:samples]]])
    labels = np.concatenate([np.zeros(samples, dtype=int), np.ones(samples, dtype=int)])
    lda = LinearDiscriminantAnalysis().fit(data, labels)
    low, high = trimmed_min_max(torch.from_numpy(lda.decision_function(flat)))
    scale = max(high - low, 1e-12)
    return torch.from_numpy(lda.coef_[0] / scale).float(), torch.tensor((lda.intercept_[0] - low) / scale).float()


def sampling_weights(foreground: torch.Tensor) -> torch.Tensor:
    """The code's weights for drawing positive points from foreground maps (N x h x w): blurred
    (sigma = h / 25, scipy's Gaussian filter) and sharpened by 1 / (1 + exp(5 - 10 x))."""
    sigma = foreground.shape[-2] / 25
    blurred = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in foreground.double().cpu().numpy()])
    return torch.from_numpy(1 / (1 + np.exp(5 - 10 * blurred))).float()


def photometric_jitter(images: torch.Tensor, generator: torch.Generator, probability: float = 0.3) -> torch.Tensor:
    """The code's training augmentation of both images of a pair, each with `probability`: salt and
    pepper noise (a U(0, 3 %) share of pixels set to white or black) and the HLS lightness scaled
    by U(0.9, 1.1)."""
    output = images.clone()
    batch, _, height, width = images.shape
    for index in range(batch):
        if torch.rand((), generator=generator) < probability:
            share = (1 - 0.97) * torch.rand((), generator=generator)
            draw = torch.rand(height, width, generator=generator).to(images.device)
            output[index, :, draw < share / 2] = 1.0
            output[index, :, (draw >= share / 2) & (draw < share)] = 0.0
        if torch.rand((), generator=generator) < probability:
            factor = 1 + 0.1 * (2 * torch.rand((), generator=generator) - 1)
            hls = kornia.color.rgb_to_hls(output[index : index + 1])
            hls[:, 1] = (hls[:, 1] * factor.to(images)).clamp(0, 1)
            output[index : index + 1] = kornia.color.hls_to_rgb(hls).clamp(0, 1)
    return output


class ContrastiveRetrievalLoss(nn.Module):
    """The code's loss on sampled point pairs: sum over the points of
    (max(0, p_alpha - cos) w)^e for positives and (max(0, cos - n_alpha) w)^e for negatives, each
    divided by its number of points with w > 0."""

    def __init__(self, positive_margin: float = 0.8, negative_margin: float = -0.2, exponent: int = 3) -> None:
        super().__init__()
        self.positive_margin, self.negative_margin, self.exponent = positive_margin, negative_margin, exponent

    def forward(
        self, positive_cosines: torch.Tensor, positive_weights: torch.Tensor,
        negative_cosines: torch.Tensor, negative_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positive = ((self.positive_margin - positive_cosines).clamp(min=0) * positive_weights).pow(self.exponent)
        negative = ((negative_cosines - self.negative_margin).clamp(min=0) * negative_weights).pow(self.exponent)
        return (
            positive.sum() / (positive_weights > 0).sum().clamp(min=1),
            negative.sum() / (negative_weights > 0).sum().clamp(min=1),
        )


def sample_at(features: torch.Tensor, points: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """B x C x h x w features at B x P x 2 pixel coordinates (x, y) of the image -> B x C x P
    (bilinear, at the pixels' centres)."""
    height, width = image_size
    scale = points.new_tensor([2 / width, 2 / height])
    grid = (points + 0.5) * scale - 1
    return F.grid_sample(features.float(), grid[:, :, None], align_corners=False)[..., 0]


class PointPairs:
    """Point pairs (x, y) between a query and its reference image for the loss, per image of a batch.

    positives: normal query pixels and the same pixels of the reference, drawn (by the reference's
    and query's foreground weight, objects only) without replacement; negatives: random query
    pixels against those reference pixels, kept where they lie farther apart than
    `negative_distance`; anomalies: anomalous query pixels and the same pixels of the reference.
    Each kind padded to `count` points with weight 0."""

    def __init__(self, count: int = 300, negative_distance: float = 4 * math.sqrt(2)) -> None:
        self.count = count
        self.negative_distance = negative_distance

    def _pad(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = points[: self.count].float()
        padded = torch.zeros(self.count, 2)
        padded[: len(kept)] = kept
        weights = torch.zeros(self.count)
        weights[: len(kept)] = 1
        return padded, weights

    def __call__(
        self, masks: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """masks B x H x W (the query's anomalies), weights B x H x W or None -> stacked pairs."""
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in (
            "positive", "positive_reference", "positive_weight", "negative", "negative_reference",
            "negative_weight", "anomaly", "anomaly_weight")}
        height, width = masks.shape[-2:]
        grid = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy"), -1).view(-1, 2)
        for index, mask in enumerate(masks.cpu()):
            anomalous = mask.flatten() > 0
            normal = grid[~anomalous]
            drawn = torch.zeros(0, 2, dtype=torch.long)
            if len(normal):
                probability = weights[index].cpu().flatten()[~anomalous] if weights is not None else torch.ones(len(normal))
                size = min(len(normal), 2 * self.count)
                drawn = normal[torch.multinomial(probability.clamp(min=1e-12), size, replacement=False, generator=generator)]
            points, weight = self._pad(drawn)
            rows["positive"].append(points)
            rows["positive_reference"].append(points)
            rows["positive_weight"].append(weight)
            query = grid[torch.randperm(len(grid), generator=generator)[: len(drawn)]]
            far = (query - drawn).float().norm(dim=1) > self.negative_distance
            points, weight = self._pad(query[far])
            reference, _ = self._pad(drawn[far])
            rows["negative"].append(points)
            rows["negative_reference"].append(reference)
            rows["negative_weight"].append(weight)
            defects = grid[anomalous]
            points, weight = self._pad(defects[torch.randperm(len(defects), generator=generator)])
            rows["anomaly"].append(points)
            rows["anomaly_weight"].append(weight)
        return {key: torch.stack(value).to(masks.device) for key, value in rows.items()}


class CprModel(ResizableBuffersMixin, TrainableModel, PreparedOnTrainingImages):
    """CPR: a frozen backbone, the trained local-retrieval heads, global retrieval and foreground
    estimation fitted on the training images (`prepare`), and the training images themselves
    (uint8), from which the retrieval gallery is computed."""

    resizable_buffers = (
        "train_images", "codebook", "histograms", "train_neighbours", "train_foreground",
        "foreground_weight", "foreground_bias",
    )

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2),
        descriptor_dim: int = 384,
        region_sizes: tuple[int, ...] = (3, 1),
        num_retrieved: int = 10,
        num_words: int = 12,
        histogram_grid: int = 5,
        histogram_keep: float = 0.8,
        is_object: bool = True,
        top_pixels: int = 512,
        blur_sigma: float = 4.0,
        points_per_kind: int = 300,
        positive_margin: float = 0.8,
        negative_margin: float = -0.2,
        loss_exponent: int = 3,
        fit_seed: int = 66,
    ) -> None:
        super().__init__()
        if len(region_sizes) != len(levels):
            raise ValueError(f"region_sizes {list(region_sizes)} needs one size per level {list(levels)}")
        if any(size < 1 or size % 2 == 0 for size in region_sizes):
            raise ValueError(f"region_sizes must be odd and positive, got {list(region_sizes)}")
        if num_retrieved < 1 or top_pixels < 1:
            raise ValueError(f"num_retrieved and top_pixels must be at least 1, got {num_retrieved}, {top_pixels}")
        if not 0 < histogram_keep <= 1:
            raise ValueError(f"histogram_keep must be in (0, 1], got {histogram_keep}")
        self.levels = list(levels)
        self.feature_extractor = FeatureExtractor(levels=self.levels, **backbone)
        self.heads = nn.ModuleList([LocalRetrievalHead(c, descriptor_dim) for c in self.feature_extractor.channels])
        self.region_sizes = list(region_sizes)
        self.num_retrieved = num_retrieved
        self.num_words = num_words
        self.histogram_grid = histogram_grid
        self.histogram_keep = histogram_keep
        self.is_object = is_object
        self.top_pixels = top_pixels
        self.blur_sigma = blur_sigma
        self.fit_seed = fit_seed
        stride = level_stride(self.levels[0])
        # A negative pair lies farther apart than the finest region's reach (the code: stride x r//2 x sqrt 2).
        self.point_pairs = PointPairs(points_per_kind, stride * max(self.region_sizes[0] // 2, 1) * math.sqrt(2))
        self.criterion = ContrastiveRetrievalLoss(positive_margin, negative_margin, loss_exponent)
        self.register_buffer("train_images", torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
        self.register_buffer("codebook", torch.zeros(num_words, 1))
        self.register_buffer("histograms", torch.zeros(0, histogram_grid**2, num_words + 1))
        self.register_buffer("train_neighbours", torch.zeros(0, num_retrieved, dtype=torch.long))
        self.register_buffer("train_foreground", torch.zeros(0, 1, 1))  # N x h x w, first level's resolution
        self.register_buffer("foreground_weight", torch.zeros(0))
        self.register_buffer("foreground_bias", torch.ones(()))
        self._gallery: list[torch.Tensor] | None = None

    # -- fitting on the training images ---------------------------------------------------------
    def preparation_statistics(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": (images * 255).round().to(torch.uint8), "feature": self.feature_extractor(images)[self.levels[0]].float()}

    @torch.no_grad()
    def prepare(self, statistics: dict[str, torch.Tensor]) -> None:
        """Codebook, histograms, each training image's retrieved neighbours, and the foreground."""
        images, features = statistics["image"], statistics["feature"]
        if len(images) < 2:
            raise ValueError(f"CPR retrieves among the training images: it needs at least 2, got {len(images)}")
        count, channels = features.shape[:2]
        rng = np.random.RandomState(self.fit_seed)
        flat = features.permute(0, 2, 3, 1).reshape(-1, channels).double().cpu().numpy()
        kmeans = KMeans(min(self.num_words, len(flat)), n_init=10, random_state=rng).fit(flat[rng.permutation(len(flat))[:50000]])
        self.train_images = images.to(self.train_images.device)
        self.codebook = torch.from_numpy(kmeans.cluster_centers_).float().to(features.device)
        self.histograms = self.describe(features)
        distances = histogram_distances(self.histograms, self.histograms, self.histogram_keep)
        distances.fill_diagonal_(float("inf"))
        neighbours = min(self.num_retrieved, count - 1)
        self.train_neighbours = distances.topk(neighbours, dim=1, largest=False).indices
        self.train_foreground = torch.ones(count, *features.shape[-2:], device=features.device)
        self.foreground_weight, self.foreground_bias = torch.zeros(0, device=features.device), torch.ones((), device=features.device)
        if self.is_object:
            discriminant = fit_foreground_discriminant(features, self.fit_seed)
            if discriminant is None:
                log.warning("CPR: no background/foreground split found on the training images; foreground = 1 everywhere")
            else:
                self.foreground_weight, self.foreground_bias = (t.to(features.device) for t in discriminant)
                self.train_foreground = self.foreground(features)
        self._gallery = None

    def describe(self, features: torch.Tensor) -> torch.Tensor:
        """First-level features B x C x h x w -> their block histograms over the codebook."""
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
        codes = torch.cdist(flat, self.codebook).argmin(dim=1).view(features.shape[0], *features.shape[-2:])
        return block_histograms(codes, self.histogram_grid, len(self.codebook))

    def foreground(self, features: torch.Tensor) -> torch.Tensor:
        """First-level features -> B x h x w foreground in [0, 1] (ones without a fitted FEB)."""
        if not len(self.foreground_weight):
            return features.new_ones(features.shape[0], *features.shape[-2:])
        return (torch.einsum("bchw,c->bhw", features.float(), self.foreground_weight) + self.foreground_bias).clamp(0, 1)

    def retrieve(self, features: torch.Tensor) -> torch.Tensor:
        """B x K indices of the training images closest to each image (global retrieval)."""
        distances = histogram_distances(self.describe(features), self.histograms, self.histogram_keep)
        return distances.topk(min(self.num_retrieved, distances.shape[1]), dim=1, largest=False).indices

    # -- descriptors ------------------------------------------------------------------------------------
    def descriptors(self, features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features -> the heads' L2-normalised descriptors per level."""
        return [F.normalize(head(features[level].float()), dim=1, eps=1e-8) for head, level in zip(self.heads, self.levels)]

    def train(self, mode: bool = True) -> CprModel:
        if mode:
            self._gallery = None  # the heads will change: the gallery is recomputed when next needed
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._gallery = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def gallery(self, batch_size: int = 16) -> list[torch.Tensor]:
        """Per level, N x C x h x w half-precision descriptors of the stored training images."""
        if self._gallery is None:
            if not len(self.train_images):
                raise RuntimeError("CPR has no training images: fit it before scoring")
            parts = []
            for start in range(0, len(self.train_images), batch_size):
                images = self.train_images[start : start + batch_size].float() / 255
                parts.append([d.half() for d in self.descriptors(self.feature_extractor(images))])
            self._gallery = [torch.cat(level) for level in zip(*parts)]
        return self._gallery

    # -- training ---------------------------------------------------------------------------------------
    def pair_loss(
        self, queries: torch.Tensor, references: torch.Tensor, anomaly_masks: torch.Tensor,
        weights: torch.Tensor | None, generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """The contrastive loss on query/reference pairs (B x 3 x H x W each, the queries carrying
        the anomalies of `anomaly_masks`), points drawn by `weights` (B x H x W, or None: uniform)."""
        size = tuple(queries.shape[-2:])
        pairs = self.point_pairs(anomaly_masks, weights, generator)
        features = self.feature_extractor(torch.cat([queries, references]))
        descriptors = self.descriptors(features)
        positive_total = negative_total = queries.new_zeros(())
        for level, level_descriptors in zip(self.levels, descriptors):
            query, reference = level_descriptors.chunk(2)
            original_query, original_reference = features[level].float().chunk(2)
            negative_weight = pairs["negative_weight"] if self.is_object else torch.zeros_like(pairs["negative_weight"])
            if self.is_object:
                # Distant pairs weighted by how different the backbone finds them, normalised per image.
                gap = (sample_at(original_query, pairs["negative"], size) - sample_at(original_reference, pairs["negative_reference"], size)).pow(2).sum(1)
                gap = gap * (negative_weight > 0)
                negative_weight = gap / (gap.sum(1, keepdim=True) + 1e-7) * negative_weight.sum(1, keepdim=True)
            cosine = lambda a, b, pa, pb: F.cosine_similarity(sample_at(a, pa, size), sample_at(b, pb, size), dim=1)  # noqa: E731
            positive, negative = self.criterion(
                cosine(query, reference, pairs["positive"], pairs["positive_reference"]), pairs["positive_weight"],
                torch.cat([cosine(query, reference, pairs["negative"], pairs["negative_reference"]),
                           cosine(query, reference, pairs["anomaly"], pairs["anomaly"])], dim=1),
                torch.cat([negative_weight, pairs["anomaly_weight"]], dim=1),
            )
            positive_total, negative_total = positive_total + positive, negative_total + negative
        return {"loss": positive_total + negative_total, "positive": positive_total, "negative": negative_total}

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: held-out normal images against their first retrieved training image (no anomalies)."""
        with torch.no_grad():
            neighbours = self.retrieve(self.feature_extractor(images)[self.levels[0]])[:, 0]
        references = self.train_images[neighbours].float() / 255
        masks = images.new_zeros(images.shape[0], *images.shape[-2:])
        return self.pair_loss(images, references, masks, None, torch.Generator().manual_seed(0))["loss"]

    # -- scoring ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        size = tuple(images.shape[-2:])
        features = self.feature_extractor(images)
        neighbours = self.retrieve(features[self.levels[0]])  # B x K
        gallery = self.gallery()
        descriptors = self.descriptors(features)
        finest = descriptors[0].shape[-2:]
        score = 0
        for query, level_gallery, region in zip(descriptors, gallery, self.region_sizes):
            distance = region_min_distance(query, level_gallery, neighbours, region)
            score = score + F.interpolate(distance[:, None], size=finest, mode="bilinear", align_corners=False)
        anomaly_map = F.interpolate(score, size=size, mode="bilinear", align_corners=False)[:, 0]
        if self.is_object and len(self.foreground_weight):
            foreground = torch.cat([self.foreground(features[self.levels[0]])[:, None], self.train_foreground[neighbours]], dim=1)
            foreground = F.interpolate(foreground, size=size, mode="bilinear", align_corners=False).amax(dim=1)
            anomaly_map = anomaly_map * foreground
        anomaly_map = blur_anomaly_map(anomaly_map, self.blur_sigma)
        top = min(self.top_pixels, anomaly_map[0].numel())
        return AnomalyOutput(anomaly_map.flatten(1).topk(top, dim=1).values.sum(dim=1), anomaly_map)
