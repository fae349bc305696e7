"""Whole NIfTI scans in, anomaly volumes out: geometry round trip, one preparation path, bad volumes, score.sh."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS
from test_protocols import REPO, read_csv, run, run_in_process, train_sh_in_process

from brainomaly.data import nifti_volumes, preparation_record, prepare_command
from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import load_slice
from brainomaly.errors import UserError
from brainomaly.evaluate import volume_scoring

SHAPE = (30, 22, 16)          # RAS storage order: non-square in-plane (x 30, y 22)
ZOOMS = (1.0, 1.5, 3.0)       # anisotropic voxels
SPOT = (8, 14, 9)             # a bright 3x3 patch on axial slice 9, off-centre in x and y


def brain_volume(texture=0.0):
    """An ellipsoid brain with a bright patch at SPOT. Without texture the brain is uniform, so after the
    percentile normalisation only the patch is bright (it is under 1% of the brain voxels)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    brain = (((grid - np.array([14.5, 10.5, 7.5])) / np.array([12.0, 9.0, 6.0])) ** 2).sum(-1) <= 1
    data = np.zeros(SHAPE, dtype=np.float32)
    data[brain] = 100.0 + np.random.default_rng(0).uniform(0, texture, int(brain.sum()))
    data[SPOT[0] - 1:SPOT[0] + 2, SPOT[1] - 1:SPOT[1] + 2, SPOT[2]] = 300.0
    return data


def ras_image(texture=0.0):
    affine = np.diag(list(ZOOMS) + [1.0])
    affine[:3, 3] = (-20.0, 5.0, 7.0)
    return nib.Nifti1Image(brain_volume(texture), affine)


def stored_as(image, axcodes):
    """The same scan stored in another axis order (e.g. LPS, as DICOM converters often write)."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(axcodes))
    return image.as_reoriented(transform)


def intensity_maps(batch, names):
    """A hand-made model: the anomaly map is the slice's own intensity, so bright voxels mark themselves."""
    return (batch[:, 0] + 1) / 2


def write(image, path):
    nib.save(image, str(path))
    return str(path)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PSL"])
def test_anomaly_map_lands_on_the_input_grid_in_any_orientation(tmp_path, axcodes):
    ras = ras_image()
    image = stored_as(ras, axcodes)
    assert nib.aff2axcodes(image.affine) == tuple(axcodes)
    path = write(image, tmp_path / f"sub-{axcodes}.nii.gz")
    rows, skipped = volume_scoring.score_volumes([path], intensity_maps, 32, str(tmp_path / "scores.csv"),
                                                 threshold=0.5, batch_size=4)
    assert skipped == [] and rows[0]["pid"] == f"sub-{axcodes}"
    out = nib.load(str(tmp_path / "scores" / f"sub-{axcodes}_anomaly.nii.gz"))
    assert out.shape == image.shape and out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.affine, image.affine)
    np.testing.assert_allclose(out.get_qform(), image.get_qform())
    np.testing.assert_allclose(out.get_sform(), image.get_sform())
    data = out.get_fdata()
    # The spot's voxel in this file's own index space, found through the affines (world mm is the same).
    expected = np.linalg.inv(image.affine) @ ras.affine @ np.array([*SPOT, 1.0])
    peak = np.argwhere(data >= 0.8 * data.max())  # the patch, blurred by the two resamplings
    np.testing.assert_allclose(peak.mean(axis=0), expected[:3], atol=0.6)
    # Zero outside the scored slices: find the axial axis of this storage order through the affine.
    prepared = nifti_volumes.prepare_volume(path, image_size=32)
    axial_axis = int(np.argmax(np.abs(image.affine[2, :3])))
    in_ras = np.linalg.inv(image.affine) @ ras.affine
    unscored = [k for k in range(SHAPE[2]) if k not in prepared.indices]
    assert unscored
    for k in unscored:
        stored_k = int(round((in_ras @ np.array([0.0, 0.0, k, 1.0]))[axial_axis]))
        assert np.take(data, stored_k, axis=axial_axis).max() == 0
    assert np.take(data, int(round(expected[axial_axis])), axis=axial_axis).max() > 0


