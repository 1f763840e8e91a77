"""The flow pieces: invertibility, log-determinants against autograd, the position code, and the
methods' likelihood maths on tiny cases."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from anomalib_lite.callbacks.progress import Progress
from anomalib_lite.data import Item, collate_items
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.cflow import Cflow, CflowModel
from anomalib_lite.models.components.flows import (
    conv_flow,
    conv_subnet,
    gaussian_log_likelihood,
    positional_encoding_2d,
    vector_flow,
)
from anomalib_lite.models.components.schedules import warmup_cosine
from anomalib_lite.models.cs_flow import CsFlowModel
from anomalib_lite.models.cs_flow.torch_model import cross_scale_flow
from anomalib_lite.models.fastflow import Fastflow, FastflowModel
from anomalib_lite.models.ss_flow import SsFlowModel
from anomalib_lite.models.ss_flow.subnet import conv_attention_subnet

BACKBONE = {"name": "tf_efficientnet_lite0", "weights": "none"}


def _randomise_zero_inits(module: nn.Module) -> None:
    """Subnets start as identity couplings (zero output layers / gains): make them non-trivial."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.abs().any():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def _flows() -> dict:
    """name -> (flow, example inputs, conditions); every flow the methods build."""
    torch.manual_seed(0)
    ss = conv_flow((4, 1, 1), [conv_attention_subnet(2.0, heads=2)] * 2, clamp=2.0, condition_shape=(4, 1, 1))
    _randomise_zero_inits(ss)
    cs = cross_scale_flow(channels=4, coupling_blocks=2, hidden_channels=8, kernel_sizes=[3, 5], clamp=3.0)
    _randomise_zero_inits(cs)
    return {
        "fastflow_2d": (
            conv_flow((4, 1, 1), [conv_subnet(3), conv_subnet(1)], clamp=2.0),
            [torch.randn(2, 4, 3, 3)], None,
        ),
        "cflow_vector": (vector_flow(6, 4, steps=3), [torch.randn(5, 6)], [torch.randn(5, 4)]),
        "ss_flow_conditional_2d": (ss, [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 3, 3)]),
        "cs_flow_cross_scale": (cs, [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 1, 1)], None),
    }


def _apply(flow, inputs: list[torch.Tensor], conditions, rev: bool = False):
    kwargs = {"rev": rev} | ({"c": conditions} if conditions is not None else {})
    if len(inputs) == 1:
        z, log_jac_det = flow(inputs[0], **kwargs)
        return [z], log_jac_det
    z, log_jac_det = flow(inputs, **kwargs)
    return list(z), log_jac_det


@pytest.mark.parametrize("name", list(_flows()))
def test_flows_are_invertible(name: str) -> None:
    flow, inputs, conditions = _flows()[name]
    with torch.no_grad():
        z, log_det = _apply(flow, inputs, conditions)
        restored, log_det_reverse = _apply(flow, z, conditions, rev=True)
    assert max((a - b).abs().max().item() for a, b in zip(inputs, restored)) < 1e-4
    assert torch.allclose(log_det, -log_det_reverse, atol=1e-4)
    assert log_det.abs().max() > 1e-3, "the test flow must not be the identity"


@pytest.mark.parametrize("name", list(_flows()))
def test_log_determinant_matches_autograd(name: str) -> None:
    flow, inputs, conditions = _flows()[name]
    flow = flow.double()
    sample = [x[:1].double() for x in inputs]
    sample_conditions = [c[:1].double() for c in conditions] if conditions is not None else None
    sizes = [x.numel() for x in sample]

    def flat_map(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(x.shape) for p, x in zip(flat.split(sizes), sample)]
        z, _ = _apply(flow, parts, sample_conditions)
        return torch.cat([zi.flatten() for zi in z])

    flat_input = torch.cat([x.flatten() for x in sample])
    jacobian = torch.autograd.functional.jacobian(flat_map, flat_input)
    sign, expected = torch.linalg.slogdet(jacobian)
    _, log_det = _apply(flow, sample, sample_conditions)
    assert sign.item() != 0
    assert log_det.item() == pytest.approx(expected.item(), abs=1e-6)


