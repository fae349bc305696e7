"""Score mode checks what it is given before any work: one patient id per patient, an --output that can hold both
the CSV and the maps folder named like it."""
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_FLAGS, toy_slice, write_toy_dataset
from test_nifti_scoring import ras_image

import main
from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import save_slice_png


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """(dataset folder, run folder) of a 2-iteration tiny run on the toy dataset."""
    root = str(tmp_path_factory.mktemp("score_inputs"))
    data = write_toy_dataset(os.path.join(root, "data", "Toy"))
    run_dir = os.path.join(root, "run")
    assert main.main(["--mode", "train", "--image_dir", data, "--run_dir", run_dir, *TINY_FLAGS,
                      "--num_iters", "2"]) == 0
    return data, run_dir


def score(run_dir, image_dir, *extra):
    return main.main(["--mode", "score", "--image_dir", str(image_dir), "--run_dir", run_dir, "--num_workers", "0",
                      "--test_iters", "2", *extra])


def test_two_folders_with_the_same_patient_id_are_refused_not_merged(toy_run, tmp_path, capsys):
    _, run_dir = toy_run
    rng = np.random.default_rng(0)
    for site in ("siteA", "siteB"):
        for k in range(2):
            save_slice_png(toy_slice(rng, False), str(tmp_path / "new" / site / slice_filename("sub-01", k)))
    save_slice_png(toy_slice(rng, False), str(tmp_path / "new" / "siteB" / slice_filename("sub-02", 0)))
    output = tmp_path / "scores.csv"
    capsys.readouterr()
    assert score(run_dir, tmp_path / "new", "--output", str(output)) == 2
    err = capsys.readouterr().err
    assert "sub-01" in err and str(tmp_path / "new" / "siteA") in err and str(tmp_path / "new" / "siteB") in err
    assert "Fix:" in err and not output.exists()


@pytest.mark.parametrize("name", ["scores", "scores.nii.gz"])
def test_an_output_that_is_not_a_csv_is_refused_before_any_scan_is_scored(toy_run, tmp_path, capsys, name):
    _, run_dir = toy_run
    scan = tmp_path / "sub-01.nii.gz"
    nib.save(ras_image(), str(scan))
    flags = ["--prepared", "--prepared_size", "40"]  # the toy slices are 40 px PNGs, not made from scans
    capsys.readouterr()
    assert score(run_dir, scan, "--output", str(tmp_path / name), *flags) == 2
    captured = capsys.readouterr()
    assert f"--output {tmp_path / name}" in captured.err and ".csv" in captured.err and "Fix:" in captured.err
    assert "Preparing each scan" not in captured.out
    assert sorted(os.listdir(tmp_path)) == ["sub-01.nii.gz"]
    # the corrected command then scores the scan
    assert score(run_dir, scan, "--output", str(tmp_path / "scores.csv"), *flags) == 0
    assert os.path.isfile(tmp_path / "scores.csv") and os.path.isfile(tmp_path / "scores" / "sub-01_anomaly.nii.gz")
