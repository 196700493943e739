"""Faults tried on purpose during training (issue 13, deliverable 3): kill -9 at chosen moments, a full disk,
truncated and swapped checkpoints, two trainings of one fold at once.

The kills are real: one subprocess imports samunet once and forks a ``samunet_train`` per scenario, each
child SIGKILLing itself at its moment (no hook in samunet's code). Its fold folders are kept as snapshots;
each test restores the one it needs into a fold folder of its own and continues it in this process.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from samunet.cli.common import describe_storage_error, run_cli
from samunet.cli.train import main as train_main, train
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.checkpoints import CheckpointUnreadableError, read_checkpoint, save_checkpoint_atomically
from samunet.trainers.progress_png import AtomicProgressLogger
from samunet.trainers.run_identity import CheckpointMismatchError, check_checkpoint_identity
from samunet.trainers.run_lock import hold_fold_folder

pytestmark = pytest.mark.slow

FINAL_VALIDATION = SAMTrainerBase.perform_actual_validation  # the `results` fixture switches it off

DATASET = "Dataset991_PhantomTiny"
OTHER_DATASET = "Dataset992_PhantomOther"
MODEL = "SAMedTrainer__samunetPlans__2d"
TINY = ["-tr", "SAMedTrainer", "-device", "cpu", "--iters-per-epoch", "1", "--val-iters", "1", "--batch-size", "2",
        "--weights", "none"]
# name: (fold, epochs, where the child kills itself: ("epoch", N) at the start of epoch N (0-based), ("write", NAME)
# halfway through writing checkpoint NAME, "" meaning the first checkpoint written)
SCENARIOS = {
    "in_epoch_5_of_6": (0, 6, ("epoch", "4")),
    "while_final_is_written": (1, 2, ("write", "checkpoint_final.pth")),
    "during_first_checkpoint": (2, 3, ("write", "")),
}
DRIVER = r'''
import io, json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
from samunet.cli.train import main
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.progress_png import AtomicProgressLogger


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_epoch(epoch):
    start = SAMTrainerBase.on_train_epoch_start
    def on_train_epoch_start(self):
        if self.current_epoch == epoch:
            die()
        start(self)
    SAMTrainerBase.on_train_epoch_start = on_train_epoch_start


def kill_while_writing(name):
    save, real_torch_save = SAMTrainerBase.save_checkpoint, torch.save
    def save_checkpoint(self, filename):
        if name in ("", os.path.basename(filename)):
            def half_then_die(obj, stream, *args, **kwargs):
                buffer = io.BytesIO()
                real_torch_save(obj, buffer)
                stream.write(buffer.getvalue()[: buffer.tell() // 2])
                stream.flush()
                die()
            torch.save = half_then_die
        save(self, filename)
    SAMTrainerBase.save_checkpoint = save_checkpoint


AtomicProgressLogger.plot_progress_png = lambda self, folder: None  # 1.3 s an epoch, and not what is tried here
statuses = {}
for name, scenario in json.loads(sys.argv[1]).items():
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            kind, point = scenario["kill"]
            kill_in_epoch(int(point)) if kind == "epoch" else kill_while_writing(point)
            code = main(scenario["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    statuses[name] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
print(json.dumps(statuses))
'''


def fold_folder(results: Path, fold: int | str, dataset: str = DATASET) -> Path:
    return results / dataset / MODEL / f"fold_{fold}"


@pytest.fixture(scope="module")
def killed_runs(tiny_dataset_root, tmp_path_factory) -> dict:
    """A copy of the tiny planned data set, the scenarios' fold folders as the killed children left them
    (under ``snapshots``), and the children's exit statuses."""
    root = tmp_path_factory.mktemp("faults")
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(tiny_dataset_root / name, root / name)
    (root / "nnUNet_results").mkdir()
    scenarios = {name: {"argv": [DATASET, "2d", str(fold), *TINY, "--num-epochs", str(epochs)], "kill": kill}
                 for name, (fold, epochs, kill) in SCENARIOS.items()}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
                   **{name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(scenarios)], env=environment,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    statuses = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (fold, _, _) in SCENARIOS.items():
        shutil.copytree(fold_folder(root / "nnUNet_results", fold), root / "snapshots" / name)
    return {"root": root, "statuses": statuses, "stderr": run.stderr}