def test_positional_encoding_shape_and_values() -> None:
    code = positional_encoding_2d(8, height=3, width=5)
    assert code.shape == (8, 3, 5)
    # First half: x; pairs (sin, cos) of x * 10000^(-4i/8) for i = 0, 1. Second half: the same of y.
    slow = 10000 ** (-4 / 8)
    assert code[0, 2, 3].item() == pytest.approx(math.sin(3))
    assert code[1, 0, 4].item() == pytest.approx(math.cos(4))
    assert code[2, 1, 2].item() == pytest.approx(math.sin(2 * slow))
    assert code[3, 2, 2].item() == pytest.approx(math.cos(2 * slow))
    assert code[4, 2, 0].item() == pytest.approx(math.sin(2))
    assert code[5, 1, 3].item() == pytest.approx(math.cos(1))
    assert code[7, 2, 1].item() == pytest.approx(math.cos(2 * slow))
    # The x half does not change along y, the y half not along x.
    assert torch.equal(code[:4, 0], code[:4, 2]) and torch.equal(code[4:, :, 0], code[4:, :, 4])
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 2, 2)


def test_gaussian_log_likelihood_matches_torch_distributions() -> None:
    z = torch.randn(3, 2, 4, 4)
    log_det = torch.randn(3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) + log_det
    assert torch.allclose(gaussian_log_likelihood(z, log_det), expected, atol=1e-4)


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "fastflow": FastflowModel(BACKBONE, flow_steps=2),
        "cflow": CflowModel(BACKBONE, coupling_blocks=2),
        "cs_flow": CsFlowModel(BACKBONE, coupling_blocks=2, hidden_channels=16, kernel_sizes=[3, 5]),
        "ss_flow": SsFlowModel(BACKBONE, flow_steps=2),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_an_image_scores_the_same_alone_and_in_a_batch(name: str) -> None:
    """No method may normalise by its batch: a test image's score is its own."""
    model = _models()[name].eval()
    _randomise_zero_inits(model)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
    assert together.anomaly_map.shape == (3, 64, 64)
    assert torch.allclose(together.pred_score[1:2], alone.pred_score, rtol=1e-4, atol=1e-5)
    assert torch.allclose(together.anomaly_map[1:2], alone.anomaly_map, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(_models()))
def test_training_lowers_the_normal_loss(name: str) -> None:
    """A few Adam steps on one batch reduce the method's objective (the gradients reach the flow)."""
    model = _models()[name]
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_ss_flow_hinge_is_bounded_and_vanishes_without_anomalies() -> None:
    model = SsFlowModel(BACKBONE, flow_steps=2, anomaly_margin=3.0)
    images = torch.rand(2, 3, 64, 64)
    anomalous = torch.rand(2, 3, 64, 64)
    total, hinge = model.self_supervised_loss(images, anomalous, torch.zeros(2, 64, 64))
    assert hinge.item() == 0 and total.item() == pytest.approx(model.loss(images).item(), rel=1e-5)
    total, hinge = model.self_supervised_loss(images, anomalous, torch.ones(2, 64, 64))
    # A fresh flow maps features to z with mean z^2 near 1: the hinge is active but at most margin / 2.
    assert 0 < hinge.item() <= 1.5
    model.anomaly_weight = 0.0
    total, hinge = model.self_supervised_loss(images, anomalous, torch.ones(2, 64, 64))
    assert hinge.item() == 0 and total.item() == pytest.approx(model.loss(images).item(), rel=1e-5)


def test_cflow_map_uses_the_stored_likelihood_offset() -> None:
    model = CflowModel(BACKBONE, coupling_blocks=2).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images).anomaly_map
        model.likelihood_offset.fill_(1.0)  # every level's probability scaled by exp(-1)
        after = model(images).anomaly_map
    levels = len(model.decoders)
    assert torch.allclose(levels - after, (levels - before) * math.exp(-1), rtol=1e-4)


ADAM = {"model": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-5}}


def test_trained_methods_build_their_optimisers_from_the_config() -> None:
    """Adam from the config, fused where torch has it: the same update as the per-tensor loop
    (which was ~20 % of a CFLOW fiber step); CFLOW builds its one spec once per level."""
    flows = {"flows": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}}
    cflow = Cflow(backbone=BACKBONE, epochs=1, optimizers=flows, coupling_blocks=2)
    fastflow = Fastflow(backbone=BACKBONE, epochs=1, optimizers=ADAM, flow_steps=2)
    configured = [c["optimizer"] for c in cflow.configure_optimizers() + fastflow.configure_optimizers()]
    assert len(configured) == len(cflow.model.decoders) + 1
    for optimizer in configured:
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True
    assert configured[-1].defaults["lr"] == 1e-3 and configured[-1].defaults["weight_decay"] == 1e-5
    assert configured[0].defaults["lr"] == 1e-4
    # The backbone is frozen: only flow parameters are optimised.
    optimised = {id(p) for group in configured[-1].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in fastflow.model.feature_extractor.parameters()}
    # The same update as torch's per-tensor Adam, over a few steps.
    fused_weight, loop_weight = (nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4)) for _ in range(2))
    fused_adam = fastflow.build_optimizer("model", [fused_weight])
    loop_adam = torch.optim.Adam([loop_weight], lr=1e-3, weight_decay=1e-5, foreach=False)
    for step in range(3):
        for weight, optimizer in ((fused_weight, fused_adam), (loop_weight, loop_adam)):
            optimizer.zero_grad()
            (weight.sin() * (step + 1)).sum().backward()
            optimizer.step()
    torch.testing.assert_close(fused_weight, loop_weight)


