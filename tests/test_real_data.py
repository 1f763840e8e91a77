"""Opt-in real-data checks on ../shared/datasets (pytest -m slow; minutes each on 2 CPU cores).

The bars are the numbers anomalib 2.7 reached here with the same weights and settings
(EfficientNet-Lite0 offline weights, 256 -> 224): see experiments/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_lite.train import run

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "mvtec_ad" / "bottle").is_dir(), reason="needs ../shared/datasets"),
]

# (experiment, method) -> minimum image AUROC, pixel AUROC, AUPRO
BARS = {
    ("lite0_mvtec", "patchcore"): (1.000, 0.979, 0.918),
    ("lite0_mvtec", "padim"): (0.998, 0.977, 0.908),
    ("lite0_mtd", "padim"): (0.915, 0.766, 0.736),
}
# Measured shortfalls, kept visible rather than loosened (experiments/RESULTS.md has the numbers).
SHORT_OF_BAR = {
    ("lite0_mvtec", "patchcore"): "image AUROC 0.9992: one good image (good/001, a bright spot) outranks one contamination image",
    ("lite0_mtd", "padim"): "d = 100, our seed-0 channel draw: 0.907 / 0.762 / 0.732 < 0.915 / 0.766 / 0.736 (anomalib's draw)",
}


@pytest.mark.parametrize(
    ("experiment", "method"),
    [pytest.param(*key, marks=pytest.mark.xfail(reason=SHORT_OF_BAR[key], strict=True)) if key in SHORT_OF_BAR else key for key in BARS],
)
def test_matches_the_anomalib_bar(experiment: str, method: str, make_cfg) -> None:
    cfg = make_cfg(f"experiment={experiment}", f"method={method}", f"paths.data_dir={DATA}", "~callbacks.progress", tiny=False)
    results = run(cfg)
    image, pixel, pro = BARS[(experiment, method)]
    # Scores as printed to three decimals, like the bar.
    assert round(results["image_auroc"], 3) >= image
    assert round(results["pixel_auroc"], 3) >= pixel
    assert round(results["pixel_aupro"], 3) >= pro


def test_patchcore_on_magnetic_tile_jpegs(make_cfg) -> None:
    cfg = make_cfg("experiment=lite0_mtd", "method=patchcore", f"paths.data_dir={DATA}", "~callbacks.progress", tiny=False)
    results = run(cfg)
    assert results["image_auroc"] > 0.8 and results["pixel_aupro"] > 0.6
