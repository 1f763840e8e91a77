"""What a user owns is sacred, and no job is lost without a word.

- A run writes only into a new or empty folder or one of its own earlier runs, and removes only
  the files it wrote; predict and collect likewise in their output folders; the synthetic cache
  never rewrites a folder another run may read.
- A run folder is locked while a run writes into it.
- SIGTERM and SIGINT stop a run with one line and a non-zero status, leaving an earlier run as it was.
- A sweep runs past a failed job and says which failed and which never ran; so does collect.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_COMMON, cli_tiny_args, error_lines, run_cli, run_main
from PIL import Image

from anomalib_lite import collect, predict
from anomalib_lite.data import SyntheticDataModule, generate_category
from anomalib_lite.errors import UserInputError
from anomalib_lite.run_dir import LOCK, STAGING


def digest(files: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def put_user_files(folder: Path, *names: str) -> list[Path]:
    """Files of the user's, each with its own content."""
    files = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the user's {name}".encode())
        files.append(path)
    return files


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_category(root, "weave", image_size=64, num_train=8, num_test_good=2, num_test_per_defect=1)
    return root


def mvtec_args(data_root: Path, cache_dir: Path, run_dir: Path, *more: str) -> list[str]:
    return [
        "dataset=mvtec", f"dataset.root={data_root}", "dataset.category=weave", *TINY_COMMON, "dataset.image_size=64", "dataset.crop_size=null",
        f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *more,
    ]


# -- a run touches only what it wrote -----------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_untouched(overwrite: bool, data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "mine"
    files = put_user_files(run_dir, "logs/important.txt", "heatmaps/mine.png", "predict/keep.txt", "train.log")
    before = digest(files)
    code, stderr = run_main(mvtec_args(data_root, cache_dir, run_dir, f"overwrite={str(overwrite).lower()}"), capsys)
    assert code == 2 and len(error_lines(stderr)) == 1, stderr
    assert "is not empty and holds no anomalib-lite run (e.g. heatmaps)" in error_lines(stderr)[0]
    assert digest(files) == before
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()) == [
        "heatmaps/mine.png", "logs/important.txt", "predict/keep.txt", "train.log",
    ]


