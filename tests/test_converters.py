"""Tests of samunet_convert (ACDC, Synapse, AMOS) on synthetic miniatures of each release's layout."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samunet.cli.convert import main
from samunet.preprocessing.converters.synapse import load_split, remap_labels

SHAPE = (4, 16, 16)  # (z, y, x)


def _write(array, path, spacing=(1.5, 1.5, 5.0), dtype=np.int16):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype), isVector=False)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _labels(values):
    array = np.zeros(SHAPE, dtype=np.uint8)
    for index, value in enumerate(values):
        array[1:3, 2 + 3 * index:4 + 3 * index, 2:6] = value
    return array


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------- ACDC

def _acdc_patient(root, part, number, ed=1, es=3, with_gt=True):
    folder = root / part / f"patient{number:03d}"
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nNbFrame: 4\n")
    for frame in (ed, es):
        _write(np.full(SHAPE, number), folder / f"patient{number:03d}_frame{frame:02d}.nii.gz")
        if with_gt:
            _write(_labels([1, 2, 3]), folder / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz", dtype=np.uint8)
    _write(np.zeros((4, *SHAPE)), folder / f"patient{number:03d}_4d.nii.gz", spacing=(1.5, 1.5, 5.0, 1.0))


@pytest.fixture
def acdc_source(tmp_path):
    root = tmp_path / "acdc"
    for number in range(1, 7):
        _acdc_patient(root, "training", number, ed=1, es=2 + number % 2)
    for number in (101, 102):
        _acdc_patient(root, "testing", number, with_gt=False)
    return root


def test_acdc_converts_ed_es_frames_with_phases_and_patient_grouped_splits(acdc_source, nnunet_folders):
    assert main(["acdc", str(acdc_source)]) == 0
    dataset = nnunet_folders["nnUNet_raw"] / "Dataset027_ACDC"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert dataset_json["numTraining"] == 12
    assert dataset_json["acdc_phases"]["patient002_frame01"] == "ED"
    assert dataset_json["acdc_phases"]["patient002_frame02"] == "ES"
    assert dataset_json["acdc_phases"]["patient101_frame03"] == "ES"
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [
        "patient101_frame01_0000.nii.gz", "patient101_frame03_0000.nii.gz",
        "patient102_frame01_0000.nii.gz", "patient102_frame03_0000.nii.gz"]
    assert not (dataset / "labelsTs").exists()
    assert (_read(dataset / "labelsTr" / "patient003_frame03.nii.gz") == _labels([1, 2, 3])).all()
    assert not any(p.name.startswith(".") for p in nnunet_folders["nnUNet_raw"].iterdir())
    splits = json.loads((nnunet_folders["nnUNet_preprocessed"] / "Dataset027_ACDC" / "splits_final.json").read_text())
    assert len(splits) == 5
    for fold in splits:
        val_patients = {case[:10] for case in fold["val"]}
        assert not val_patients & {case[:10] for case in fold["train"]}
        assert len(fold["val"]) == 2 * len(val_patients)
    assert sorted(c for fold in splits for c in fold["val"]) == sorted(dataset_json["acdc_phases"])[:12]


def test_acdc_lists_every_problem_and_writes_nothing(acdc_source, nnunet_folders, capsys):
    (acdc_source / "training" / "patient001" / "patient001_frame01_gt.nii.gz").unlink()
    (acdc_source / "training" / "patient002" / "Info.cfg").write_text("Group: NOR\n")
    _write(_labels([1, 5]), acdc_source / "training" / "patient003" / "patient003_frame01_gt.nii.gz", dtype=np.uint8)
    _write(np.zeros((4, 8, 8)), acdc_source / "training" / "patient004" / "patient004_frame01_gt.nii.gz")
    assert main(["acdc", str(acdc_source), "-d", "28"]) == 2
    message = capsys.readouterr().err
    assert "5 problem(s)" in message and "nothing was written" in message
    assert "patient001_frame01_gt.nii.gz (ground truth of the ED frame) is missing" in message
    assert "no line 'ED: <frame number>'" in message and "no line 'ES: <frame number>'" in message
    assert "label values [5]" in message
    assert "has size (8, 8, 4)" in message and message.count("\n") == 1
    assert list(nnunet_folders["nnUNet_raw"].iterdir()) == []


def test_cut_off_empty_and_unreadable_source_files_are_problems(acdc_source, nnunet_folders, capsys):
    """A cut-off or empty ground truth, a test frame whose header SimpleITK cannot read: listed with the other
    problems in one line, naming each file (a cut-off gt was a SimpleITK RuntimeError traceback)."""
    noise = np.random.default_rng(0).integers(0, 4, SHAPE)
    gt = acdc_source / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    _write(noise, gt, dtype=np.uint8)
    gt.write_bytes(gt.read_bytes()[:-100])
    empty = acdc_source / "training" / "patient002" / "patient002_frame01_gt.nii.gz"
    empty.write_bytes(b"")
    cut = acdc_source / "training" / "patient003" / "patient003_frame01.nii.gz"
    _write(noise, cut)
    cut.write_bytes(cut.read_bytes()[:-30])
    garbage = acdc_source / "testing" / "patient101" / "patient101_frame01.nii.gz"
    garbage.write_bytes(b"not an image at all" * 20)
    assert main(["acdc", str(acdc_source), "-d", "28"]) == 2
    message = capsys.readouterr().err
    assert "4 problem(s)" in message and message.count("\n") == 1
    assert f"{gt} is truncated" in message and f"{empty} is empty" in message and f"{cut} is truncated" in message
    assert f"{garbage} cannot be read" in message
    assert list(nnunet_folders["nnUNet_raw"].iterdir()) == []


def test_acdc_refuses_to_replace_an_existing_dataset_without_overwrite(acdc_source, nnunet_folders, capsys):
    assert main(["acdc", str(acdc_source)]) == 0
    assert main(["acdc", str(acdc_source)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["acdc", str(acdc_source), "--overwrite"]) == 0


def test_acdc_test_labels_and_small_training_sets(tmp_path, nnunet_folders, caplog):
    root = tmp_path / "database"
    for number in (1, 2):
        _acdc_patient(root / "database", "training", number)
    _acdc_patient(root / "database", "testing", 150)
    assert main(["acdc", str(root)]) == 0
    dataset = nnunet_folders["nnUNet_raw"] / "Dataset027_ACDC"
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == ["patient150_frame01.nii.gz",
                                                                        "patient150_frame03.nii.gz"]
    assert not (nnunet_folders["nnUNet_preprocessed"] / "Dataset027_ACDC" / "splits_final.json").exists()
    assert "no patient-grouped 5-fold split" in caplog.text


# ---------------------------------------------------------------- Synapse

@pytest.fixture
def synapse_source(tmp_path):
    root = tmp_path / "RawData" / "Training"
    split = load_split()
    for number in split["train"] + split["test"]:
        _write(np.full(SHAPE, int(number)), root / "img" / f"img{number}.nii.gz")
        _write(_labels([1, 5, 6, 11, 13]), root / "label" / f"label{number}.nii.gz", dtype=np.uint8)
    return tmp_path


def test_synapse_split_is_transunets_18_12():
    split = load_split()
    assert split["test"] == ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035",
                             "0036", "0038"]
    btcv_training = [f"{n:04d}" for n in (*range(1, 11), *range(21, 41))]
    assert sorted(split["train"] + split["test"]) == btcv_training and len(split["train"]) == 18


def test_synapse_label_mapping_keeps_eight_organs():
    btcv = np.arange(14)
    assert remap_labels(btcv).tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


def test_synapse_converts_split_and_remaps(synapse_source, nnunet_folders):
    assert main(["synapse", str(synapse_source), "-d", "112"]) == 0
    dataset = nnunet_folders["nnUNet_raw"] / "Dataset112_Synapse8"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 18
    assert list(dataset_json["labels"]) == ["background", "spleen", "right kidney", "left kidney", "gallbladder",
                                            "liver", "stomach", "aorta", "pancreas"]
    assert len(list((dataset / "imagesTs").iterdir())) == 12
    assert (dataset / "imagesTs" / "img0038_0000.nii.gz").is_file()
    assert (dataset / "labelsTr" / "img0005.nii.gz").is_file()
    assert (_read(dataset / "labelsTs" / "img0001.nii.gz") == _labels([1, 0, 5, 8, 0])).all()


def test_synapse_reports_missing_case_and_bad_labels(synapse_source, nnunet_folders, capsys):
    root = synapse_source / "RawData" / "Training"
    (root / "label" / "label0022.nii.gz").unlink()
    _write(_labels([14]), root / "label" / "label0005.nii.gz", dtype=np.uint8)
    assert main(["synapse", str(synapse_source)]) == 2
    message = capsys.readouterr().err
    assert "2 problem(s)" in message and "case 0022" in message and "label values [14]" in message


# ---------------------------------------------------------------- AMOS

@pytest.fixture
def amos_source(tmp_path):
    root = tmp_path / "amos22"
    labels = {"0": "background", "1": "spleen", "2": "right kidney"}
    parts = {"training": ("imagesTr", "labelsTr", [1, 2, 500]), "validation": ("imagesVa", "labelsVa", [3, 501]),
             "test": ("imagesTs", None, [4, 502])}
    dataset_json = {"labels": labels}
    for part, (images, label_folder, numbers) in parts.items():
        dataset_json[part] = []
        for number in numbers:
            name = f"amos_{number:04d}.nii.gz"
            _write(np.full(SHAPE, number), root / images / name)
            entry = {"image": f"./{images}/{name}"}
            if label_folder:
                _write(_labels([1, 2]), root / label_folder / name, dtype=np.uint8)
                entry["label"] = f"./{label_folder}/{name}"
            dataset_json[part].append(entry)
    (root / "dataset.json").write_text(json.dumps(dataset_json))
    return root


def test_amos_keeps_ct_cases_and_uses_nnunets_reorienting_reader(amos_source, nnunet_folders):
    assert main(["amos", str(amos_source)]) == 0
    dataset = nnunet_folders["nnUNet_raw"] / "Dataset218_AMOS2022_postChallenge_task1"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    assert dataset_json["numTraining"] == 3
    assert dataset_json["labels"] == {"background": 0, "spleen": 1, "right kidney": 2}
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "amos_0001_0000.nii.gz", "amos_0002_0000.nii.gz", "amos_0003_0000.nii.gz"]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == ["amos_0004_0000.nii.gz"]
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]


def test_amos_reports_missing_and_mismatched_files(amos_source, nnunet_folders, capsys):
    (amos_source / "labelsVa" / "amos_0003.nii.gz").unlink()
    _write(_labels([3]), amos_source / "labelsTr" / "amos_0001.nii.gz", dtype=np.uint8)
    (amos_source / "labelsVa" / "amos_0501.nii.gz").unlink()  # MRI: not converted, so not needed
    assert main(["amos", str(amos_source)]) == 2
    message = capsys.readouterr().err
    assert "2 problem(s)" in message and "validation case amos_0003" in message and "label values [3]" in message
    assert list(nnunet_folders["nnUNet_raw"].iterdir()) == []


def test_missing_source_folder_and_bad_id_are_clear_errors(tmp_path, nnunet_folders, capsys):
    assert main(["synapse", str(tmp_path / "nowhere")]) == 2
    assert "img/ and label/" in capsys.readouterr().err
    assert main(["acdc", str(tmp_path / "nowhere"), "-d", "1000"]) == 2
    assert "1..999" in capsys.readouterr().err


def test_acdc_test_frames_must_be_3d(acdc_source, nnunet_folders, capsys):
    _write(np.zeros((3, *SHAPE)), acdc_source / "testing" / "patient101" / "patient101_frame01.nii.gz",
           spacing=(1.5, 1.5, 5.0, 1.0))
    assert main(["acdc", str(acdc_source)]) == 2
    assert "patient101_frame01.nii.gz is 4D" in capsys.readouterr().err
