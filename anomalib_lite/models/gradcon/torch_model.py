"""GradCon (Kwon et al., ECCV 2020, "Backpropagated gradient representations for anomaly detection").

A convolutional autoencoder whose decoder gradients are a representation: training adds to the
reconstruction MSE a gradient-constraint term,
    L_grad = -(1 / N) sum_i cos(dMSE / dW_i, the running average of past gradients of W_i),
over the N decoder layers (double backpropagation), weighted by 0.03. The running average is of the
gradients of the total loss, one update per training step, as in the authors' code (in the
first step, with no history, the term is 0). An anomaly needs a model update unlike the normal
ones, so at test time
    score = MSE(x) - 0.12 x (1 / N) sum_i cos(dMSE(x) / dW_i, average_i),
with the gradient of each image's own loss (the authors score with batches of 1; here a batch is
scored at once with per-image gradients, `torch.func.vmap`, which gives the same values).

Network (the authors' `GradConCAE`): 4 convolutions of 4 x 4, stride 2, widths 32/32/64/64 with
ReLU, no normalisation; the decoder mirrors them with transposed convolutions and a sigmoid.
Their paddings are for 28 and 32 px images; here every layer pads 1, so any side divisible by 16
maps back to itself. The map: per-pixel squared error (GradCon scores images; the map is for
looking).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.gradients import gradients_enabled
from anomalib_lite.models.components.interfaces import Reconstructs, TrainableModel


def gradient_alignment(gradients: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of cos(gradient_i, reference_i), each flattened: a scalar, or one value
    per image where the gradients carry a leading batch dimension (B x the reference's shape)."""
    cosines = []
    for gradient, reference in zip(gradients, references):
        gradient = gradient.flatten(1) if gradient.ndim > reference.ndim else gradient.flatten()
        cosines.append(F.cosine_similarity(gradient, reference.flatten().expand_as(gradient), dim=-1))
    return torch.stack(cosines).mean(dim=0)


class GradConModel(TrainableModel, Reconstructs):
    """`widths`: the encoder's channels (the decoder mirrors them); `train_gradient_weight` (0.03)
    and `test_gradient_weight` (0.12): beta in training and in the score."""

    not_exportable = "its score needs the gradients of the reconstruction loss of every test image"

    def __init__(
        self,
        widths: Sequence[int] = (32, 32, 64, 64),
        train_gradient_weight: float = 0.03,
        test_gradient_weight: float = 0.12,
    ) -> None:
        super().__init__()
        if not widths:
            raise UserInputError("method.widths is empty: GradCon's autoencoder needs at least one layer")
        channels = [3, *widths]
        encoder: list[nn.Module] = []
        for a, b in zip(channels, channels[1:]):
            encoder += [nn.Conv2d(a, b, 4, 2, 1), nn.ReLU()]
        decoder: list[nn.Module] = []
        for a, b in zip(channels[:0:-1], channels[-2::-1]):
            decoder += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU()]
        decoder[-1] = nn.Sigmoid()
        self.network = nn.Sequential(*encoder, *decoder)
        self.decoder_layers = [name for name, module in self.network.named_children() if isinstance(module, nn.ConvTranspose2d)]
        for index, name in enumerate(self.decoder_layers):
            self.register_buffer(f"reference_{index}", torch.zeros_like(self.network.get_submodule(name).weight))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.long))
        self.train_gradient_weight = train_gradient_weight
        self.test_gradient_weight = test_gradient_weight
        self.depth = len(widths)

    def decoder_weights(self) -> list[nn.Parameter]:
        return [self.network.get_submodule(name).weight for name in self.decoder_layers]

    def references(self) -> list[torch.Tensor]:
        return [getattr(self, f"reference_{index}") for index in range(len(self.decoder_layers))]

    def check_size(self, images: torch.Tensor) -> None:
        if images.shape[-1] % 2**self.depth or images.shape[-2] % 2**self.depth:
            raise UserInputError(
                f"GradCon's autoencoder halves the image {self.depth} times: sides must be divisible by "
                f"{2 ** self.depth}, got {tuple(images.shape[-2:])}"
            )

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        self.check_size(images)
        return self.network(images)

    def training_terms(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE + beta_train x L_grad (L_grad through double backpropagation; 0 before any history)."""
        reconstruction = F.mse_loss(self.reconstruct(images), images)
        if int(self.reference_count) == 0:
            gradient_term = reconstruction.new_zeros(())
        else:
            gradients = torch.autograd.grad(reconstruction, self.decoder_weights(), create_graph=True)
            gradient_term = -gradient_alignment(gradients, self.references())
        return {
            "loss": reconstruction + self.train_gradient_weight * gradient_term,
            "reconstruction": reconstruction,
            "gradient": gradient_term,
        }

    @torch.no_grad()
    def update_references(self, gradients: Sequence[torch.Tensor]) -> None:
        """Fold one step's decoder gradients into the running averages (the authors' AverageMeter)."""
        count = int(self.reference_count)
        for reference, gradient in zip(self.references(), gradients):
            reference.mul_(count / (count + 1)).add_(gradient / (count + 1))
        self.reference_count += 1

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective on held-out images (validation: needs autograd, returns a value)."""
        with gradients_enabled():
            return self.training_terms(images.detach().clone())["loss"].detach()

    def per_image_gradients(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(per-image gradients of each image's own MSE w.r.t. the decoder weights, each B x
        weight shape; the per-image MSE, B; the reconstructions)."""
        parameters = {name: p.detach() for name, p in self.network.named_parameters()}
        buffers = dict(self.network.named_buffers())
        names = [f"{layer}.weight" for layer in self.decoder_layers]

        def image_loss(weights: dict[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = functional_call(self.network, ({**parameters, **weights}, buffers), (image.unsqueeze(0),))
            return F.mse_loss(output, image.unsqueeze(0)), output.squeeze(0)

        with gradients_enabled():
            images = images.detach().clone()
            self.check_size(images)
            gradients, (losses, outputs) = vmap(grad_and_value(image_loss, has_aux=True), in_dims=(None, 0))(
                {name: parameters[name] for name in names}, images
            )
        return [gradients[name].detach() for name in names], losses.detach(), outputs.detach()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        gradients, losses, reconstructions = self.per_image_gradients(images)
        scores = losses - self.test_gradient_weight * gradient_alignment(gradients, self.references())
        return AnomalyOutput(scores, (reconstructions - images).pow(2).mean(dim=1))
