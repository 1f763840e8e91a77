"""The reconstruction and memory family's pieces, on hand-made cases and against torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.ae import AutoencoderModel
from anomalib_lite.models.anogan import AnoGanModel
from anomalib_lite.models.components import Reconstructs
from anomalib_lite.models.components.autoencoders import (
    ConvAutoencoder,
    ConvEncoder,
    bottom_side,
    square_side,
)
from anomalib_lite.models.components.memory import MemAEMemory, MNADMemory, addressing_entropy, hard_shrink
from anomalib_lite.models.components.reconstruction import reconstruction_error_map, reduce_map
from anomalib_lite.models.ganomaly import GanomalyModel
from anomalib_lite.models.gradcon.torch_model import GradConModel, gradient_alignment
from anomalib_lite.models.memae import MemAEModel
from anomalib_lite.models.mnad import MnadModel
from anomalib_lite.models.ognet import OgnetModel
from anomalib_lite.models.vae import Vae, VaeModel


# -- memory (MemAE) ----------------------------------------------------------------------------
def test_hard_shrinkage_keeps_the_weights_above_the_threshold_and_zeroes_the_rest() -> None:
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    shrunk = hard_shrink(weights, 0.25)
    torch.testing.assert_close(shrunk, torch.tensor([[0.5, 0.3, 0.0]]), atol=1e-9, rtol=0)
    # In the memory: with unit items, dot-product logits log(w) address with softmax = w; the
    # shrinkage zeroes 0.2 and the L1 renormalisation gives 0.5 / 0.8 and 0.3 / 0.8.
    memory = MemAEMemory(3, 3, shrink_threshold=0.25)
    memory.items.data = torch.eye(3)
    with torch.no_grad():
        addressed = memory.address(torch.log(weights))
    torch.testing.assert_close(addressed, torch.tensor([[0.625, 0.375, 0.0]]))


def test_hard_shrinkage_passes_gradients_to_the_kept_weights_only() -> None:
    weights = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
    hard_shrink(weights, 0.25).sum().backward()
    assert weights.grad[0] == pytest.approx(1.0, abs=1e-6) and weights.grad[1] == pytest.approx(1.0, abs=1e-6)
    assert weights.grad[2] == 0


def test_addressing_entropy_on_hand_cases() -> None:
    assert float(addressing_entropy(torch.tensor([[1.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-9)
    assert float(addressing_entropy(torch.tensor([[0.5, 0.5, 0.0]]))) == pytest.approx(math.log(2))
    # The mean over queries: (log 2 + log 4) / 2.
    both = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert float(addressing_entropy(both)) == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_memory_rebuilds_every_position_from_its_items() -> None:
    torch.manual_seed(0)
    memory = MemAEMemory(4, 3, shrink_threshold=0.0, similarity="cosine")
    latents = torch.randn(2, 3, 5, 6)
    rebuilt, weights = memory(latents)
    assert rebuilt.shape == latents.shape and weights.shape == (2, 5, 6, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 6))
    # Position (1, 2, 3) by hand: softmax of its cosine similarities, then the weighted items.
    query = latents[1, :, 2, 3]
    cosine = torch.nn.functional.cosine_similarity(query.unsqueeze(0), memory.items, dim=1)
    expected = torch.softmax(cosine, dim=0) @ memory.items
    torch.testing.assert_close(rebuilt[1, :, 2, 3], expected)


def test_a_large_shrinkage_threshold_makes_the_addressing_sparse() -> None:
    torch.manual_seed(0)
    dense, sparse = MemAEMemory(50, 8, shrink_threshold=0.0), MemAEMemory(50, 8, shrink_threshold=3 / 50)
    sparse.items.data = dense.items.data.clone()
    queries = 4 * torch.randn(100, 8)
    with torch.no_grad():
        assert bool((dense.address(queries) > 0).all())
        weights = sparse.address(queries)
    assert float((weights > 0).float().mean()) < 0.5
    torch.testing.assert_close(weights.sum(1), torch.ones(100))


def test_bad_memory_settings_are_refused() -> None:
    with pytest.raises(UserInputError, match="similarity"):
        MemAEMemory(4, 3, similarity="euclid")
    with pytest.raises(UserInputError, match="shrink_threshold"):
        MemAEMemory(4, 3, shrink_threshold=1.5)
    with pytest.raises(UserInputError, match=r"^method.num_items=1: must be an integer at least 2$"):
        MNADMemory(1, 3)


def test_memae_loss_is_mse_plus_weighted_entropy() -> None:
    torch.manual_seed(0)
    model = MemAEModel(32, latent_channels=8, width=4, depth=2, num_items=10, entropy_weight=0.5)
    images = torch.rand(2, 3, 32, 32)
    terms = model.loss_terms(images)
    assert float(terms["loss"]) == pytest.approx(float(terms["mse"] + 0.5 * terms["entropy"]))
    assert 0 < float(terms["entropy"]) <= math.log(10) + 1e-6


# -- autoencoders and reconstruction maps -------------------------------------------------------
@pytest.mark.parametrize(("side", "depth", "flat", "latent_shape"), [(64, 4, True, (7, 1, 1)), (96, 3, False, (7, 12, 12))])
def test_conv_autoencoder_geometry(side: int, depth: int, flat: bool, latent_shape: tuple[int, ...]) -> None:
    autoencoder = ConvAutoencoder(side, 7, width=4, depth=depth, flat=flat)
    images = torch.rand(2, 3, side, side)
    assert autoencoder.encoder(images).shape == (2, *latent_shape)
    output = autoencoder(images)
    assert output.shape == images.shape and float(output.min()) >= 0 and float(output.max()) <= 1
    # Widths double at every halving: 4, 8, ... before the latent.
    assert ConvEncoder(side, 7, width=4, depth=depth).out_channels == 4 * 2 ** (depth - 1)


def test_sizes_the_networks_cannot_take_are_refused_with_a_hint() -> None:
    assert bottom_side(224, 5) == 7
    with pytest.raises(UserInputError, match="divisible by 2\\^depth = 32"):
        bottom_side(100, 5)
    with pytest.raises(UserInputError, match="square"):
        square_side([64, 96])
    assert square_side([64, 64]) == 64


def test_reconstruction_error_maps_by_hand() -> None:
    images = torch.zeros(1, 3, 4, 4)
    reconstructions = images.clone()
    reconstructions[0, 0, 1, 2] = 1.0  # one channel of one pixel off by 1
    l2 = reconstruction_error_map(images, reconstructions, "l2")
    assert float(l2[0, 1, 2]) == pytest.approx(1 / 3) and float(l2.sum()) == pytest.approx(1 / 3)
    same = torch.rand(1, 3, 16, 16)
    assert float(reconstruction_error_map(same, same, "ssim").abs().max()) < 1e-4  # 1 - SSIM of identical images
    assert float(reconstruction_error_map(same, 1 - same, "ssim").mean()) > 0.5
    maps = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])
    assert float(reduce_map(maps, "max")) == 3.0 and float(reduce_map(maps, "mean")) == 1.0
    with pytest.raises(UserInputError):
        reduce_map(maps, "median")


# -- VAE ----------------------------------------------------------------------------------------
def test_vae_kl_term_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    model = VaeModel(64, latent_channels=4, decoder_width=4).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mean, log_variance = model.encode(images)
        terms = model.elbo_terms(images)
    assert mean.shape == (2, 4, 2, 2)  # ResNet-18 reduces by 32
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * log_variance)), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["kl"], expected)
    # Eval mode reconstructs from the mean: the loss is deterministic there.
    with torch.no_grad():
        assert float(model.elbo_terms(images)["loss"]) == float(terms["loss"])
    model.train()
    with torch.no_grad():  # training samples the latent
        assert float(model.elbo_terms(images)["reconstruction"]) != pytest.approx(float(terms["reconstruction"]), rel=1e-6)


def test_vae_decoder_statistics_are_those_of_the_latent_means() -> None:
    """After `fit`, the decoder's first BatchNorm holds the mean and variance of its input over the
    decoded latent means (what scoring decodes), not the training run's sampled latents'."""
    torch.manual_seed(0)
    model = VaeModel(64, latent_channels=4, decoder_width=4)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics from sampled latents, as training leaves them
            model.elbo_terms(torch.rand(4, 3, 64, 64))
    model.eval()
    with torch.no_grad():
        means = model.embed(torch.rand(6, 3, 64, 64))
        first_conv, first_norm = model.decoder.body[0], model.decoder.body[1]
        before = first_norm.running_mean.clone()
        model.fit(means, chunk=6)
        inputs = first_conv(means)
    assert not model.decoder.training and first_norm.momentum == 0.1
    torch.testing.assert_close(first_norm.running_mean, inputs.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(first_norm.running_var, inputs.var(dim=(0, 2, 3), unbiased=True))
    assert not torch.allclose(before, first_norm.running_mean)



def test_vae_augmentation_keeps_the_test_framing() -> None:
    """The paper's resize-and-crop frames training images at its test zoom; on top of the
    datamodule's framing the augmentation may only rotate and shift, not zoom."""
    module = Vae(epochs=1, optimizers={"model": {"_target_": "torch.optim.Adam"}}, image_size=64, latent_channels=4, decoder_width=4)
    side = 128
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).float() - (side - 1) / 2
    disk = (grid.pow(2).sum(0) <= 30**2).float().expand(8, 3, side, side)  # a centred bright disk
    torch.manual_seed(0)
    augmented = module.augmentation()(disk)
    assert augmented.shape == disk.shape
    area = (augmented[:, 0] > 0.5).flatten(1).sum(1).float() / (disk[:, 0] > 0.5).flatten(1).sum(1)
    assert torch.all((area - 1).abs() < 0.03), area  # a 292/256 zoom would make it 1.30
    assert torch.all((augmented[:, 0] - disk[:, 0]).abs().flatten(1).sum(1) > 0)  # and it does move

