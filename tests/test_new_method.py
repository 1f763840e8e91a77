"""A new method is one folder and one yaml: two throwaway methods, written by this test outside the
package, run end to end through the real command with nothing else changed.

- `toy_ae` trains its own network (no backbone); one optimiser and a MultiStepLR schedule from
  its yaml; its LightningModule names its torch model and nothing more (the loop is the framework's).
- `toy_gan` has a generator and a discriminator, each with its own optimiser from the yaml,
  stepped alternately in a loop of three lines.
The folder is found on PYTHONPATH, the yaml through Hydra's search path, as a user's would be.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import cli_tiny_args, run_cli

from anomalib_lite.engine.checkpoint import read_checkpoint

TORCH_MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, TrainableModel


def autoencoder(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, hidden, 3, 2, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(hidden, hidden, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(hidden, 3, 4, 2, 1), nn.Sigmoid(),
    )


class {name}(TrainableModel):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.generator = autoencoder(hidden)
        self.discriminator = nn.Sequential(
            nn.Conv2d(3, hidden, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1)
        )

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.generator(images), images)

    def generator_loss(self, images: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        fooled = F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.ones(len(fake), 1))
        return F.mse_loss(fake, images) + 0.01 * fooled

    def discriminator_loss(self, images: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real = F.binary_cross_entropy_with_logits(self.discriminator(images), torch.ones(len(images), 1))
        return real + F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.zeros(len(fake), 1))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        error = (self.generator(images) - images).pow(2).mean(dim=1)
        return AnomalyOutput(error.flatten(1).amax(dim=1), error)
'''

LIGHTNING_MODELS = {
    "toy_ae": '''
from anomalib_lite.engine import TrainedModule
from toy_ae.torch_model import ToyAeModel


class ToyAe(TrainedModule):
    model_class = ToyAeModel
''',
    "toy_gan": '''
from anomalib_lite.engine import TrainedModule
from toy_gan.torch_model import ToyGanModel


class ToyGan(TrainedModule):
    model_class = ToyGanModel

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def parameter_groups(self):
        return {"generator": self.model.generator.parameters(), "discriminator": self.model.discriminator.parameters()}

    def training_step(self, batch, batch_idx):
        fake = self.model.generator(batch.image)
        self.step(self.optimizer("discriminator"), self.model.discriminator_loss(batch.image, fake.detach()))
        self.step(self.optimizer("generator"), self.model.generator_loss(batch.image, fake))
''',
}

CONFIGS = {
    "toy_ae": '''
        _target_: toy_ae.lightning_model.ToyAe
        hidden: 8
        epochs: 3
        optimizers:
          model:
            _target_: torch.optim.Adam
            _partial_: true
            lr: 0.01
        schedulers:
          model:
            _target_: torch.optim.lr_scheduler.MultiStepLR
            _partial_: true
            milestones: [2]
            gamma: 0.1
    ''',
    "toy_gan": '''
        _target_: toy_gan.lightning_model.ToyGan
        hidden: 8
        epochs: 2
        optimizers:
          generator:
            _target_: torch.optim.Adam
            _partial_: true
            lr: 0.01
            betas: [0.5, 0.999]
          discriminator:
            _target_: torch.optim.Adam
            _partial_: true
            lr: 0.001
            betas: [0.5, 0.999]
    ''',
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder of the method packages, config root): the only files a new method needs."""
    root = tmp_path_factory.mktemp("plugin")
    for name, lightning_model in LIGHTNING_MODELS.items():
        folder = root / "methods" / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        class_name = "".join(part.title() for part in name.split("_")) + "Model"
        (folder / "torch_model.py").write_text(TORCH_MODELS.replace("{name}", class_name))
        (folder / "lightning_model.py").write_text(lightning_model)
        (root / "conf" / "method").mkdir(parents=True, exist_ok=True)
        (root / "conf" / "method" / f"{name}.yaml").write_text(textwrap.dedent(CONFIGS[name]))
    return root / "methods", root / "conf"


def _run(plugin: tuple[Path, Path], tmp_path: Path, cache_dir: Path, *args: str):
    methods, conf = plugin
    return run_cli(
        *cli_tiny_args(cache_dir), f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={tmp_path / 'run'}", *args,
        cwd=tmp_path, env={"PYTHONPATH": str(methods)},
    )


def test_a_method_without_backbone_runs_from_its_folder_and_yaml(plugin, tmp_path: Path, cache_dir: Path) -> None:
    result = _run(plugin, tmp_path, cache_dir, "method=toy_ae", "dataset.category=disc")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "toy_ae" and metrics["backbone"] is None and metrics["epochs"] == 3
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["val_synthetic_aupro"] is not None
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "model.ckpt")
    assert not any(key.startswith("model.feature_extractor") for key in checkpoint["state_dict"])
    # The yaml's schedule ran: MultiStepLR at epoch 2 took the lr from 0.01 to 0.001.
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001)
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3


def test_a_generator_and_a_discriminator_step_alternately(plugin, tmp_path: Path, cache_dir: Path) -> None:
    result = _run(plugin, tmp_path, cache_dir, "method=toy_gan", "dataset.category=disc")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "toy_gan" and metrics["best_epoch"] in (1, 2)
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "model.ckpt")
    states = checkpoint["optimizer_states"]
    assert len(states) == 2
    # 9 fitted images in batches of 8: 2 steps per epoch for each optimiser, 2 epochs.
    steps = [int(next(iter(state["state"].values()))["step"]) for state in states]
    assert steps == [4, 4]
    assert [state["param_groups"][0]["lr"] for state in states] == [0.01, 0.001]


def test_a_backbone_for_a_method_without_one_is_one_line(plugin, tmp_path: Path, cache_dir: Path) -> None:
    result = _run(plugin, tmp_path, cache_dir, "method=toy_ae", "backbone=resnet18")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["anomalib-lite: error: method 'toy_ae' trains its own network and takes no backbone: drop backbone=resnet18"]
    assert not (tmp_path / "run").exists()