@pytest.fixture
def results(killed_runs, monkeypatch) -> Path:
    """The copied data set's nnU-Net folders for one test (nnUNet_results returned); no progress.png drawing
    and no final validation in this process (both are nnU-Net's, and cost seconds)."""
    root = killed_runs["root"]
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(root / name))
    monkeypatch.setattr(AtomicProgressLogger, "plot_progress_png", lambda self, folder: None)
    monkeypatch.setattr(SAMTrainerBase, "perform_actual_validation", lambda self, npz=False: None)
    torch.set_num_threads(1)
    return root / "nnUNet_results"


def restore(killed_runs, scenario: str, target: Path) -> Path:
    """The scenario's fold folder, as its child left it, copied to ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(killed_runs["root"] / "snapshots" / scenario, target)
    return target


def log_text(folder: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(folder.glob("training_log_*.txt")))


def test_kill_in_epoch_5_of_6_loses_only_that_epoch_and_leaves_no_lock(killed_runs, results):
    """Row 'kill -9 in epoch 5 of a 6-epoch run': checkpoint_latest.pth is written after every epoch, so --c
    continues at epoch 5 (index 4), not at nnU-Net's last multiple of 50; the killed run's lock is gone."""
    assert killed_runs["statuses"]["in_epoch_5_of_6"] == -signal.SIGKILL, killed_runs["stderr"][-2000:]
    folder = restore(killed_runs, "in_epoch_5_of_6", fold_folder(results, 0))
    assert read_checkpoint(folder / "checkpoint_latest.pth")["current_epoch"] == 4
    trainer = train(991, "2d", 0, "SAMedTrainer", device="cpu", continue_training=True)  # the lock is free
    assert trainer.current_epoch == 6 and trainer.num_iterations_per_epoch == 1
    assert "checkpoint_latest.pth: 4 epoch(s) done" in log_text(folder)
    assert read_checkpoint(folder / "checkpoint_final.pth")["current_epoch"] == 6


def test_kill_while_the_final_checkpoint_is_written_resumes_after_the_last_epoch(killed_runs, results):
    """Row 'kill -9 while checkpoint_final.pth is written': checkpoint_latest.pth holds the last epoch too, so
    --c trains no epoch again; the killed write's .partial_*.pth is removed at the start."""
    assert killed_runs["statuses"]["while_final_is_written"] == -signal.SIGKILL
    folder = restore(killed_runs, "while_final_is_written", fold_folder(results, 1))
    assert list(folder.glob(".partial_*.pth")) and not (folder / "checkpoint_final.pth").exists()
    with mock.patch.object(SAMTrainerBase, "train_step", side_effect=AssertionError("an epoch ran again")):
        trainer = train(991, "2d", 1, "SAMedTrainer", device="cpu", continue_training=True)
    assert trainer.current_epoch == 2
    assert read_checkpoint(folder / "checkpoint_final.pth")["current_epoch"] == 2
    assert not list(folder.glob(".partial_*"))


def test_kill_during_the_first_checkpoint_write_keeps_the_run_settings(killed_runs, results):
    """Row 'kill -9 during the first checkpoint write, then --c': no checkpoint exists, and --c starts over
    with the settings recorded before the first epoch (not the trainer's 250 iterations), saying so."""
    assert killed_runs["statuses"]["during_first_checkpoint"] == -signal.SIGKILL
    folder = restore(killed_runs, "during_first_checkpoint", fold_folder(results, 2))
    assert not list(folder.glob("checkpoint_*.pth"))
    with mock.patch.object(SAMTrainerBase, "run_training", lambda self: None):
        trainer = train(991, "2d", 2, "SAMedTrainer", device="cpu", continue_training=True)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 1, 1)
    assert trainer.pretrained_weights == "none" and trainer.hyperparameters["batch_size"] == 2
    assert "no checkpoint" in log_text(folder) and "settings recorded in samunet_settings.json" in log_text(folder)