# -- GANomaly -----------------------------------------------------------------------------------
def test_ganomaly_scores_an_image_by_itself() -> None:
    """The score is the image's own latent distance, whatever else is in the batch (the authors'
    code min-max normalises over the test set; this must not)."""
    torch.manual_seed(0)
    model = GanomalyModel(32, latent_channels=8, width=4, depth=3).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
        others = model(torch.cat([images[1:2], torch.zeros(3, 3, 32, 32)]))
        real, fake, latent, relatent = model.generate(images[1:2])
    torch.testing.assert_close(together.pred_score[1:2], alone.pred_score)
    torch.testing.assert_close(others.pred_score[:1], alone.pred_score)
    torch.testing.assert_close(alone.pred_score, (latent - relatent).pow(2).mean(1))
    assert together.anomaly_map.shape == (4, 32, 32)


def test_ganomaly_generator_loss_weights_and_discriminator_reset() -> None:
    torch.manual_seed(0)
    model = GanomalyModel(32, latent_channels=8, width=4, depth=3, adversarial_weight=2, contextual_weight=3, encoder_weight=5)
    terms, real, fake = model.generator_terms(torch.rand(2, 3, 32, 32))
    expected = 2 * terms["adversarial"] + 3 * terms["contextual"] + 5 * terms["encoder"]
    assert float(terms["loss"]) == pytest.approx(float(expected))
    assert float(real.min()) >= -1 and float(fake.abs().max()) <= 1  # the tanh space
    before = model.discriminator.latent.weight.detach().clone()
    generator_before = model.encoder.latent.weight.detach().clone()
    model.reinitialize_discriminator()
    assert not torch.equal(before, model.discriminator.latent.weight)
    assert torch.equal(generator_before, model.encoder.latent.weight)


