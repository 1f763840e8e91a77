"""anomalib-lite: unsupervised image anomaly detection experiments (PatchCore, PaDiM, ...)."""

__version__ = "0.1.0"
