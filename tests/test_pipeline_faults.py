"""Faults tried on purpose in planning and prediction (issue 13, deliverable 3): kill -9 at chosen moments
(a subprocess that SIGKILLs itself there), a full disk (a patched writer, or a real ENOSPC from /dev/full),
half-prepared preprocessed data and broken model folders. After each, a re-run repairs everything or the
command refuses in one line naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samunet import staged_writes
from samunet.errors import DatasetError
from samunet.inference import predict_cases
from samunet.preprocessing.completeness import check_preprocessed_dataset
from trainer_harness import PREDICTION_CASES as CASES

DATASET = "Dataset991_PhantomTiny"
PLANNING = dict(backbone="vit_test", image_size=64, num_processes=1, progress_bar=False)


def _die_at(patch: str, call: str) -> subprocess.CompletedProcess:
    """Run ``patch`` (which arranges a SIGKILL at a chosen point) then ``call`` in a fresh interpreter with
    this test's environment; returns the finished process (killed: returncode -9)."""
    script = "import os, signal, json\nfrom pathlib import Path\n" \
             "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n" + textwrap.dedent(patch) + "\n" + call
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


KILL_IN_WRITE_OF = """
import builtins
real_open, real_fdopen = builtins.open, os.fdopen

class DyingStream:  # a file opened for writing; the write holding {marker!r} puts half of it on disk, then kill -9
    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
        if {marker!r} in text:
            self._stream.write(data[:len(data) // 2])
            self._stream.flush()
            die()
        return self._stream.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._stream.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._stream, name)

def dying(stream, mode):
    return DyingStream(stream) if any(flag in mode for flag in "wax") else stream

builtins.open = lambda file, mode="r", *args, **kwargs: dying(real_open(file, mode, *args, **kwargs), mode)
os.fdopen = lambda fd, mode="r", *args, **kwargs: dying(real_fdopen(fd, mode, *args, **kwargs), mode)
"""
PLAN = "from samunet.cli.plan_and_preprocess import plan_and_preprocess\n" \
       "plan_and_preprocess(991, backbone='vit_test', image_size=64, num_processes=1, progress_bar=False, {})"