# -- AnoGAN -------------------------------------------------------------------------------------
def test_anogan_latent_search_lowers_its_loss_step_by_step_and_leaves_the_weights() -> None:
    torch.manual_seed(0)
    model = AnoGanModel(32, latent_channels=8, width=4, depth=3, search_steps=40, search_lr=0.01).eval()
    # DCGAN's N(0, 0.02) start makes an untrained generator nearly blind to z: give it a response.
    for module in model.generator.modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            torch.nn.init.kaiming_normal_(module.weight)
    image = torch.rand(1, 3, 32, 32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # as in Lightning's evaluation loops
        loss, fake, trace = model.search(image, record=True)
    assert len(trace) == 41 and all(after < before for before, after in zip(trace, trace[1:])), trace
    assert float(loss.sum()) == pytest.approx(trace[-1]) and fake.shape == image.shape
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # The score is (1 - lambda) residual + lambda discrimination, by hand at the end point.
    real = image * 2 - 1
    with torch.no_grad():
        features = model.discriminator.features
        expected = 0.9 * (real - fake).abs().sum() + 0.1 * (features(real) - features(fake)).abs().sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_anogan_scores_an_image_by_itself() -> None:
    torch.manual_seed(0)
    model = AnoGanModel(32, latent_channels=8, width=4, depth=3, search_steps=10).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        together, alone = model(images), model(images[2:3])
    torch.testing.assert_close(together.pred_score[2:3], alone.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.anomaly_map[2:3], alone.anomaly_map, rtol=1e-5, atol=1e-5)


# -- MNAD ---------------------------------------------------------------------------------------
def _memory(items: list[list[float]]) -> MNADMemory:
    memory = MNADMemory(len(items), len(items[0]))
    memory.items.copy_(torch.nn.functional.normalize(torch.tensor(items), dim=1))
    return memory


def test_mnad_update_moves_only_the_nearest_items_without_gradient() -> None:
    memory = _memory([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert [name for name, _ in memory.named_parameters()] == []  # a buffer, not learned by gradient
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.1], [-1.0, 0.3]]), dim=1).requires_grad_(True)
    before = memory.items.clone()
    memory.update(queries)
    assert torch.equal(memory.items[1], before[1])  # no query is nearest to item 1
    assert not torch.equal(memory.items[0], before[0]) and not torch.equal(memory.items[2], before[2])
    torch.testing.assert_close(memory.items.norm(dim=1), torch.ones(3))
    assert not memory.items.requires_grad and queries.grad is None
    # Item 2 by hand: one query is its nearest, weighted softmax / max = 1: p <- normalise(p + q).
    torch.testing.assert_close(memory.items[2], torch.nn.functional.normalize(before[2] + queries[2].detach(), dim=0))
    # Item 0 by hand: two queries, each weighted by its softmax over all queries / the largest.
    column = torch.softmax(queries.detach() @ before[0], dim=0)
    weights = column[:2] / column.max()
    expected = torch.nn.functional.normalize(before[0] + weights @ queries.detach()[:2], dim=0)
    torch.testing.assert_close(memory.items[0], expected)


