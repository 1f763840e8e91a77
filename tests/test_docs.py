"""The documents quote their sources rather than copies: experiments/PEERS.md and README's comparison
table are what experiments/bench_peers.py writes from the committed result files (experiments/peers/),
and every figure README's results section gives is in the experiments/ document it comes from."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"(?<![\d.])[01]\.\d{3,4}(?![\d.])")  # a metric as the documents print it: 0.9841, 1.0000


@pytest.fixture(scope="module")
def bench_peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "experiments" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_peers", module)
    spec.loader.exec_module(module)
    return module


def results_section(readme: str) -> str:
    return readme[readme.index("## Results and benchmarks"):]


def test_peers_document_is_what_its_result_files_give(bench_peers) -> None:
    rows = bench_peers.load_rows()
    assert rows, "no result files in experiments/peers"
    assert bench_peers.DOCUMENT.read_text() == bench_peers.render_document(rows), (
        "experiments/PEERS.md differs from its result files: python experiments/bench_peers.py --report-only"
    )


def test_readme_comparison_is_what_the_result_files_give(bench_peers) -> None:
    readme = bench_peers.README.read_text()
    expected = bench_peers.with_summary(readme, bench_peers.render_summary(bench_peers.load_rows()))
    assert readme == expected, "README's comparison table differs from experiments/peers: bench_peers.py --report-only"


def test_every_readme_result_is_in_an_experiments_document(bench_peers) -> None:
    section = results_section(bench_peers.README.read_text())
    start, end = section.index(bench_peers.SUMMARY_BEGIN), section.index(bench_peers.SUMMARY_END)
    quoted = section[:start] + section[end:]  # the generated table is checked above
    sources = "\n".join(path.read_text() for path in (ROOT / "experiments").glob("*.md"))
    figures = set(FIGURE.findall(quoted))
    assert len(figures) > 100, "the results section lost its figures (or the pattern no longer finds them)"
    assert not sorted(figures - set(FIGURE.findall(sources))), "README figures in no experiments/*.md"


def test_a_gap_beyond_the_seed_spread_is_flagged(bench_peers) -> None:
    def row(side: str, seed: int, value: float) -> dict:
        return {"method": "padim", "dataset": "bottle", "side": side, "seed": seed, "image_auroc": value,
                "pixel_auroc": 0.9, "pixel_aupro": 0.8, "pixel_ap": 0.5, "fit_seconds": 1, "test_seconds": 1,
                "num_fitted": 10}

    close = [row("ours", s, 0.90 + 0.01 * s) for s in range(3)] + [row("anomalib", s, 0.92) for s in range(3)]
    far = [row("ours", s, 0.80 + 0.01 * s) for s in range(3)] + [row("anomalib", s, 0.92) for s in range(3)]
    (within,), (beyond,) = bench_peers.comparisons(close), bench_peers.comparisons(far)
    assert within.below() == [] and beyond.below() == ["image AUROC"]
    assert "| padim | bottle | 3 | 0.8100 / 0.9000 / 0.8000 | 0.9200 / 0.9000 / 0.8000 | image AUROC |" in (
        bench_peers.render_summary(far)
    )