@pytest.fixture
def tiny_copy(tiny_dataset_root, tmp_path, monkeypatch) -> dict[str, Path]:
    """A private copy of the planned tiny data set (raw and preprocessed), the nnU-Net variables on it."""
    folders = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folders[name] = tmp_path / name
        shutil.copytree(tiny_dataset_root / name, folders[name])
        monkeypatch.setenv(name, str(folders[name]))
    folders["dataset"] = folders["nnUNet_preprocessed"] / DATASET
    return folders


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- planning
def test_kill_while_the_plans_are_written_keeps_the_old_plans_and_a_rerun_repairs(tiny_copy):
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    plans_file = tiny_copy["dataset"] / "samunetPlans.json"
    before = plans_file.read_text()
    killed = _die_at(KILL_IN_WRITE_OF.format(marker='"configurations"'), PLAN.format("clean=False"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert plans_file.read_text() == before  # never half a plans file: the half is in a temporary file
    assert [name.startswith(".samunet_planning_partial_") for name in _hidden(tiny_copy["dataset"])] == [True]
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")  # the data are still complete and consistent
    plan_and_preprocess(991, clean=False, preprocess=False, **PLANNING)
    assert json.loads(plans_file.read_text())["configurations"]["2d"]
    assert _hidden(tiny_copy["dataset"]) == []  # the killed run's temporary file is gone
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")


def test_a_fingerprint_cut_off_by_a_kill_is_extracted_again_without_clean(tiny_copy, monkeypatch, caplog):
    """nnunetv2 writes dataset_fingerprint.json in place, so a kill leaves half of one; the next run without
    --clean extracts it again instead of failing on it (nnunetv2's extraction itself is replaced here by
    writing back the complete fingerprint, to keep its worker processes out of the test)."""
    import nnunetv2.experiment_planning.plan_and_preprocess_api as api

    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    fingerprint = tiny_copy["dataset"] / "dataset_fingerprint.json"
    complete = fingerprint.read_text()
    fingerprint.write_text(complete[:len(complete) // 2])
    extracted = []

    def extract(dataset_id, extractor, *, clean, **kwargs):
        extracted.append(clean)
        if clean:
            fingerprint.write_text(complete)

    monkeypatch.setattr(api, "extract_fingerprint_dataset", extract)
    plan_and_preprocess(991, clean=False, preprocess=False, **PLANNING)
    assert extracted == [True] and json.loads(fingerprint.read_text()) == json.loads(complete)
    assert "cannot be reused: it is unreadable" in caplog.text and "extracting it again" in caplog.text
    plan_and_preprocess(991, clean=False, preprocess=False, **PLANNING)  # a complete one is reused, as in nnU-Net
    assert extracted == [True, False]


def test_fingerprint_of_other_cases_is_not_reused(tmp_path):
    from samunet.cli.plan_and_preprocess import fingerprint_problem
    path = tmp_path / "dataset_fingerprint.json"
    fingerprint = {"spacings": [[1, 1, 1]] * 3, "shapes_after_crop": [[8, 8, 8]] * 3,
                   "foreground_intensity_properties_per_channel": {"0": {}},
                   "median_relative_size_after_cropping": 1.0}
    path.write_text(json.dumps(fingerprint))
    assert fingerprint_problem(path, 3, 1) is None
    assert "3 training cases, the raw data set has 5" in fingerprint_problem(path, 5, 1)
    assert "1 channels, dataset.json names 2" in fingerprint_problem(path, 3, 2)


KILL_IN_REFERENCE_COPY = """
import distutils.file_util as file_util
real_copy, copied = file_util.copy_file, []
def copy_file(source, target, **kwargs):
    copied.append(source)
    if len(copied) == 2:  # the second reference label map: half of it, then kill -9
        data = Path(source).read_bytes()
        Path(target).write_bytes(data[:len(data) // 2])
        die()
    return real_copy(source, target, **kwargs)
file_util.copy_file = copy_file
"""


def test_kill_while_references_are_copied_is_refused_then_repaired_by_a_rerun(tiny_copy):
    from samunet.cli.plan_and_preprocess import plan_and_preprocess
    dataset = tiny_copy["dataset"]
    for made in ("gt_segmentations", "samunetPlans_2d"):  # a first preprocessing run
        shutil.rmtree(dataset / made)
    (dataset / "samunetPlans_2d.complete.json").unlink()
    killed = _die_at(KILL_IN_REFERENCE_COPY, PLAN.format("clean=False"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.raises(DatasetError) as refused:
        check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    message = str(refused.value)
    assert "\n" not in message and "interrupted" in message and "samunet_plan_and_preprocess -d 991" in message
    plan_and_preprocess(991, clean=False, **PLANNING)
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    raw_labels = sorted((tiny_copy["nnUNet_raw"] / DATASET / "labelsTr").iterdir())
    assert [p.name for p in sorted((dataset / "gt_segmentations").iterdir())] == [p.name for p in raw_labels]
    for label in raw_labels:  # nnunetv2 alone never copies the cut-off one again (its copy is "newer")
        assert (dataset / "gt_segmentations" / label.name).read_bytes() == label.read_bytes()


# ------------------------------------------------------------------------------- preprocessed data check
def _plans(folder: Path) -> dict:
    return json.loads((folder / "samunetPlans.json").read_text())


def _edit_plans(folder: Path, edit) -> None:
    plans = _plans(folder)
    edit(plans["configurations"]["2d"])
    (folder / "samunetPlans.json").write_text(json.dumps(plans))


DAMAGE = {
    "plans missing": (lambda d: (d / "samunetPlans.json").unlink(), "the plans file"),
    "plans cut off": (lambda d: (d / "samunetPlans.json").write_text('{"configurations": {"2d"'), "unreadable"),
    "dataset.json missing": (lambda d: (d / "dataset.json").unlink(), "dataset.json"),
    "data folder missing": (lambda d: shutil.rmtree(d / "samunetPlans_2d"), "preprocessed data folder"),
    "a case missing": (lambda d: (d / "samunetPlans_2d" / "case_0003.pkl").unlink(), "case_0003"),
    "references missing": (lambda d: shutil.rmtree(d / "gt_segmentations"), "gt_segmentations"),
    "a reference missing": (lambda d: (d / "gt_segmentations" / "case_0001.nii.gz").unlink(), "case_0001"),
    "marker in progress": (lambda d: (d / "samunetPlans_2d.complete.json").write_text('{"state": "in progress"}'),
                           "interrupted"),
    "marker cut off": (lambda d: (d / "samunetPlans_2d.complete.json").write_text('{"state": "compl'),
                       "unreadable"),
    "other spacing planned": (lambda d: _edit_plans(d, lambda c: c.update(spacing=[2.0, 2.0])),
                              "other plans than samunetPlans.json (spacing differs)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_half_prepared_data_are_refused_in_one_line(tiny_copy, damage):
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    make, expected = DAMAGE[damage]
    make(tiny_copy["dataset"])
    with pytest.raises(DatasetError) as refused:
        check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert message.endswith("run samunet_plan_and_preprocess -d 991 to repair it")


def test_data_preprocessed_before_the_marker_existed_still_train(tiny_copy, caplog):
    dataset = tiny_copy["dataset"]
    (dataset / "samunetPlans_2d.complete.json").unlink()
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")  # checked against the raw data set
    _edit_plans(dataset, lambda c: c.update(batch_size=7))  # settings preprocessing does not depend on
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    label = dataset / "gt_segmentations" / "case_0002.nii.gz"
    label.write_bytes(label.read_bytes()[:40])  # a copy cut off by a kill
    with pytest.raises(DatasetError, match="cut off in .*gt_segmentations: case_0002"):
        check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    label.unlink()
    shutil.move(tiny_copy["nnUNet_raw"] / DATASET, tiny_copy["nnUNet_raw"] / "elsewhere")  # only preprocessed here
    with pytest.raises(DatasetError, match="reference label maps are missing .*case_0002"):
        check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    shutil.copy(tiny_copy["nnUNet_raw"] / "elsewhere" / "labelsTr" / "case_0002.nii.gz", label)
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    assert "cannot be confirmed" in caplog.text


def test_the_planned_tiny_dataset_passes_the_check(planned_tiny_dataset):
    check_preprocessed_dataset(DATASET, "samunetPlans", "2d")
    with pytest.raises(DatasetError, match="no configuration '3d_fullres'"):
        check_preprocessed_dataset(DATASET, "samunetPlans", "3d_fullres")
    with pytest.raises(DatasetError, match="-d 991 -overwrite_plans_name otherPlans to repair"):
        check_preprocessed_dataset(DATASET, "otherPlans", "2d")


# ---------------------------------------------------------------------------------------------- prediction
KILL_IN_THIRD_EXPORT = """
from samunet.inference import predict_cases
real_export, exported = predict_cases.export_prediction_from_logits, []
def export(logits, properties, cm, pm, dataset_json, output, *args):
    exported.append(output)
    if len(exported) == 3:  # half of the third case's label map, then kill -9
        Path(output + dataset_json["file_ending"]).write_bytes(b"half a NIfTI")
        die()
    return real_export(logits, properties, cm, pm, dataset_json, output, *args)
predict_cases.export_prediction_from_logits = export
"""


def _predict_arguments(paths: dict, *extra: str) -> list[str]:
    from trainer_harness import DATASET_NAME
    return ["-i", str(paths["images"]), "-o", str(paths["out"]), "-d", DATASET_NAME, "-f", "0", "-device", "cpu",
            "--disable_tta", "-npp", "0", "--disable_progress_bar", *extra]


def _predictor():
    from samunet.cli.predict import build_predictor
    from trainer_harness import DATASET_NAME
    return build_predictor(DATASET_NAME, "2d", "SAMedTrainer", [0], device="cpu", use_mirroring=False)


def _case_outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".json")


def test_kill_during_prediction_keeps_finished_cases_and_continue_predicts_the_rest(model, monkeypatch):  # noqa: F811
    from samunet.cli.predict import predict_folder
    killed = _die_at(KILL_IN_THIRD_EXPORT, f"from samunet.cli.predict import main\n"
                                           f"main({_predict_arguments(model, '-nps', '0')!r})")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = model["out"]
    assert _case_outputs(out) == ["case_0000.nii.gz", "case_0001.nii.gz"]  # complete, under their final names
    for name in _case_outputs(out):
        assert sitk.ReadImage(str(out / name)).GetSize() == (40, 40, 3)
    assert [name.startswith(staged_writes.SCRATCH_PREFIX) for name in _hidden(out)] == [True]  # the dead run's

    real_export, exported = predict_cases.export_prediction_from_logits, []
    monkeypatch.setattr(predict_cases, "export_prediction_from_logits",
                        lambda *args: exported.append(Path(args[5]).name) or real_export(*args))
    written = predict_folder(_predictor(), model["images"], out, continue_prediction=True, progress=False)
    assert exported == CASES[2:] and [p.name for p in written] == ["case_0002.nii.gz", "case_0003.nii.gz"]
    assert _case_outputs(out) == [f"{case}.nii.gz" for case in CASES] and _hidden(out) == []


def test_only_scratch_of_ended_processes_is_removed(tmp_path):
    """-num_parts: processes sharing one output folder keep each other's scratch while they run."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(ended.stdout), socket.gethostname()
    prefix = staged_writes.SCRATCH_PREFIX
    running = tmp_path / f"{prefix}{os.getpid()}@{host}@abc"
    dead = tmp_path / f"{prefix}{dead_pid}@{host}@def"
    dead_json = tmp_path / f"{prefix}{dead_pid}@{host}@0123.json"
    elsewhere = tmp_path / f"{prefix}{dead_pid}@another-host.example@ghi"
    for folder in (running, dead, elsewhere):
        folder.mkdir()
        (folder / "case_0000.nii.gz").write_bytes(b"staged")
    dead_json.write_text("{")
    assert staged_writes.remove_stale_scratch(tmp_path) == [dead_json, dead]
    assert _hidden(tmp_path) == sorted([running.name, elsewhere.name])


def _cut_off_writer(monkeypatch, failing_case: str) -> None:
    """SimpleITK's behaviour on a full disk: it reports nothing and leaves a cut-off file."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    real_write = SimpleITKIO.write_seg

    def write_seg(self, segmentation, output, properties):
        real_write(self, segmentation, output, properties)
        if Path(output).name.startswith(failing_case):
            data = Path(output).read_bytes()
            Path(output).write_bytes(data[:len(data) // 2])

    monkeypatch.setattr(SimpleITKIO, "write_seg", write_seg)


def test_disk_full_in_prediction_is_one_line_exit_2_and_no_partial_output(model, monkeypatch, capsys):  # noqa: F811
    from samunet.cli.predict import main as predict_main
    from samunet.cli.predict import predict_folder
    _cut_off_writer(monkeypatch, "case_0001")
    with pytest.raises(OSError) as failed:  # a cut-off file on a disk with space: named, never moved into place
        predict_folder(_predictor(), model["images"], model["out"], progress=False)
    assert failed.value.errno == errno.EIO and failed.value.filename == str(model["out"] / "case_0001.nii.gz")
    assert _case_outputs(model["out"]) == ["case_0000.nii.gz"] and _hidden(model["out"]) == []

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 4096))
    assert predict_main(_predict_arguments(model, "-nps", "0", "--continue_prediction")) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: ") and "no space left" in error.lower()
    assert str(model["out"] / "case_0001.nii.gz") in error
    assert _case_outputs(model["out"]) == ["case_0000.nii.gz"] and _hidden(model["out"]) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_in_an_export_worker_reaches_the_main_process(model, monkeypatch):  # noqa: F811
    """A real ENOSPC: the staged probabilities of one case lead to /dev/full, written in a worker process."""
    from samunet.cli.predict import predict_folder
    real_mkdtemp = predict_cases.tempfile.mkdtemp

    def scratch_with_a_full_disk(**kwargs):
        folder = real_mkdtemp(**kwargs)
        os.symlink("/dev/full", os.path.join(folder, "case_0001.npz"))
        return folder

    monkeypatch.setattr(predict_cases.tempfile, "mkdtemp", scratch_with_a_full_disk)
    with pytest.raises(OSError) as failed:
        predict_folder(_predictor(), model["images"], model["out"], save_probabilities=True, num_processes_export=1,
                       progress=False)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(model["out"] / "case_0001.npz")
    outputs = _case_outputs(model["out"])
    assert "case_0000.nii.gz" in outputs and not [name for name in outputs if name.startswith("case_0001")]
    for name in outputs:
        assert (model["out"] / name).stat().st_size > 0
    assert _hidden(model["out"]) == []


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".png", ".tif"])
def test_a_cut_off_label_map_is_recognised_for_every_writer(tmp_path, ending):
    """What a full disk leaves of a label map written by nnunetv2's writers (ITK, PIL, tifffile)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    writer = determine_reader_writer_from_file_ending(ending, verbose=False)
    labels = np.random.default_rng(0).integers(0, 3, (1 if ending == ".png" else 4, 40, 40)).astype(np.uint8)
    geometry = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                               "direction": tuple(np.eye(3).ravel())}, "spacing": (999.0, 1.0, 1.0)}
    path = tmp_path / f"case{ending}"
    writer().write_seg(labels, str(path), geometry)
    assert staged_writes.incomplete_label_map(path, writer()) is None
    whole = path.read_bytes()
    for cut in (0, len(whole) // 2):
        path.write_bytes(whole[:cut])
        assert staged_writes.incomplete_label_map(path, writer()), (ending, cut)


class EndsTheProcessThatUnpicklesIt:
    def __reduce__(self):
        return os._exit, (9,)


def test_an_export_worker_killed_mid_case_stops_the_run_instead_of_hanging(model, monkeypatch):  # noqa: F811
    """The last case's export worker dies as it takes the case (as if killed by the OOM killer)."""
    from samunet.cli.predict import predict_folder
    real_cases = predict_cases.preprocessed_cases

    def last_case_kills_its_worker(*args):
        for item in real_cases(*args):
            if item["ofile"].endswith(CASES[-1]):
                item["data_properties"]["poison"] = EndsTheProcessThatUnpicklesIt()
            yield item

    monkeypatch.setattr(predict_cases, "preprocessed_cases", last_case_kills_its_worker)
    previous = signal.signal(signal.SIGALRM, lambda *args: pytest.fail("the run waits forever for the dead worker"))
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match="export worker process ended .* --continue_prediction"):
            predict_folder(_predictor(), model["images"], model["out"], num_processes_export=1, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert _case_outputs(model["out"]) == [f"{case}.nii.gz" for case in CASES[:-1]] and _hidden(model["out"]) == []


# ------------------------------------------------------------------------------------------- model folder
def _model_folder() -> Path:
    from trainer_harness import DATASET_NAME
    return Path(os.environ["nnUNet_results"]) / DATASET_NAME / "SAMedTrainer__samunetPlans__2d"


MODEL_DAMAGE = {
    "no plans.json": (lambda f: (f / "plans.json").unlink(), "plans.json is missing: a trained model folder"),
    "no dataset.json": (lambda f: (f / "dataset.json").unlink(), "dataset.json is missing"),
    "dataset.json cut off": (lambda f: (f / "dataset.json").write_text('{"labels": '), "dataset.json is unreadable"),
    "fold not trained": (lambda f: shutil.rmtree(f / "fold_0"), "checkpoint_final.pth does not exist; train fold 0"),
    "only the best checkpoint": (lambda f: (f / "fold_0" / "checkpoint_final.pth").rename(
        f / "fold_0" / "checkpoint_best.pth"), "fold_0 holds checkpoint_best.pth: choose one with -chk"),
    "checkpoint cut off": (lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(
        (f / "fold_0" / "checkpoint_final.pth").read_bytes()[:5000]), "checkpoint_final.pth is not a usable"),
    "checkpoint empty": (lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(b""), "it is empty"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_a_broken_model_folder_is_refused_in_one_line(model, damage):  # noqa: F811
    from samunet.inference.model_folder import check_model_folder
    folder = _model_folder()
    check_model_folder(folder, [0], "checkpoint_final.pth")
    make, expected = MODEL_DAMAGE[damage]
    make(folder)
    with pytest.raises(DatasetError, match=expected.replace(".", r"\.")) as refused:
        check_model_folder(folder, [0], "checkpoint_final.pth")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("damage", ["no dataset.json", "checkpoint cut off", "only the best checkpoint"])
def test_samunet_predict_refuses_a_broken_model_folder_in_one_line(model, damage, capsys):  # noqa: F811
    from samunet.cli.predict import main as predict_main
    make, expected = MODEL_DAMAGE[damage]
    make(_model_folder())
    assert predict_main(_predict_arguments(model, "-nps", "0")) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and expected in error and not model["out"].exists()


# ------------------------------------------------------------------------------------------------ overlays
def test_an_overlay_on_a_full_disk_leaves_the_previous_png(tmp_path, monkeypatch):
    import matplotlib.figure

    from samunet.reporting.overlays import write_overlay
    volume = sitk.GetImageFromArray(np.pad(np.ones((3, 8, 8), np.uint8), 2))
    for name in ("image", "reference", "prediction"):
        sitk.WriteImage(volume, str(tmp_path / f"{name}.nii.gz"))
    files = [tmp_path / f"{name}.nii.gz" for name in ("image", "reference", "prediction")]
    png = write_overlay(*files, tmp_path / "overlay.png", {"background": 0, "organ": 1}, num_slices=1)
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG")
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig_on_a_full_disk(self, target, **kwargs):
        real_savefig(self, target, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_on_a_full_disk)
    with pytest.raises(OSError) as failed:
        write_overlay(*files, png, {"background": 0, "organ": 1}, num_slices=2)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(png)
    assert png.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == \
        ["overlay.png"] and _hidden(tmp_path) == []