def test_mnad_compactness_and_separateness_by_hand() -> None:
    memory = _memory([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.5]]), dim=1)
    compactness, separateness = memory.losses(query)
    nearest, second = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(compactness) == pytest.approx(float((query[0] - nearest).pow(2).mean()))
    by_hand = max(float((query[0] - nearest).norm() - (query[0] - second).norm()) + 1.0, 0.0)
    assert float(separateness) == pytest.approx(by_hand, abs=1e-5)  # triplet margin 1 (torch adds eps 1e-6)
    read = memory.read(query)
    assert read.shape == (1, 4) and torch.equal(read[:, :2], query)


def test_mnad_score_uses_the_ranges_fitted_on_normal_images() -> None:
    torch.manual_seed(0)
    model = MnadModel(width=4, num_items=3).eval()
    normal, test = torch.rand(4, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        model.calibrate(model.calibration_maps(normal))
        psnr, distance, _ = model.psnr_and_distance(test)
        output = model(test)
    low_p, high_p = model.psnr_range
    low_d, high_d = model.distance_range
    expected = 0.6 * (1 - (psnr - low_p) / (high_p - low_p)) + 0.4 * (distance - low_d) / (high_d - low_d)
    torch.testing.assert_close(output.pred_score, expected)
    assert output.anomaly_map.shape == (2, 16, 16)
    with pytest.raises(UserInputError, match="divisible by 8"):
        model.queries(torch.rand(1, 3, 12, 16))


# -- GradCon ------------------------------------------------------------------------------------
def test_gradcon_gradient_alignment_on_a_hand_made_two_layer_case() -> None:
    gradients = [torch.tensor([[1.0, 0.0]]), torch.tensor([0.0, 2.0])]
    references = [torch.tensor([[1.0, 1.0]]), torch.tensor([0.0, -1.0])]
    # cos = 1 / sqrt(2) for the first layer, -1 for the second; the term is their mean.
    assert float(gradient_alignment(gradients, references)) == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    # With a batch dimension: one value per image.
    batched = [torch.stack([gradients[0], -gradients[0]]), torch.stack([gradients[1], gradients[1]])]
    torch.testing.assert_close(gradient_alignment(batched, references), torch.tensor([(1 / math.sqrt(2) - 1) / 2, (-1 / math.sqrt(2) - 1) / 2]))


def test_gradcon_two_layer_gradient_term_by_hand() -> None:
    """A two-layer decoder: its training term is minus the mean cosine between autograd's gradient
    of the MSE and the stored averages, which are the running mean of the steps' gradients."""
    torch.manual_seed(0)
    model = GradConModel(widths=(4, 4))
    assert len(model.decoder_weights()) == 2
    images = torch.rand(2, 3, 8, 8)
    assert float(model.training_terms(images)["gradient"]) == 0.0  # no history yet
    first, second = [torch.randn_like(w) for w in model.decoder_weights()], [torch.randn_like(w) for w in model.decoder_weights()]
    model.update_references(first)
    model.update_references(second)
    for reference, a, b in zip(model.references(), first, second):
        torch.testing.assert_close(reference, (a + b) / 2)
    terms = model.training_terms(images)
    mse = torch.nn.functional.mse_loss(model.network(images), images)
    gradients = torch.autograd.grad(mse, model.decoder_weights())
    by_hand = -sum(
        float(torch.dot(g.flatten(), r.flatten()) / (g.norm() * r.norm())) for g, r in zip(gradients, model.references())
    ) / 2
    assert float(terms["gradient"]) == pytest.approx(by_hand, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(mse) + 0.03 * by_hand, rel=1e-5)
    terms["loss"].backward()  # double backpropagation reaches the encoder too
    assert model.network[0].weight.grad is not None


def test_gradcon_scores_each_image_with_its_own_gradient() -> None:
    """Batched per-image gradients give what batches of one give (the authors' test semantics)."""
    torch.manual_seed(0)
    model = GradConModel(widths=(4, 4))
    model.update_references([torch.randn_like(w) for w in model.decoder_weights()])
    images = torch.rand(3, 3, 8, 8)
    with torch.inference_mode():
        together = model(images)
    for index in range(3):
        image = images[index : index + 1]
        mse = torch.nn.functional.mse_loss(model.network(image), image)
        gradients = torch.autograd.grad(mse, model.decoder_weights())
        alignment = gradient_alignment(gradients, model.references())
        assert float(together.pred_score[index]) == pytest.approx(float(mse - 0.12 * alignment), rel=1e-5, abs=1e-7)
    with pytest.raises(UserInputError, match="divisible by 4"):
        model(torch.rand(1, 3, 6, 8))


# -- OGNet --------------------------------------------------------------------------------------
def test_ognet_phase_two_trains_the_discriminator_alone_on_good_and_poor_reconstructions() -> None:
    torch.manual_seed(0)
    model = OgnetModel(24, width=2)
    images = torch.rand(3, 3, 24, 24)
    # G_old is a frozen copy of G as it was when kept.
    model.keep_old_generator()
    assert all(torch.equal(a, b) for a, b in zip(model.generator.state_dict().values(), model.old_generator.state_dict().values()))
    assert not any(p.requires_grad for p in model.old_generator.parameters())
    # Pseudo anomalies by hand: G_old of the mean of two neighbours' G_old reconstructions.
    model.eval()
    real = images * 2 - 1
    with torch.no_grad():
        old = model.old_generator(real)
        torch.testing.assert_close(model.pseudo_anomalies(real)[1], model.old_generator(((old[1] + old[0]) / 2).unsqueeze(0))[0])
    model.train()
    generator_before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    loss = model.phase_two_loss(images)
    loss.backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert all(torch.equal(generator_before[k], v) for k, v in model.generator.state_dict().items())  # no BatchNorm update either
    # The score is the negative logit of D on G's reconstruction.
    model.eval()
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(output.pred_score, -model.discriminator(model.generator(real)))
    assert output.anomaly_map.shape == (3, 24, 24)


# -- what each model makes of an image (the figure's middle column) -----------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: AutoencoderModel(32, latent_channels=8, width=4, depth=2),
        lambda: MemAEModel(32, latent_channels=8, width=4, depth=2, num_items=10),
        lambda: VaeModel(64, latent_channels=4, decoder_width=4),
        lambda: GanomalyModel(32, latent_channels=8, width=4, depth=3),
        lambda: AnoGanModel(32, latent_channels=8, width=4, depth=3, search_steps=2),
        lambda: MnadModel(width=4, num_items=3),
        lambda: OgnetModel(32, width=2),
        lambda: GradConModel(widths=(4, 4)),
    ],
    ids=["ae", "memae", "vae", "ganomaly", "anogan", "mnad", "ognet", "gradcon"],
)
def test_every_reconstructing_model_gives_images_in_the_input_range(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    assert isinstance(model, Reconstructs)
    side = 64 if isinstance(model, VaeModel) else 32
    images = torch.rand(2, 3, side, side)
    with torch.no_grad():
        reconstructions = model.reconstruct(images)
    assert reconstructions.shape == images.shape
    assert float(reconstructions.min()) >= 0 and float(reconstructions.max()) <= 1