def test_optimiser_and_scheduler_names_are_checked() -> None:
    with pytest.raises(UserInputError, match="method.schedulers names \\['other'\\]"):
        Fastflow(backbone=BACKBONE, epochs=1, optimizers=ADAM, schedulers={"other": {"_target_": "x"}}, flow_steps=2)
    with pytest.raises(UserInputError, match="method.optimizers is empty"):
        Fastflow(backbone=BACKBONE, epochs=1, optimizers={}, flow_steps=2)
    wrong = Fastflow(backbone=BACKBONE, epochs=1, optimizers={"generator": ADAM["model"]}, flow_steps=2)
    with pytest.raises(UserInputError, match="optimises \\['model'\\]"):
        wrong.configure_optimizers()


def test_a_long_pass_outside_the_loops_reports_its_progress(caplog) -> None:
    """Statistics, calibration and embedding passes have no Lightning bar: they log their own lines."""
    module = Fastflow(backbone=BACKBONE, epochs=1, optimizers=ADAM, flow_steps=2)

    def attach(interval: float) -> None:  # the run's trainer, with its progress callback in lines mode
        module.trainer = L.Trainer(callbacks=[Progress(mode="lines", interval=interval)], logger=False, enable_checkpointing=False)

    loader = [
        collate_items([Item(torch.rand(3, 8, 8), torch.zeros(8, 8), i % 2, 2 * b + i, "good", "x.png", True) for i in range(2)])
        for b in range(3)
    ]
    with caplog.at_level("INFO"):
        attach(interval=1e9)
        rows = module.gather_over(loader, lambda images: images.mean((1, 2, 3)), what="calibration")
    assert rows.shape == (6,) and "calibration" not in caplog.text  # a short pass stays quiet
    with caplog.at_level("INFO"):
        attach(interval=0)
        rows = module.gather_over(loader, lambda images: images.mean((1, 2, 3)), normal_only=True, what="calibration")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration")]
    assert rows.shape == (3,) and lines == ["calibration: 1/3 batches, 0 s", "calibration: 2/3 batches, 0 s", "calibration: 3 batches in 0 s"]


def test_warmup_cosine_schedule_by_hand() -> None:
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=100, warmup_fraction=0.1, start_ratio=0.1, final_ratio=0.0)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    at_warmup_end = (1 + math.cos(math.pi * 0.1)) / 2
    assert rates[0] == pytest.approx(0.1)
    assert rates[5] == pytest.approx(0.1 + (at_warmup_end - 0.1) * 0.5)  # linear half way through the warm-up
    assert rates[10] == pytest.approx(at_warmup_end) and rates[50] == pytest.approx(0.5)  # cosine from there on
    assert rates[99] == pytest.approx((1 + math.cos(math.pi * 0.99)) / 2)


def test_cs_flow_state_dict_names_the_same_node_in_every_construction() -> None:
    """FrEIA orders sibling nodes by object hash; the checkpoint must not depend on that order:
    a flow rebuilt and loaded from another's state_dict computes the same z, also when the
    state_dict holds the permutations in other slots (checkpoints written before the fix)."""

    maps = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    torch.manual_seed(0)
    source = cross_scale_flow(8, 2, 8, [3, 3], 3.0)
    with torch.no_grad():
        for parameter in source.parameters():
            if parameter.is_floating_point():
                parameter.normal_(0, 0.3)  # gains start at zero: every coupling would be the identity
        expected, _ = source(maps)
    state = source.state_dict()
    scrambled = dict(state)
    for key in ("module_list.1.perm", "module_list.1.perm_inv"):  # block 0: scale 0's and scale 2's swapped
        other = key.replace("list.1.", "list.3.")
        scrambled[key], scrambled[other] = state[other], state[key]
    for loaded in (state, scrambled) * 3:
        rebuilt = cross_scale_flow(8, 2, 8, [3, 3], 3.0)
        rebuilt.load_state_dict(loaded)
        with torch.no_grad():
            result, _ = rebuilt(maps)
        for a, b in zip(expected, result):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
