"""The synthetic cohort: layout, manifest, determinism, ground-truth masks and a safe output folder."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from brainomaly.data.dataset_layout import patient_id
from brainomaly.data.synthetic_cohort import FOLDERS, ScannerModel, load_template, make_cohort, render_subject
from brainomaly.errors import UserError

TINY = dict(mixed=4, disease_share=0.5, healthy=2, test_pos=1, test_neg=1, image_size=32, n_slices=2,
            severity=(0.6, 0.9), progress=False)


def cohort_files(root):
    """{relative path: bytes} of every file a cohort run wrote."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cohort") / "Demo")
    return root, make_cohort(root, seed=3, **TINY)


def test_layout_names_and_masks(tiny_cohort):
    root, _ = tiny_cohort
    expected = {"train/pos": 2, "train/neg_mixed": 2, "train/neg": 2, "test/pos": 1, "test/neg": 1}
    pids = []
    for folder in FOLDERS:
        names = sorted(os.listdir(os.path.join(root, folder)))
        folder_pids = sorted({patient_id(n) for n in names})
        assert len(folder_pids) == expected[folder]
        assert names == [f"{pid}__{k:03d}.png" for pid in folder_pids for k in range(2)]
        pids += folder_pids
        for name in names:
            image = np.asarray(Image.open(os.path.join(root, folder, name)))
            assert image.shape == (32, 32) and image.dtype == np.uint8
            assert image[0, 0] == 0  # black background around a centred brain
            for kind in ("masks", "brain_masks"):
                mask = np.asarray(Image.open(os.path.join(root, kind, folder, name)))
                assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert len(pids) == len(set(pids)) == 8
    assert all(pid.startswith("sub-") and len(pid) == 8 for pid in pids)
    # Masks live outside the training folders, so a training run never reads them as slices.
    assert not any("mask" in p for p in os.listdir(os.path.join(root, "train")))


def test_manifest_matches_files_and_labels(tiny_cohort):
    root, rows = tiny_cohort
    with open(os.path.join(root, "manifest.csv")) as handle:
        manifest = list(csv.DictReader(handle))
    assert list(manifest[0]) == ["path", "pid", "split", "folder", "label", "severity"]
    on_disk = {os.path.relpath(os.path.join(d, n), root) for folder in FOLDERS
               for d, _, names in os.walk(os.path.join(root, folder)) for n in names}
    assert {row["path"] for row in manifest} == on_disk
    assert len(manifest) == len(rows) == 16
    mask_pixels = {}
    for row in manifest:
        assert row["folder"] == os.path.dirname(row["path"]) and row["split"] == row["folder"].split("/")[0]
        assert row["pid"] == patient_id(row["path"])
        assert int(row["label"]) == int(row["folder"].endswith("pos"))
        severity = float(row["severity"])
        assert (0.6 <= severity <= 0.9) if row["label"] == "1" else severity == 0.0
        mask = np.asarray(Image.open(os.path.join(root, "masks", row["path"])))
        mask_pixels[(row["pid"], row["label"])] = mask_pixels.get((row["pid"], row["label"]), 0) + (mask > 0).sum()
    # Every diseased subject has ground-truth pixels; a healthy one has none.
    assert all((count > 0) == (label == "1") for (_, label), count in mask_pixels.items())


def test_same_seed_same_bytes_other_seed_other_images(tiny_cohort, tmp_path):
    root, _ = tiny_cohort
    again = str(tmp_path / "again")
    make_cohort(again, seed=3, **TINY)
    assert cohort_files(again) == cohort_files(root)
    other = str(tmp_path / "other")
    make_cohort(other, seed=4, **TINY)
    slices = lambda files: {data for path, data in files.items() if path.startswith(("train/", "test/"))}
    assert not slices(cohort_files(root)) & slices(cohort_files(other))  # no slice of one seed recurs in the other


@pytest.mark.parametrize("seed, lesions", [(11, False), (12, False), (13, True)])
def test_disease_changes_the_subject_only_inside_its_mask(seed, lesions):
    template = load_template()
    healthy = render_subject(template, seed, 0.0, image_size=48, n_slices=3, lesions=lesions)
    diseased = render_subject(template, seed, 0.8, image_size=48, n_slices=3, lesions=lesions)
    as_png = lambda image: np.rint(image * 255).astype(np.uint8)  # what save_slice_png writes
    mask = diseased["mask"]
    assert mask.sum() > 50 and not healthy["mask"].any()
    np.testing.assert_array_equal(as_png(diseased["image"])[~mask], as_png(healthy["image"])[~mask])
    np.testing.assert_array_equal(diseased["brain"], healthy["brain"])
    changed = as_png(diseased["image"])[mask] != as_png(healthy["image"])[mask]
    assert changed.mean() > 0.9
    # Atrophy replaces tissue by CSF, which is dark on T1.
    assert diseased["image"][mask].mean() < healthy["image"][mask].mean() - 0.1
    assert mask[~diseased["brain"]].sum() == 0


def test_the_intensity_model_changes_intensities_and_leaves_anatomy_alone():
    template = load_template()
    default = render_subject(template, 21, 0.8, image_size=48, n_slices=3)
    other = render_subject(template, 21, 0.8, image_size=48, n_slices=3,
                           scanner_model=ScannerModel(csf_signal=0.25, gamma_sd=0.3, noise=(0.0, 0.0), bias=0.0))
    # the same subject: same brain and the same diseased pixels
    np.testing.assert_array_equal(default["brain"], other["brain"])
    np.testing.assert_array_equal(default["mask"], other["mask"])
    # brighter CSF: the diseased pixels (tissue turned CSF) are lighter relative to the brain
    relative = lambda render: render["image"][render["mask"]].mean() / render["image"][render["brain"]].mean()  # noqa
    assert relative(other) > relative(default) + 0.1


def test_refuses_a_non_empty_output_and_overwrite_keeps_other_files(tmp_path):
    root = tmp_path / "Demo"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite") as err:
        make_cohort(str(root), **TINY)
    assert str(root) in str(err.value)
    assert os.listdir(root) == ["notes.txt"]
    (root / "train" / "pos").mkdir(parents=True)
    (root / "train" / "pos" / "stale__000.png").write_bytes(b"old cohort")
    make_cohort(str(root), overwrite=True, **TINY)
    assert (root / "notes.txt").read_text() == "mine"
    assert not (root / "train" / "pos" / "stale__000.png").exists()


def test_nifti_flag_writes_each_subject_as_a_ras_volume_of_its_slices(tmp_path):
    import nibabel as nib
    root = str(tmp_path / "Demo")
    rows = make_cohort(root, seed=3, nifti=True, **{**TINY, "mixed": 2, "healthy": 0, "test_pos": 0, "test_neg": 0})
    row = rows[0]
    volume = nib.load(os.path.join(root, "nifti", row["folder"], f"{row['pid']}.nii.gz"))
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S") and volume.shape == (32, 32, 2)
    assert int(volume.header["qform_code"]) == 1 and int(volume.header["sform_code"]) == 4
    data = volume.get_fdata()
    for k in range(2):
        with Image.open(os.path.join(root, row["folder"], f"{row['pid']}__{k:03d}.png")) as png:
            pixels = np.asarray(png, dtype=np.float64) / 255
        # The PNG has anterior up and MNI x (left -> right) across: the volume's y runs upwards.
        np.testing.assert_allclose(data[:, ::-1, k].T, pixels, atol=0.5 / 255 + 1e-6)