def test_a_map_marking_the_slice_centre_lands_on_the_centre_voxel(tmp_path):
    """Centre of the model's square image -> centre of that slice's in-plane grid, after pad/crop/resize."""
    path = write(stored_as(ras_image(), "LPS"), tmp_path / "sub-c.nii.gz")

    def centre_maps(batch, names):
        maps = torch.zeros(batch.shape[0], *batch.shape[-2:])
        side = batch.shape[-1]
        maps[:, side // 2 - 1:side // 2 + 1, side // 2 - 1:side // 2 + 1] = 1.0
        return maps

    volume_scoring.score_volumes([path], centre_maps, 32, str(tmp_path / "c.csv"), 0.5)
    data = nib.load(str(tmp_path / "c" / "sub-c_anomaly.nii.gz")).get_fdata()
    prepared = nifti_volumes.prepare_volume(path, image_size=32)
    k = prepared.indices[0]  # RAS axial k is LPS k too (S stays S)
    plane = data[:, :, k]
    rows, cols = np.nonzero(plane >= 0.5 * plane.max())
    assert abs(rows.mean() - (SHAPE[0] - 1) / 2) <= 1.0 and abs(cols.mean() - (SHAPE[1] - 1) / 2) <= 1.0


def test_scored_slices_are_the_prepare_data_slices_pixel_for_pixel(tmp_path):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    path = write(stored_as(ras_image(texture=40.0), "LPS"), volumes / "sub-a.nii.gz")
    split = tmp_path / "split.csv"
    split.write_text("file,folder\nsub-a.nii.gz,pos\n")
    prepare_command.prepare_nifti(str(volumes), str(split), str(tmp_path / "data"), image_size=32)
    prepared = nifti_volumes.prepare_volume(path, image_size=32)
    pngs = [str(tmp_path / "data" / "train/pos" / slice_filename("sub-a", k)) for k in prepared.indices]
    assert sorted(os.listdir(tmp_path / "data" / "train/pos")) == [os.path.basename(p) for p in pngs]
    expected = torch.stack([load_slice(p, 32) for p in pngs])
    assert torch.equal(volume_scoring.slice_batch(prepared, 32), expected)


def prepared_run(tmp_path, prepare_size):
    """(scan path, dataset folder, model folder): one scan prepared by prepare_data.py nifti at prepare_size into
    train/pos, and the run's model folder holding its prepare.json (as stage 1 copies it)."""
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    path = write(stored_as(ras_image(texture=40.0), "LPS"), volumes / "sub-a.nii.gz")
    split = tmp_path / "split.csv"
    split.write_text("file,folder\nsub-a.nii.gz,pos\n")
    assert prepare_command.main(["nifti", "--volumes", str(volumes), "--split", str(split), "--out",
                                 str(tmp_path / "data"), "--image_size", str(prepare_size)]) == 0
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    preparation_record.copy_into_run(str(tmp_path / "data"), str(models))
    return path, tmp_path / "data", models


@pytest.mark.parametrize("prepare_size", [48, 24])
def test_score_mode_scores_the_tensors_training_read_when_slices_were_prepared_at_another_size(tmp_path,
                                                                                            prepare_size):
    """Slices written at 48 (or 24) px by prepare_data.py, a model trained at 32: the loader pads the 48 px PNG and
    resizes it to 32, and score mode must hand the model exactly those tensors for the same scan."""
    path, data, models = prepared_run(tmp_path, prepare_size)
    preparation = preparation_record.for_scoring(str(models), prepared=False)
    seen = []

    def recording_maps(batch, names):
        seen.append(batch.clone())
        return (batch[:, 0] + 1) / 2

    rows, _ = volume_scoring.score_volumes([path], recording_maps, 32, str(tmp_path / "s.csv"), 0.5,
                                           preparation=preparation)
    trained_on = sorted(os.listdir(data / "train/pos"))
    expected = torch.stack([load_slice(str(data / "train/pos" / name), 32) for name in trained_on])
    scored = torch.cat(seen)
    assert scored.shape == expected.shape == (len(trained_on), 1, 32, 32)
    assert (scored - expected).abs().max() <= 1e-6
    assert rows[0]["n_slices"] == len(trained_on)
    assert nib.load(str(tmp_path / "s" / "sub-a_anomaly.nii.gz")).shape == nib.load(path).shape


def test_a_centre_map_lands_on_the_centre_voxel_when_slices_were_prepared_at_another_size(tmp_path):
    path, _, models = prepared_run(tmp_path, 48)
    preparation = preparation_record.for_scoring(str(models), prepared=False)

    def centre_maps(batch, names):
        maps = torch.zeros(batch.shape[0], *batch.shape[-2:])
        side = batch.shape[-1]
        maps[:, side // 2 - 1:side // 2 + 1, side // 2 - 1:side // 2 + 1] = 1.0
        return maps

    volume_scoring.score_volumes([path], centre_maps, 32, str(tmp_path / "c.csv"), 0.5, preparation=preparation)
    data = nib.load(str(tmp_path / "c" / "sub-a_anomaly.nii.gz")).get_fdata()
    k = nifti_volumes.prepare_volume(path, image_size=48).indices[0]
    plane = data[:, :, k]
    rows, cols = np.nonzero(plane >= 0.5 * plane.max())
    assert abs(rows.mean() - (SHAPE[0] - 1) / 2) <= 1.0 and abs(cols.mean() - (SHAPE[1] - 1) / 2) <= 1.0


def test_prepared_scans_on_a_run_without_a_record_need_the_slice_size(tmp_path):
    with pytest.raises(UserError) as caught:
        preparation_record.for_scoring(str(tmp_path), prepared=True)
    assert "--prepared_size" in str(caught.value) and str(tmp_path / "prepare.json") in str(caught.value)
    given = preparation_record.for_scoring(str(tmp_path), prepared=True, prepared_size=40)
    assert given.slice_size == 40
    _, _, models = prepared_run(tmp_path, 48)
    assert preparation_record.for_scoring(str(models), prepared=False).slice_size == 48
    assert preparation_record.for_scoring(str(models), prepared=True, prepared_size=48).slice_size == 48
    with pytest.raises(UserError, match="drop --prepared_size"):
        preparation_record.for_scoring(str(models), prepared=True, prepared_size=64)


def bad_volumes(folder):
    """{what: path} of volumes no scan can be made of."""
    affine = np.diag(list(ZOOMS) + [1.0])
    series = np.stack([brain_volume()] * 3, axis=-1)
    paths = {"4D series": write(nib.Nifti1Image(series, affine), folder / "series.nii.gz"),
             "2D image": write(nib.Nifti1Image(brain_volume()[:, :, 9], np.eye(4)), folder / "flat.nii.gz"),
             "NaN volume": write(nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), affine), folder / "nan.nii.gz"),
             "constant volume": write(nib.Nifti1Image(np.full(SHAPE, 7.0, np.float32), affine), folder / "const.nii"),
             "not NIfTI": str(folder / "fake.nii.gz")}
    (folder / "fake.nii.gz").write_bytes(b"this is not a NIfTI file")
    return paths