def test_an_empty_folder_takes_a_run(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, stderr = run_main(mvtec_args(data_root, cache_dir, tmp_path / "empty"), capsys)
    assert code == 0, stderr
    assert (tmp_path / "empty" / "metrics.json").is_file()


def test_user_files_survive_every_command(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    """Files of the user's in a run dir, an output dir, a sweep dir and a cache dir, byte for byte after every command."""
    run_dir = tmp_path / "run"
    code, stderr = run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)
    assert code == 0, stderr
    user_files = put_user_files(run_dir, "logs/important.txt", "heatmaps/mine.png", "notes.txt", "checkpoints/old.ckpt")
    own_cache = tmp_path / "cache"
    user_files += put_user_files(own_cache, "mine.txt", "synthetic/mine.txt", "synthetic/stripes/train/good/000.png")
    images = tmp_path / "images"
    user_files += put_user_files(images, "notes/my_precious.txt", "predictions.txt")
    for name in ("a.png", "b.png"):
        Image.open(next((data_root / "weave" / "test" / "good").glob("*.png"))).save(images / name)
    sweep = tmp_path / "sweep"
    user_files += put_user_files(sweep, "results.csv", "notes.md")
    before = digest(user_files)

    # a run over its own earlier run (overwrite), a run on the synthetic data into a user's cache dir
    assert run_main(mvtec_args(data_root, cache_dir, run_dir, "overwrite=true", "seed=1"), capsys)[0] == 0
    assert run_main([*cli_tiny_args(own_cache), "dataset.image_size=64", "dataset.generated_size=64",
                     f"hydra.run.dir={tmp_path / 'synthetic_run'}"], capsys)[0] == 0
    # predict into the images folder itself, twice (the second replaces only its own files)
    for extra in ([], ["--overwrite"]):
        assert predict.main([str(run_dir), str(images), "--output", str(images), "--workers", "0", *extra]) == 0
    rows = (images / "predictions.csv").read_text().strip().splitlines()[1:]
    assert sorted(Path(row.split(",")[0]).name for row in rows) == ["a.png", "b.png"]  # outputs never read as inputs
    # collect into a sweep folder that has a results.csv of the user's: refused; elsewhere it writes
    (sweep / "run").mkdir()
    (sweep / "run" / "metrics.json").write_text((run_dir / "metrics.json").read_text())
    assert collect.main([str(sweep)]) == 2
    assert "results.csv exists and was not written by anomalib-lite-collect" in capsys.readouterr().err
    assert collect.main([str(sweep), "--csv", str(sweep / "table.csv")]) == 0
    assert collect.main([str(sweep), "--csv", str(sweep / "table.csv")]) == 0  # its own file: replaced

    assert digest(user_files) == before
    assert json.loads((run_dir / "metrics.json").read_text())["seed"] == 1


def test_predict_replaces_only_its_own_files_and_only_when_asked(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    output = tmp_path / "out"
    user_files = put_user_files(output, "heatmaps/my_precious.png")
    before = digest(user_files)
    test_good = data_root / "weave" / "test" / "good"
    assert predict.main([str(run_dir), str(test_good), "--output", str(output), "--workers", "0"]) == 0
    assert predict.main([str(run_dir), str(test_good), "--output", str(output), "--workers", "0"]) == 2
    assert "already holds predictions.csv: pass --overwrite" in capsys.readouterr().err
    assert predict.main([str(run_dir), str(test_good), "--output", str(output), "--workers", "0", "--overwrite", "--max-heatmaps", "0"]) == 0
    assert sorted(p.name for p in (output / "heatmaps").rglob("*.png")) == ["my_precious.png"]
    assert digest(user_files) == before
    # A file of the user's where a heatmap would go: refused before anything is written.
    clash = output / "heatmaps" / "000_png.png"
    clash.write_bytes(b"the user's")
    assert predict.main([str(run_dir), str(test_good), "--output", str(output), "--workers", "0", "--overwrite"]) == 2
    assert "000_png.png exists and was not written by anomalib-lite-predict" in capsys.readouterr().err
    assert clash.read_bytes() == b"the user's"


def test_every_input_gets_its_own_heatmap(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    """a.png, a.PNG, a.jpg in one folder, and the same names again in a second folder: six heatmaps."""
    run_dir = tmp_path / "run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    source = Image.open(next((data_root / "weave" / "test" / "good").glob("*.png")))
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        for name in ("a.png", "a.PNG", "a.jpg"):
            source.save(tmp_path / folder / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    output = tmp_path / "out"
    assert predict.main([str(run_dir), str(tmp_path / "first"), str(tmp_path / "second"), "--output", str(output), "--workers", "0"]) == 0
    assert len(list((output / "heatmaps").rglob("*.png"))) == 6
    assert len((output / "predictions.csv").read_text().strip().splitlines()) == 7


# -- the synthetic cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["dataset.generated_size=64,96", "dataset.image_size=64,96"])
def test_a_parallel_sweep_over_data_settings_from_an_empty_cache_finishes_every_job(setting: str, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=padim", *TINY_COMMON,
        "dataset.num_train=12", "dataset.num_test_good=4", "dataset.num_test_per_defect=2", "dataset.image_size=64", setting,
        f"paths.cache_dir={tmp_path / 'empty_cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    assert "2 of 2 jobs finished" in result.stderr
    # Lightning's device lines, tips and "fit stopped" stay out of a sweep's output, as out of a single run's.
    assert "GPU available" not in result.stderr + result.stdout and "stopped" not in result.stderr + result.stdout


def test_other_generation_settings_never_rewrite_a_cached_category(tmp_path: Path) -> None:
    """A run with other generation settings reads its own folder: the first run's files stay as they were."""
    settings = {"root": tmp_path, "category": "stripes", "num_train": 6, "num_test_good": 2, "num_test_per_defect": 1,
                "image_size": 64, "num_workers": 0, "val_ratio": 0.2}
    first = SyntheticDataModule(generated_size=64, **settings)
    first.setup()
    files = [s.image_path for s in first.train_samples + first.val_samples + first.test_samples]
    before = digest(files)
    second = SyntheticDataModule(generated_size=96, **settings)
    second.setup()
    assert digest(files) == before
    assert Image.open(second.test_samples[0].image_path).size == (96, 96)
    with pytest.raises(UserInputError, match="generated with other settings"):  # never deleted, even when asked directly
        generate_category(first.root, "stripes", image_size=32, num_train=6, num_test_good=2, num_test_per_defect=1)
    assert digest(files) == before


# -- the lock ---------------------------------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    """Another process writes into the folder (it holds the lock): the run is refused and touches nothing."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from anomalib_lite.run_dir import RunDirLock; "
         f"RunDirLock.acquire(Path({str(run_dir)!r})); (Path({str(run_dir)!r}) / '.incomplete').mkdir(); "
         f"(Path({str(run_dir)!r}) / '.incomplete' / '.anomalib_lite_staging').touch(); "
         f"(Path({str(run_dir)!r}) / '.incomplete' / 'train.log').write_text('first run'); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, stderr = run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)
        assert code == 2 and f"another anomalib-lite run is writing into {run_dir} (process {holder.pid})" in error_lines(stderr)[0]
        assert (run_dir / STAGING / "train.log").read_text() == "first run"
        assert not (run_dir / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    code, stderr = run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)  # the lock went with its process
    assert code == 0, stderr
    assert (run_dir / LOCK).is_file() and (run_dir / "metrics.json").is_file()


# -- signals ------------------------------------------------------------------------------------------------------------
def _interrupt_fit(signal_number: int, data_root: Path, cache_dir: Path, run_dir: Path, *more: str) -> subprocess.CompletedProcess:
    """A long fit, stopped by `signal_number` once it has started training."""
    log = run_dir.parent / f"{run_dir.name}.out"
    with log.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "anomalib_lite", *mvtec_args(data_root, cache_dir, run_dir, "method=ae", "method.epochs=500", *more)],
            cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        deadline = time.monotonic() + 120
        while "fitting on" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # inside the epochs
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(), stderr)


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_in_one_line_and_keeps_the_earlier_run(
    signal_number: int, status: int, data_root: Path, cache_dir: Path, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    earlier = digest([p for p in run_dir.rglob("*") if p.is_file() and LOCK not in p.name])
    result = _interrupt_fit(signal_number, data_root, cache_dir, run_dir, "overwrite=true")
    name = signal.Signals(signal_number).name
    assert result.returncode == status, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"anomalib-lite: error: interrupted by {name}: the run stopped; an earlier finished run in its folder is as it was"
    ]
    assert "Traceback" not in result.stdout
    assert digest([p for p in run_dir.rglob("*") if p.is_file() and LOCK not in p.name and STAGING not in p.parts]) == earlier
    assert f"the run failed: interrupted by {name}" in (run_dir / STAGING / "train.log").read_text()


# -- sweeps -------------------------------------------------------------------------------------------------------------
def test_a_sweep_runs_past_a_failed_job_and_collect_names_failed_and_missing_jobs(tmp_path: Path, cache_dir: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "method=padim", "dataset.category=stripes,nosuch,disc", *cli_tiny_args(cache_dir), "dataset.image_size=64",
        "dataset.generated_size=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert sorted(json.loads(p.read_text())["category"] for p in sweep.glob("*/metrics.json")) == ["disc", "stripes"]
    # The folder names the backbone as metrics.json does (the model's name, not the config option's).
    assert all(json.loads(p.read_text())["backbone"] in p.parent.name for p in sweep.glob("*/metrics.json"))
    assert "job 1 (1_padim_tf_efficientnet_lite0_nosuch) failed: unknown synthetic category 'nosuch'" in result.stderr
    assert "anomalib-lite: 2 of 3 jobs finished" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout

    for job in sweep.glob("2_*"):
        for path in sorted(job.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        job.rmdir()  # as if the sweep had been killed before its last job
    assert collect.main([str(sweep)]) == 1
    out = capsys.readouterr().out
    assert "1 runs ->" in out and "1 failed and 1 never ran:" in out
    assert "failed: " in out and "1_padim_tf_efficientnet_lite0_nosuch (unknown synthetic category 'nosuch'" in out
    assert "never ran: method=padim dataset.category=disc" in out


# -- one line, not a traceback ---------------------------------------------------------------------------------
def test_predict_on_a_device_this_machine_lacks_is_one_line(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    for device, words in (("cuda", "--device cuda: this machine has no CUDA device"), ("tpu:0", "--device tpu:0: not a device"), ("mps", "--device mps: only cpu and cuda")):
        assert predict.main([str(run_dir), str(data_root), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]


def _non_utf8_name(folder: Path) -> Path:
    name = os.fsdecode(b"part_\xff.png")  # a byte that is not UTF-8
    path = folder / name
    Image.new("RGB", (64, 64), (90, 90, 90)).save(os.fsencode(path), format="PNG")
    return path


def test_a_file_name_that_is_not_utf8_is_one_line_before_the_fit(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    generate_category(root, "weave", image_size=64, num_train=8, num_test_good=2, num_test_per_defect=1)
    _non_utf8_name(root / "weave" / "test" / "good")
    code, stderr = run_main(mvtec_args(root, cache_dir, tmp_path / "run"), capsys)
    assert code == 2 and "file name is not valid UTF-8: " in error_lines(stderr)[0] and "part_\\xff.png" in error_lines(stderr)[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused while reading the folders, before any fit

    run_dir = tmp_path / "good_run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    (tmp_path / "images").mkdir()
    _non_utf8_name(tmp_path / "images")
    assert predict.main([str(run_dir), str(tmp_path / "images"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file name is not valid UTF-8" in err[0]


def test_a_mask_threshold_above_every_mask_is_one_line(data_root: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    code, stderr = run_main(mvtec_args(data_root, cache_dir, tmp_path / "run", "dataset.mask_threshold=255"), capsys)
    assert code == 2, stderr
    assert "dataset.mask_threshold=255: no pixel of the 4 defect masks is above it" in error_lines(stderr)[0]
    assert "Traceback" not in stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_predict_interrupted_is_one_line_and_restores_the_signal_handlers(
    data_root: Path, cache_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    assert run_main(mvtec_args(data_root, cache_dir, run_dir), capsys)[0] == 0
    batches = predict.predict_batches

    def interrupted_batches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C while scoring
        yield from batches(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_batches", interrupted_batches)
    before = signal.getsignal(signal.SIGINT)
    assert predict.main([str(run_dir), str(data_root / "weave" / "test"), "--output", str(tmp_path / "out"), "--workers", "0"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["anomalib-lite-predict: error: interrupted by SIGINT: predictions.csv was not written"]
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_crafted_file_list_removes_nothing_outside_its_folder(tmp_path: Path) -> None:
    """A shared run folder's list naming `../x` or a path through a link out of the folder: those stay."""
    from anomalib_lite.run_dir import RUN_RECORD, OwnedFiles

    outside = put_user_files(tmp_path / "home", "important.txt", "deep/notes.txt")
    run_dir = tmp_path / "shared_run"
    run_dir.mkdir()
    (run_dir / "link").symlink_to(tmp_path / "home")
    own = put_user_files(run_dir, "metrics.json")
    (run_dir / RUN_RECORD).write_text(json.dumps({"files": ["../home/important.txt", "link/important.txt", "link/deep/notes.txt", "metrics.json"]}))
    before = digest(outside)
    OwnedFiles(run_dir, RUN_RECORD).remove_listed()
    assert digest(outside) == before and not own[0].exists()
