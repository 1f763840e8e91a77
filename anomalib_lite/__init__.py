"""anomalib-lite: unsupervised image anomaly detection experiments (PatchCore, PaDiM, ...)."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def export(run_dir: str | Path, format: str, output: str | Path, overwrite: bool = False) -> Path:
    """A finished run's model as one self-contained artefact (onnx, openvino or torchscript) in
    `output`: see `anomalib_lite.deploy`. Imported on call: `import anomalib_lite` stays light."""
    from anomalib_lite.deploy import export as export_run

    return export_run(run_dir, format, output, overwrite)