@pytest.mark.parametrize("what", ["4D series", "2D image", "NaN volume", "constant volume", "not NIfTI"])
def test_a_bad_volume_alone_is_a_user_error_naming_it(tmp_path, what):
    folder = tmp_path / "in"
    folder.mkdir()
    path = bad_volumes(folder)[what]
    with pytest.raises(UserError) as caught:
        volume_scoring.score_volumes([path], intensity_maps, 32, str(tmp_path / "s.csv"), 0.5)
    assert path in str(caught.value) and "Fix:" in str(caught.value)
    assert not os.path.exists(tmp_path / "s.csv") and not os.path.exists(tmp_path / "s")


def test_bad_volumes_in_a_folder_are_skipped_and_the_others_scored(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = bad_volumes(folder)
    write(ras_image(), folder / "sub-good.nii.gz")
    volumes = volume_scoring.find_volumes(str(folder))
    assert len(volumes) == 6
    rows, skipped = volume_scoring.score_volumes(volumes, intensity_maps, 32, str(tmp_path / "s.csv"), 0.5)
    assert [row["pid"] for row in rows] == ["sub-good"]
    assert sorted(path for path, _ in skipped) == sorted(bad.values())
    warnings = capsys.readouterr().err
    assert all(f"skipped {path}" in warnings for path in bad.values())
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    bad_volumes(only_bad)
    with pytest.raises(UserError, match="none of the 5 volumes"):
        volume_scoring.score_volumes(volume_scoring.find_volumes(str(only_bad)), intensity_maps, 32,
                                     str(tmp_path / "b.csv"), 0.5)


def test_existing_outputs_are_refused_and_kept(tmp_path):
    path = write(ras_image(), tmp_path / "sub-a.nii.gz")
    csv_path = str(tmp_path / "out.csv")
    volume_scoring.score_volumes([path], intensity_maps, 32, csv_path, 0.5)
    nifti = tmp_path / "out" / "sub-a_anomaly.nii.gz"
    before = nifti.read_bytes()
    with pytest.raises(UserError, match="already exist"):
        volume_scoring.score_volumes([path], lambda b, n: torch.zeros(b.shape[0], *b.shape[-2:]), 32, csv_path, 0.5)
    assert nifti.read_bytes() == before


def test_a_missing_volume_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        volume_scoring.find_volumes(str(tmp_path / "sub-x.nii.gz"))


def test_a_folder_of_volumes_and_slices_is_refused(tmp_path):
    write(ras_image(), tmp_path / "sub-a.nii.gz")
    (tmp_path / "x__000.png").write_bytes(b"")
    with pytest.raises(UserError, match="both NIfTI volumes"):
        volume_scoring.find_volumes(str(tmp_path))


def test_score_sh_on_a_nifti_scan_writes_csv_map_and_overlay(toy_dataset, tmp_path, capsys, monkeypatch):
    work = str(tmp_path)
    # the run scored (trained in this process: score.sh is what this test runs as a user does)
    assert train_sh_in_process(work, "Toy", *TINY_FLAGS, "--num_iters", "2", "--model_save_step", "2",
                               "--sample_step", "2", "--refiner_iters", "2") == 0
    # The scan is scored by score.sh as a subprocess; the refusals and the folder run score.sh's main.py command in
    # this process (starting Python and torch was most of their time), from the same folder.
    monkeypatch.chdir(work)

    def in_process(command, cwd):
        return run_in_process(command, capsys, cwd)

    scans = tmp_path / "scans"
    scans.mkdir()
    image = stored_as(ras_image(), "LPS")
    write(image, scans / "sub-01.nii.gz")
    write(nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), np.eye(4)), scans / "sub-nan.nii.gz")
    score = ["bash", f"{REPO}/score.sh", "Toy", "2"]
    flags = ["--num_workers", "0", "--ddim_steps", "2", "--score_batch_size", "4", "--refiner", "on"]
    # The toy slices were not made by prepare_data.py, so the run records no preparation to repeat on a scan.
    unknown = in_process([*score, "scans/sub-01.nii.gz", *flags], work)
    assert unknown.returncode == 2 and "records no preparation" in unknown.stderr and "--prepared" in unknown.stderr
    assert not (tmp_path / "runs/Toy/results/2/refined/scores_sub-01.csv").exists()
    flags.append("--prepared")
    sizeless = in_process([*score, "scans/sub-01.nii.gz", *flags], work)
    assert sizeless.returncode == 2 and "--prepared_size" in sizeless.stderr, sizeless.stderr[-3000:]
    flags += ["--prepared_size", "40"]  # the toy slices are 40 px PNGs
    one = run([*score, "scans/sub-01.nii.gz", *flags], work)
    assert one.returncode == 0, one.stderr[-3000:]
    results = tmp_path / "runs/Toy/results/2/refined"
    rows = read_csv(results / "scores_sub-01.csv")
    assert [r["pid"] for r in rows] == ["sub-01"]
    # flagged: the scan's score above the 95th percentile (--flag_percentile) of the known-healthy patients' scores
    with open(results / "healthy_reference.json") as f:
        healthy = json.load(f)["healthy_patient_scores"]
    threshold = np.percentile(healthy, 95)
    assert rows[0]["flagged"] == str(int(float(rows[0]["score"]) > threshold)), (rows[0], threshold)
    assert int(rows[0]["n_slices"]) == len(nifti_volumes.prepare_volume(str(scans / "sub-01.nii.gz"), image_size=40)
                                           .indices)
    out = nib.load(str(results / "scores_sub-01" / "sub-01_anomaly.nii.gz"))
    assert out.shape == image.shape and np.allclose(out.affine, image.affine) and out.get_fdata().max() > 0
    assert (results / "scores_sub-01" / "sub-01_anomaly.png").stat().st_size > 10_000

    again = in_process([*score, "scans/sub-01.nii.gz", *flags], work)
    assert again.returncode == 2 and "already exist" in again.stderr
    assert read_csv(results / "scores_sub-01.csv") == rows

    bad = in_process([*score, "scans/sub-nan.nii.gz", *flags], work)
    assert bad.returncode == 2 and "scans/sub-nan.nii.gz" in bad.stderr and "NaN" in bad.stderr

    folder = in_process([*score, "scans", *flags], work)
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert "skipped scans/sub-nan.nii.gz" in folder.stderr
    # the summary: scans done, refused with the reason, time
    assert "Scored 1 of 2 volumes" in folder.stdout and " s per scan" in folder.stdout
    assert "Refused 1 volume(s)" in folder.stderr and "NaN" in folder.stderr.split("Refused 1 volume(s)")[1]
    folder_rows = read_csv(results / "scores_scans.csv")
    assert folder_rows == rows  # same scan, same score, whether alone or in a folder
