"""Write the frozen encoder of a fitted anomalib checkpoint as a timm state dict, for
`backbone.weights=<file>`: ours then runs on the very encoder anomalib's run had.

With random encoders (`reverse_distillation_resnet18_random`: no ResNet ImageNet weights install
here) each seed draws another encoder, and the encoder, not the code, dominates the score spread;
the same encoder on both sides compares the code.

    ../venv-anomalib/bin/python experiments/export_anomalib_encoder.py CHECKPOINT OUT.pth --trust-checkpoint  # anomalib's venv
    anomalib-lite ... backbone=resnet18 backbone.weights=OUT.pth
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

# anomalib's TimmFeatureExtractor holds the timm model under this name.
PREFIX = "model.encoder.feature_extractor."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="an anomalib model.ckpt")
    parser.add_argument("out", type=Path, help="the .pth to write")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="anomalib checkpoints pickle objects (its pre- and post-processors), so reading one runs code: only for a "
        "checkpoint you wrote yourself; without this flag it is read as data only",
    )
    args = parser.parse_args()
    try:
        stored = torch.load(args.checkpoint, map_location="cpu", weights_only=not args.trust_checkpoint)
    except pickle.UnpicklingError:
        raise SystemExit(
            f"{args.checkpoint} needs code to be read: pass --trust-checkpoint only if you wrote it yourself"
        ) from None
    state = stored["state_dict"]
    encoder = {key.removeprefix(PREFIX): tensor for key, tensor in state.items() if key.startswith(PREFIX)}
    if not encoder:
        raise SystemExit(f"{args.checkpoint} holds no {PREFIX}* tensors (not an anomalib model with a timm encoder?)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, args.out)
    print(f"{len(encoder)} tensors -> {args.out}")


if __name__ == "__main__":
    main()
