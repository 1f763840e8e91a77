"""DRAEM's math: the SSIM and focal losses, the image score's mean filter, the networks, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.schedules import multistep_at_fractions
from anomalib_lite.models.draem import Draem, DraemModel
from anomalib_lite.models.draem.loss import softmax_focal_loss, ssim_loss
from anomalib_lite.models.draem.torch_model import DiscriminativeSubNetwork, ReconstructiveSubNetwork


def test_ssim_loss_is_one_minus_ssim_not_kornias_half() -> None:
    # Constant images a and b: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.7, 0.01**2
    ssim = (2 * a * b + c1) / (a * a + b * b + c1)
    loss = ssim_loss(torch.full((2, 3, 24, 24), a), torch.full((2, 3, 24, 24), b))
    assert float(loss) == pytest.approx(1 - ssim, rel=1e-4)  # float32 variances: ~1e-8, not exactly 0
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert float(ssim_loss(image, image)) == pytest.approx(0, abs=1e-5)


def test_focal_loss_on_a_hand_case() -> None:
    # Two pixels: logits (0, ln 3) -> p(anomaly) = 3/4, target 1; logits (ln 4, 0) -> p = 1/5, target 0.
    logits = torch.tensor([[0.0, math.log(4)], [math.log(3), 0.0]]).view(1, 2, 1, 2)
    masks = torch.tensor([[[1.0, 0.0]]])
    per_pixel = [-(1 - 0.75) ** 2 * math.log(0.75), -(1 - 0.8) ** 2 * math.log(0.8)]
    assert float(softmax_focal_loss(logits, masks)) == pytest.approx(sum(per_pixel) / 2, rel=1e-6)
    # gamma = 0 is the cross-entropy.
    expected = torch.nn.functional.cross_entropy(logits, masks.long())
    assert float(softmax_focal_loss(logits, masks, gamma=0)) == pytest.approx(float(expected), rel=1e-6)
    # Class weights: anomalous pixels by alpha, normal ones by 1 - alpha; anomalib's alpha = 1 drops the normal pixel.
    assert float(softmax_focal_loss(logits, masks, alpha=0.25)) == pytest.approx((0.25 * per_pixel[0] + 0.75 * per_pixel[1]) / 2, rel=1e-6)
    assert float(softmax_focal_loss(logits, masks, alpha=1.0)) == pytest.approx(per_pixel[0] / 2, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        softmax_focal_loss(logits, masks, alpha=1.5)


def test_focal_alpha_matches_kornias_focal_loss_as_anomalib_calls_it() -> None:
    kornia = pytest.importorskip("kornia")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 7, generator=generator) * 3
    masks = (torch.rand(2, 5, 7, generator=generator) > 0.7).float()
    for alpha in (1.0, 0.25):
        expected = kornia.losses.FocalLoss(alpha=alpha, gamma=2.0, reduction="mean")(logits, masks.long())
        # kornia's "mean" also divides by the 2 class channels: anomalib's focal term is half of this one.
        assert float(softmax_focal_loss(logits, masks, alpha=alpha)) == pytest.approx(2 * float(expected), rel=1e-5)


def test_mean_filter_keeps_a_single_hot_pixel_from_deciding_the_image() -> None:
    model = DraemModel(reconstruction_width=4, discriminative_width=4)
    maps = torch.zeros(2, 64, 64)
    maps[0, 30, 30] = 1.0  # one hot pixel
    maps[1, 20:41, 20:41] = 0.5  # a 21 x 21 region of moderate evidence
    assert maps[0].max() > maps[1].max()  # the raw maximum would rank the hot pixel first
    scores = model.image_scores(maps)
    assert scores[1] > scores[0]
    assert float(scores[0]) == pytest.approx(1 / 441) and float(scores[1]) == pytest.approx(0.5)


def test_networks_follow_the_widths_and_work_at_any_size() -> None:
    reconstructive = ReconstructiveSubNetwork(width=8)
    discriminative = DiscriminativeSubNetwork(width=4)
    images = torch.rand(2, 3, 72, 88)  # not multiples of 16 or 32
    assert reconstructive(images).shape == (2, 3, 72, 88)
    assert discriminative(torch.cat([images, images], dim=1)).shape == (2, 2, 72, 88)
    # The authors' widths: 128 / 256 / 512 / 1024 / 1024 (reconstructive), 64 ... 512 (discriminative).
    widths = [block[0].out_channels for block in ReconstructiveSubNetwork(width=128).encoder]
    assert widths == [128, 256, 512, 1024, 1024]
    assert [block[0].out_channels for block in DiscriminativeSubNetwork(width=64).encoder] == [64, 128, 256, 512, 512, 512]
    model = DraemModel(reconstruction_width=8, discriminative_width=4)
    scales = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(scales.mean()) - 1) < 0.01 and abs(float(scales.std()) - 0.02) < 0.005
    assert abs(float(convs.std()) - 0.02) < 0.002  # N(0, 0.02) initialisation
    # init="torch" (anomalib's): PyTorch's defaults, BN scales exactly 1, convs by fan-in.
    torch_init = DraemModel(reconstruction_width=8, discriminative_width=4, init="torch")
    assert all(bool((m.weight == 1).all()) for m in torch_init.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first = torch_init.reconstructive.encoder[0][0].weight  # 3 x 3 x 3 fan-in: U(+-1/sqrt(27))
    assert float(first.abs().max()) <= 27**-0.5 and float(first.std()) > 0.08  # U: std 0.11
    with pytest.raises(ValueError, match="init must be"):
        DraemModel(reconstruction_width=8, discriminative_width=4, init="kaiming")
    output = model.eval()(torch.rand(3, 3, 40, 40))
    assert output.anomaly_map.shape == (3, 40, 40) and float(output.anomaly_map.max()) <= 1


def test_draem_loss_terms_and_the_normal_loss() -> None:
    model = DraemModel(reconstruction_width=4, discriminative_width=4)
    images = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:16, 8:16] = 1
    terms = model.training_loss(images, images.flip(-1), masks)
    assert set(terms) == {"loss", "l2", "ssim", "focal"}
    assert float(terms["loss"]) == pytest.approx(float(terms["l2"] + terms["ssim"] + terms["focal"]))
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_multistep_at_fractions_follows_the_runs_epochs() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = multistep_at_fractions(optimizer, total_epochs=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0] * 8 + [0.2, 0.04])


def test_a_missing_texture_folder_is_refused_not_replaced_by_noise(tmp_path) -> None:  # noqa: ANN001
    optimizers = {"model": {"_target_": "torch.optim.Adam", "lr": 1e-4}}
    with pytest.raises(UserInputError, match="does not exist"):
        Draem(anomaly_source=str(tmp_path / "dtd"), epochs=1, optimizers=optimizers, reconstruction_width=4, discriminative_width=4)
