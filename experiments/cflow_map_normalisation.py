"""Score one fitted CFLOW-AD run's test set under the map normalisations in use.

CFLOW-AD turns each level's log-likelihood into exp(log p / C - offset) before summing the
levels. Where the offset comes from changes the scores:

- ours: the maximum seen on training fibers, stored with the model (an image's score depends on
  that image alone);
- the paper's code: the maximum over the whole test set;
- anomalib 2.7: the maximum within each test batch, and the summed map is also subtracted from
  its batch maximum, so an image's score depends on the other images of its batch. Scored here
  both in the test set's path order (batches of 32, each defect type in the same batches, as
  anomalib's loader gives them) and in the random orders `anomalib_reference.py --shuffle-test
  SEED` tests anomalib in (pandas' `sample(frac=1, random_state=SEED)` draws the same permutation
  as numpy's `RandomState(SEED).choice`), so both can be compared order by order.

    python experiments/cflow_map_normalisation.py outputs/bench/flows/cflow_mtd_e2_val0003_fused
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anomalib_lite.engine.checkpoint import load_model, run_datamodule
from anomalib_lite.metrics import compute_metrics

SCORES = ("image_auroc", "pixel_auroc", "pixel_aupro")


@torch.no_grad()
def test_log_likelihoods(run: Path) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per level (N, 1, h, w) log p / C of every test image, with labels, masks and the offsets."""
    datamodule = run_datamodule(run)
    datamodule.setup("test")
    module = load_model(run)  # read as data: no code runs from the checkpoint
    model = module.model.eval()
    per_level: list[list[torch.Tensor]] = [[] for _ in model.decoders]
    labels, masks = [], []
    for batch in datamodule.test_dataloader():
        images = batch.image
        for level, (features, conditions, (height, width)) in enumerate(model.fibers(images)):
            log_likelihood = model.log_likelihood_per_dim(level, features, conditions)
            per_level[level].append(log_likelihood.reshape(len(images), 1, height, width))
        labels.append(batch.label)
        masks.append(batch.mask.bool())
        print(f"{len(labels)} test batches", flush=True)
    size = images.shape[-1]
    return [torch.cat(x) for x in per_level], torch.cat(labels), torch.cat(masks), model.likelihood_offset, size


def summed_probability(log_likelihoods: list[torch.Tensor], offsets: list[torch.Tensor], size: int) -> torch.Tensor:
    return sum(
        F.interpolate(torch.exp(ll - offset), size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        for ll, offset in zip(log_likelihoods, offsets)
    )


def per_batch_maps(log_likelihoods: list[torch.Tensor], batch_of: torch.Tensor, size: int) -> torch.Tensor:
    """anomalib's rule: per-batch level offsets, then the batch's maximum minus the map."""
    def batch_max(values: torch.Tensor) -> torch.Tensor:
        maxima = torch.stack([values[batch_of == b].max() for b in range(int(batch_of.max()) + 1)])
        return maxima[batch_of].reshape(-1, *[1] * (values.ndim - 1))

    probability = summed_probability(log_likelihoods, [batch_max(ll) for ll in log_likelihoods], size)
    return batch_max(probability) - probability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an anomalib-lite CFLOW run folder (config.yaml, checkpoints/)")
    parser.add_argument("--batch-size", type=int, default=32, help="anomalib's eval batch size")
    parser.add_argument("--orders", type=int, default=2, help="random test orders (seeds 0, 1, ...) for the per-batch rule")
    args = parser.parse_args()

    log_likelihoods, labels, masks, offsets, size = test_log_likelihoods(args.run)

    def scores(maps: torch.Tensor) -> dict[str, float]:
        result = compute_metrics(maps.flatten(1).amax(dim=1), labels, maps, masks)
        return {name: round(float(result[name]), 4) for name in SCORES}

    results: dict[str, dict[str, float]] = {}
    ours = summed_probability(log_likelihoods, list(offsets.reshape(-1, 1, 1, 1, 1)), size)
    results["ours: training-maximum offsets"] = scores(len(log_likelihoods) - ours)
    paper = summed_probability(log_likelihoods, [ll.max() for ll in log_likelihoods], size)
    results["paper's code: test-set-maximum offsets"] = scores(paper.max() - paper)
    path_order = torch.arange(len(labels)) // args.batch_size
    results["anomalib: per-batch, path order"] = scores(per_batch_maps(log_likelihoods, path_order, size))
    random_orders = []
    for order in range(args.orders):
        # Position i of the shuffled test set holds path-order image permutation[i].
        permutation = np.random.RandomState(order).choice(len(labels), size=len(labels), replace=False)
        batch_of = torch.empty_like(path_order)
        batch_of[torch.from_numpy(permutation)] = path_order
        random_orders.append(scores(per_batch_maps(log_likelihoods, batch_of, size)))
        results[f"anomalib: per-batch, random order {order}"] = random_orders[-1]
    results[f"anomalib: per-batch, random order (mean of {args.orders})"] = {
        name: round(sum(r[name] for r in random_orders) / len(random_orders), 4) for name in SCORES
    }
    for name, values in results.items():
        print(f"{name:48s} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    (args.run / "map_normalisation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
