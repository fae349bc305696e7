"""Raw scans in: N4 + registration + the template brain mask (ANTs), recorded in prepare.json and repeated by score
mode; the brain mask and the anomaly map land on the scan's own grid."""
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic_head import dice, synthetic_head

from brainomaly.data import preparation_record, prepare_command, slice_importers
from brainomaly.data.slice_files import load_slice
from brainomaly.errors import UserError
from brainomaly.evaluate import volume_scoring

FAST = ["--template_resolution", "3"]  # 3 mm template grid: a whole pipeline in seconds on 2 cores
RESOLUTION = 3


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A 3 mm synthetic head stored LPS, and its true brain mask."""
    folder = tmp_path_factory.mktemp("head")
    image, truth = synthetic_head(resolution=RESOLUTION, voxel_mm=3.0)
    path = str(folder / "sub-01.nii.gz")
    nib.save(image, path)
    return path, truth


def needs_ants():
    pytest.importorskip("ants", reason="antspyx is an optional extra (requirements-preprocess.txt); CI installs it")


@pytest.mark.parametrize("registration", ["affine", "syn"])
def test_the_brain_mask_excludes_the_skull_and_lies_on_the_scan_grid(head, tmp_path, capsys, registration):
    needs_ants()
    path, truth = head
    out = tmp_path / "prep"
    assert prepare_command.main(["preprocess", path, "--out", str(out), *FAST, "--registration", registration]) == 0
    mask = nib.load(str(out / "sub-01_brain_mask.nii.gz"))
    scan = nib.load(path)
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    assert dice(mask.get_fdata(), truth.get_fdata()) >= 0.9
    # the bright scalp shell (the skull-like layer a threshold would keep) stays outside the mask
    outside = np.asarray(truth.get_fdata()) == 0
    bright_shell = outside & (scan.get_fdata() > 0.5 * np.percentile(scan.get_fdata()[~outside], 99))
    assert bright_shell.sum() > 100 and (mask.get_fdata()[bright_shell] > 0).mean() < 0.05
    kept = {"sub-01_to-MNI152NLin2009aSym_affine.mat"}
    if registration == "syn":
        kept |= {"sub-01_to-MNI152NLin2009aSym_warp.nii.gz", "sub-01_to-MNI152NLin2009aSym_inverse_warp.nii.gz"}
    assert kept <= set(os.listdir(out))
    assert f"{registration} registration" in capsys.readouterr().out


def test_score_mode_repeats_the_recorded_preprocessing_and_maps_back_onto_the_scan(head, tmp_path):
    needs_ants()
    path, truth = head
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    os.symlink(path, volumes / "sub-01.nii.gz")
    split = tmp_path / "split.csv"
    split.write_text("file,folder\nsub-01.nii.gz,neg\n")
    data = tmp_path / "data"
    assert prepare_command.main(["nifti", "--volumes", str(volumes), "--split", str(split), "--out", str(data),
                              "--image_size", "32", "--preprocess", *FAST]) == 0
    with open(data / "prepare.json") as handle:
        record = json.load(handle)
    assert record["preprocess"]["registration"] == "affine" and record["preprocess"]["template_resolution"] == 3
    assert (data / "preprocessed" / "sub-01_brain_mask.nii.gz").is_file()
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    preparation_record.copy_into_run(str(data), str(models))  # what stage 1 does
    preparation = preparation_record.for_scoring(str(models), prepared=False)
    assert preparation.repeat_preprocessing

    seen = []

    def intensity_maps(batch, names):
        seen.append(batch.clone())
        return (batch[:, 0] + 1) / 2

    rows, skipped = volume_scoring.score_volumes([path], intensity_maps, 32, str(tmp_path / "s.csv"), 0.5,
                                                 preparation=preparation)
    trained_on = sorted(os.listdir(data / "train/neg"))
    assert skipped == [] and rows[0]["n_slices"] == len(trained_on)
    expected = torch.stack([load_slice(str(data / "train/neg" / name), 32) for name in trained_on])
    # the scan scored is the scan trained on: the same slices (ANTs' multi-threaded fit may move a voxel's value)
    assert (torch.cat(seen) - expected).abs().mean() < 0.01
    anomaly = nib.load(str(tmp_path / "s" / "sub-01_anomaly.nii.gz"))
    scan = nib.load(path)
    assert anomaly.shape == scan.shape and np.allclose(anomaly.affine, scan.affine)
    values = anomaly.get_fdata()
    brain = truth.get_fdata() > 0
    assert values.max() > 0 and values[brain].sum() / values.sum() > 0.9  # the map sits on the scan's brain
    assert (tmp_path / "s" / "sub-01_brain_mask.nii.gz").is_file()


def test_a_scan_the_registration_cannot_cover_is_refused_naming_it(head, tmp_path):
    needs_ants()
    path, _ = head
    image = nib.load(path)
    slab = image.slicer[:, :, image.shape[2] // 2 - 4:image.shape[2] // 2 + 4]  # 8 axial planes of 3 mm
    slab_path = str(tmp_path / "sub-slab.nii.gz")
    nib.save(slab, slab_path)
    with pytest.raises(UserError) as caught:
        prepare_command.prepare_scan(slab_path, "sub-slab", None, prepare_data_settings(), str(tmp_path / "w"),
                                  0.3, None, 32)
    assert slab_path in str(caught.value) and "Fix:" in str(caught.value)


def prepare_data_settings():
    from brainomaly.data import preprocessing
    return preprocessing.PreprocessSettings(template_resolution=RESOLUTION)


def write_record(models, **changes):
    models.mkdir(parents=True, exist_ok=True)
    record = {"command": "nifti", "preprocess": None, "min_brain_fraction": 0.3, "slices": None, "image_size": 32,
              "brain_masks_given": False, **changes}
    (models / "prepare.json").write_text(json.dumps(record))


def test_a_run_without_a_record_refuses_nifti_scans_unless_prepared(tmp_path):
    with pytest.raises(UserError, match="records no preparation") as caught:
        preparation_record.for_scoring(str(tmp_path), prepared=False)
    assert "--prepared" in str(caught.value)
    given = preparation_record.for_scoring(str(tmp_path), prepared=True, min_brain_fraction=0.5, prepared_size=32)
    assert given.min_brain_fraction == 0.5 and given.preprocess is None and given.slice_size == 32


def test_a_slicing_flag_that_differs_from_the_record_is_refused(tmp_path):
    write_record(tmp_path / "models")
    with pytest.raises(UserError, match="differs from the training data's preparation"):
        preparation_record.for_scoring(str(tmp_path / "models"), False, min_brain_fraction=0.5)
    with pytest.raises(UserError, match="drop --slices"):
        preparation_record.for_scoring(str(tmp_path / "models"), False, slices="2:5")
    same = preparation_record.for_scoring(str(tmp_path / "models"), False, min_brain_fraction=0.3)
    assert same.min_brain_fraction == 0.3 and not same.repeat_preprocessing


def test_prepared_scans_of_a_preprocessed_run_must_be_on_the_template_grid(tmp_path):
    write_record(tmp_path / "models", preprocess={"registration": "affine", "template_resolution": RESOLUTION,
                                                  "fit_resolution": 2, "template": "MNI152NLin2009aSym"})
    preparation = preparation_record.for_scoring(str(tmp_path / "models"), prepared=True)
    assert preparation.preprocess is not None and not preparation.repeat_preprocessing
    raw = str(tmp_path / "raw.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 1, (20, 22, 18)).astype(np.float32), np.eye(4)), raw)
    with pytest.raises(UserError, match="is not on the MNI152NLin2009aSym template grid") as caught:
        volume_scoring.score_volumes([raw], lambda b, n: b[:, 0], 32, str(tmp_path / "s.csv"), 0.5,
                                     preparation=preparation)
    assert raw in str(caught.value) and "drop --prepared" in str(caught.value)


def test_preprocessing_without_antspyx_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ants", None)  # import ants now raises ImportError
    volumes = tmp_path / "v"
    volumes.mkdir()
    (tmp_path / "split.csv").write_text("file,folder\nsub-01.nii.gz,neg\n")
    with pytest.raises(UserError, match="pip install -r requirements-preprocess.txt"):
        prepare_command.run(["nifti", "--volumes", str(volumes), "--split", str(tmp_path / "split.csv"),
                          "--out", str(tmp_path / "out"), "--preprocess"])
    assert not (tmp_path / "out").exists()


def test_stage_1_keeps_the_data_record_and_drops_a_stale_one(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    write_record(data)
    models.mkdir()
    preparation_record.copy_into_run(str(data), str(models))
    assert json.loads((models / "prepare.json").read_text())["command"] == "nifti"
    os.remove(data / "prepare.json")
    preparation_record.copy_into_run(str(data), str(models))
    assert not (models / "prepare.json").exists()


def test_overwrite_replaces_the_record_of_an_earlier_preparation(tmp_path):
    volumes = tmp_path / "v"
    volumes.mkdir()
    data = np.zeros((16, 16, 12), np.float32)
    data[3:13, 3:13, 2:10] = np.random.default_rng(0).uniform(50, 100, (10, 10, 8))
    nib.save(nib.Nifti1Image(data, np.eye(4)), volumes / "sub-01.nii.gz")
    (tmp_path / "split.csv").write_text("file,folder\nsub-01.nii.gz,pos\n")
    out = tmp_path / "out"
    prepare_command.prepare_nifti(str(volumes), str(tmp_path / "split.csv"), str(out), image_size=16)
    assert json.loads((out / "prepare.json").read_text())["command"] == "nifti"
    slices = tmp_path / "slices"
    slices.mkdir()
    (slices / "p1__000.png").write_bytes((out / "train/pos" / os.listdir(out / "train/pos")[0]).read_bytes())
    (tmp_path / "csv_split.csv").write_text("patient_id,class,split\np1,AD_Mixed,\n")
    slice_importers.prepare_csv(str(tmp_path / "csv_split.csv"), str(slices), str(out), overwrite=True)
    assert not (out / "prepare.json").exists()  # it described slices that are gone


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_preprocess_refuses_to_replace_an_earlier_scans_outputs(head, tmp_path, capsys):
    """Two scans with one file name (site-a/sub-01 and site-b/sub-01) into one --out: the second would replace the
    first's outputs; so would another --template_resolution the template files every scan there was sliced on."""
    needs_ants()
    path, _ = head
    for site in ("site-a", "site-b"):
        (tmp_path / site).mkdir()
        os.symlink(path, tmp_path / site / "sub-01.nii.gz")
    os.symlink(path, tmp_path / "site-b" / "sub-02.nii.gz")
    out = tmp_path / "prep"
    assert prepare_command.main(["preprocess", str(tmp_path / "site-a" / "sub-01.nii.gz"), "--out", str(out),
                                 *FAST]) == 0
    first = snapshot(out)
    capsys.readouterr()
    assert prepare_command.main(["preprocess", str(tmp_path / "site-b" / "sub-01.nii.gz"), "--out", str(out),
                                 *FAST]) == 2
    err = capsys.readouterr().err
    assert str(out / "sub-01_space-MNI152NLin2009aSym_T1w.nii.gz") in err and "Fix:" in err and "--out" in err
    assert snapshot(out) == first
    assert prepare_command.main(["preprocess", str(tmp_path / "site-b" / "sub-02.nii.gz"), "--out", str(out),
                                 "--template_resolution", "2"]) == 2
    err = capsys.readouterr().err
    assert str(out / "template_T1w.nii.gz") in err and "--template_resolution" in err
    assert snapshot(out) == first
    # another scan at the same resolution joins the folder; the first scan's files and the template stay as they were
    assert prepare_command.main(["preprocess", str(tmp_path / "site-b" / "sub-02.nii.gz"), "--out", str(out),
                                 *FAST]) == 0
    after = snapshot(out)
    assert {name: after[name] for name in first} == first and "sub-02_brain_mask.nii.gz" in after