def test_a_truncated_latest_checkpoint_is_named_and_the_newest_intact_one_used(killed_runs, results, capsys):
    """Row 'truncated checkpoint_latest.pth, then --c': the file is named, --c continues from
    checkpoint_best.pth and says so; with no intact checkpoint it refuses in one line."""
    folder = restore(killed_runs, "in_epoch_5_of_6", fold_folder(results, 3))
    best_epoch = read_checkpoint(folder / "checkpoint_best.pth")["current_epoch"]
    latest = folder / "checkpoint_latest.pth"
    latest.write_bytes(latest.read_bytes()[:4000])
    with mock.patch.object(SAMTrainerBase, "run_training", lambda self: None):
        trainer = train(991, "2d", 3, "SAMedTrainer", device="cpu", continue_training=True)
    assert trainer.current_epoch == best_epoch
    log = log_text(folder)
    assert f"{latest} cannot be read" in log
    assert f"continuing from the newest checkpoint that can be read instead: {folder / 'checkpoint_best.pth'}" in log
    (folder / "checkpoint_best.pth").write_bytes(b"")
    assert train_main(["991", "2d", "3", *TINY, "--c"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("error: no checkpoint in")
    assert "checkpoint_latest.pth cannot be read" in message
    assert "checkpoint_best.pth cannot be read (it is empty)" in message


@pytest.fixture
def other_dataset(results) -> Path:
    """Dataset992: the tiny data set again under another name (same classes, same plans otherwise)."""
    preprocessed = results.parent / "nnUNet_preprocessed"
    target = preprocessed / OTHER_DATASET
    if not target.exists():
        shutil.copytree(preprocessed / DATASET, target)
        for name, key in (("samunetPlans.json", "dataset_name"), ("dataset.json", "name")):
            content = json.loads((target / name).read_text())
            content[key] = OTHER_DATASET
            (target / name).write_text(json.dumps(content))
    return target


def test_a_checkpoint_of_another_dataset_is_refused_by_continue_and_validate(killed_runs, results, other_dataset):
    """Row 'a checkpoint of another data set (same classes) in the fold folder': it loads into the same network,
    so --c and --val compare the data set and plans it records and refuse it (and --val before the training
    finished is one line, not nnU-Net's RuntimeError)."""
    folder = restore(killed_runs, "in_epoch_5_of_6", fold_folder(results, 0, OTHER_DATASET))
    (folder / "samunet_settings.json").unlink()
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint_latest.pth belongs to {DATASET} with plans "
                                                      f"samunetPlans, not to {OTHER_DATASET}"):
        train(OTHER_DATASET, "2d", 0, "SAMedTrainer", device="cpu", continue_training=True)
    with pytest.raises(CheckpointUnreadableError, match="checkpoint_final.pth does not exist: the training of this "
                                                        "fold has not finished; finish it with --c before --val"):
        train(OTHER_DATASET, "2d", 0, "SAMedTrainer", device="cpu", only_validate=True)
    shutil.copyfile(folder / "checkpoint_latest.pth", folder / "checkpoint_final.pth")
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint_final.pth belongs to {DATASET}"):
        train(OTHER_DATASET, "2d", 0, "SAMedTrainer", device="cpu", only_validate=True)


def test_checkpoint_identity_refuses_other_plans_and_accepts_old_checkpoints_with_a_warning(killed_runs, caplog):
    """``check_checkpoint_identity`` (also prediction's): the same data set re-planned is refused, a checkpoint
    from before the record is accepted with a warning."""
    root = killed_runs["root"]
    checkpoint = read_checkpoint(root / "snapshots" / "in_epoch_5_of_6" / "checkpoint_latest.pth")
    plans = json.loads((root / "nnUNet_preprocessed" / DATASET / "samunetPlans.json").read_text())
    identity = {"dataset_name": DATASET, "plans_identifier": "samunetPlans", "source": "model.pth"}
    check_checkpoint_identity(checkpoint, plans=plans, **identity)
    plans["configurations"]["2d"]["spacing"] = [2.0, 2.0]
    with pytest.raises(CheckpointMismatchError, match="model.pth was written for other samunetPlans plans"):
        check_checkpoint_identity(checkpoint, plans=plans, **identity)
    del checkpoint["samunet"]["identity"]
    check_checkpoint_identity(checkpoint, plans=plans, **identity)
    assert "model.pth records no data set or plans" in caplog.text


def test_a_second_training_of_the_same_fold_is_refused_while_the_first_runs(results, capsys):
    """Row 'two samunet_train into the same fold folder at once': the second stops in one line before writing
    anything there (the lock of a killed run is released by the kernel: see the kill tests' --c)."""
    folder = fold_folder(results, 4)
    with hold_fold_folder(folder):
        assert train_main(["991", "2d", "4", *TINY, "--num-epochs", "1"]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (f"error: {folder} is in use by another samunet_train (process {os.getpid()}); wait until it "
                       f"ends or stop it, then run this command again")
    assert not list(folder.glob("training_log_*"))


def test_training_refuses_half_prepared_data_in_one_line(results, capsys):
    """Row 'kill -9 while planning writes samunetPlans.json / before gt_segmentations is copied': training
    stops in one line naming what is missing and the planning command that repairs it."""
    preprocessed = results.parent / "nnUNet_preprocessed"
    half = preprocessed / "Dataset993_HalfPrepared"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(preprocessed / DATASET, half)
    for name, key in (("samunetPlans.json", "dataset_name"), ("dataset.json", "name")):
        content = json.loads((half / name).read_text())
        content[key] = half.name
        (half / name).write_text(json.dumps(content))
    reference = sorted((half / "gt_segmentations").iterdir())[0]
    reference.unlink()
    with mock.patch.object(SAMTrainerBase, "run_training", lambda self: None):
        assert train_main(["993", "2d", "0", *TINY]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: ")
    assert reference.name.removesuffix(".nii.gz") in message
    assert message.rstrip().endswith("run samunet_plan_and_preprocess -d 993 to repair it")
    plans = half / "samunetPlans.json"
    plans.write_text(plans.read_text()[:100])
    assert train_main(["993", "2d", "0", *TINY]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith(f"error: {plans} cannot be read")


def disk_full_after(half_of: bytes):
    """A write that puts half of ``half_of`` on the disk and then finds it full (as a real full disk does)."""
    def write(stream):
        stream.write(half_of[: len(half_of) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(results, capsys):
    """Row 'disk full during a checkpoint write': one line naming the disk and the file, exit code 2; the
    previous checkpoint is as it was and no partial file stays."""
    folder = fold_folder(results, "all")
    folder.mkdir(parents=True, exist_ok=True)
    previous = b"the previous checkpoint"
    (folder / "checkpoint_latest.pth").write_bytes(previous)
    real_save = torch.save

    def full_disk_save(obj, stream, *args, **kwargs):
        if not hasattr(stream, "write"):
            return real_save(obj, stream, *args, **kwargs)
        disk_full_after(b"x" * 4096)(stream)

    with mock.patch.object(torch, "save", full_disk_save):
        assert train_main(["991", "2d", "all", *TINY, "--num-epochs", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: no space left on the device holding {folder / 'checkpoint_latest.pth'} (mounted at ")
    assert (folder / "checkpoint_latest.pth").read_bytes() == previous
    assert not list(folder.glob(".partial_*"))


def test_disk_full_during_the_final_validation_is_one_line_and_presents_no_cut_off_prediction(results, monkeypatch,
                                                                                          capsys):
    """A full disk while the final validation exports a case: the validation's exports are staged and
    checked as samunet_predict's are, so the command ends with one line naming the prediction, exit code 2,
    and validation/ holds neither the cut-off file nor a scratch folder."""
    from trainer_harness import export_onto_a_full_disk
    monkeypatch.setattr(SAMTrainerBase, "perform_actual_validation", FINAL_VALIDATION)
    monkeypatch.setattr("samunet.trainers.validation.default_num_processes", 1)
    monkeypatch.setattr("samunet.trainers.validation.export_case_atomically", export_onto_a_full_disk)
    assert train_main(["991", "2d", "all", *TINY, "--num-epochs", "1"]) == 2
    validation = fold_folder(results, "all") / "validation"
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    # stderr in the message: CI once saw exit code 2 without an 'error:' line (2026-11-30, not reproduced)
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on the device holding {validation}/"), \
        stderr[-3000:]
    assert not list(validation.iterdir())


def test_disk_full_while_progress_png_is_drawn_keeps_the_previous_png(tmp_path, killed_runs):
    """Row 'disk full during a progress.png write': nnunetv2's figure is drawn into a temporary folder and moved
    into place, so a failed write names progress.png and leaves the previous one whole."""
    import matplotlib.figure
    import matplotlib.pyplot as plt
    logger = AtomicProgressLogger()
    logger.load_checkpoint(read_checkpoint(killed_runs["root"] / "snapshots" / "in_epoch_5_of_6" /
                                           "checkpoint_latest.pth")["logging"])
    (tmp_path / "progress.png").write_bytes(b"previous png")

    def savefig(self, name, *args, **kwargs):
        with open(name, "wb") as stream:
            disk_full_after(b"\x89PNG" * 1000)(stream)

    with mock.patch.object(matplotlib.figure.Figure, "savefig", savefig), pytest.raises(OSError) as raised:
        logger.plot_progress_png(str(tmp_path))
    plt.close("all")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes() == b"previous png"
    assert sorted(os.listdir(tmp_path)) == ["progress.png"]


def test_an_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path):
    """The atomic write itself: a failing write removes its temporary file and keeps the target; a successful
    one is readable with weights_only=True and gets the usual permissions (not mkstemp's 0600)."""
    target = tmp_path / "checkpoint_latest.pth"
    save_checkpoint_atomically({"network_weights": {"w": torch.ones(3)}, "optimizer_state": {}, "current_epoch": 1,
                                "logging": {}}, target)
    assert read_checkpoint(target)["current_epoch"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    before = target.read_bytes()
    with mock.patch.object(torch, "save", lambda obj, stream: disk_full_after(before)(stream)), \
            pytest.raises(OSError, match="No space left") as raised:
        save_checkpoint_atomically({"current_epoch": 2}, target)
    assert raised.value.filename == str(target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == [target.name]
    target.write_bytes(before[: len(before) // 3])
    with pytest.raises(CheckpointUnreadableError, match=f"{target} cannot be read .*truncated"):
        read_checkpoint(target)


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "no space left on the device holding {file} (mounted at "),
    (errno.EDQUOT, "disk quota exceeded on the device holding {file} (mounted at "),
    (errno.EROFS, "the device holding {file} (mounted at "),
    (errno.EACCES, "permission denied for {file}; "),
    (errno.EIO, "{file} could not be written or read completely ("),
    (errno.EEXIST, "{file} exists and is not a folder; "),
    (errno.ENOTDIR, "{file}: a part of this path is a file, not a folder; "),
    (errno.EISDIR, "{file} is a folder, but a file is to be written there; "),
])
def test_every_command_turns_a_full_or_read_only_disk_or_a_colliding_path_into_one_line(code, expected, tmp_path,
                                                                                       capsys):
    """run_cli (every samunet command): a write refused by the storage is one line naming the file, exit 2."""
    file = tmp_path / "out" / "case.nii.gz"

    def command(argv):
        raise OSError(code, os.strerror(code), str(file))

    assert run_cli(command, []) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: " + expected.format(file=file)) and message.count("\n") == 1
    assert describe_storage_error(OSError(errno.EIO, "I/O error")) is None  # no file to name: the traceback says more
    assert describe_storage_error(OSError(errno.ECONNREFUSED, "refused", str(file))) is None


def test_a_full_disk_while_the_validation_summary_is_written_keeps_the_previous_summary(tmp_path):
    """validation/summary.json is nnunetv2's layout written atomically: a write that fills the disk names
    summary.json and leaves the previous summary and no temporary file."""
    from samunet.trainers import validation
    summary = tmp_path / "summary.json"
    summary.write_text('{"previous": true}')

    def save_half(results, output_file):
        Path(output_file).write_text('{"foreground_mean": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch.object(validation, "save_summary_json", save_half), pytest.raises(OSError) as raised:
        validation.save_summary_atomically({"mean": {}, "metric_per_case": []}, str(summary))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(summary)
    assert summary.read_text() == '{"previous": true}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_output_path_that_is_a_file_is_one_line(model, tmp_path, capsys):
    """``samunet_predict -o FILE`` (an existing file where the output folder goes): one line naming it, exit 2."""
    from samunet.cli.predict import main as predict_main
    existing = tmp_path / "existing_file.txt"
    existing.write_text("not a folder")
    for output in (existing, existing / "sub"):
        assert predict_main(["-i", str(model["images"]), "-o", str(output), "-d", "999", "-c", "2d", "-f", "0",
                             "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0",
                             "--disable_progress_bar"]) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and message.startswith(f"error: {output}") and "output path" in message
    assert existing.read_text() == "not a folder"
