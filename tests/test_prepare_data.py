"""prepare_data.py (brainomaly/data/nifti_volumes.py, layout_staging.py, slice_importers.py, prepare_command.py):
NIfTI volumes, the Kaggle tree and split CSVs become the layout the trainer reads."""
import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from brainomaly.data import dataset_layout, layout_staging, nifti_volumes, prepare_command, slice_importers
from brainomaly.data.dataset_layout import patient_id
from brainomaly.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = (24, 28, 20)  # x (left->right), y (posterior->anterior), z (inferior->superior)
CENTRE = np.array([11.5, 13.5, 9.5])
RADII = np.array([8.0, 10.0, 7.0])


def ellipsoid():
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    return (((grid - CENTRE) / RADII) ** 2).sum(-1) <= 1.0


def ras_brain():
    """A RAS-ordered volume: ellipsoid brain, patient-right half brighter, bright anterior marker."""
    rng = np.random.default_rng(0)
    brain = ellipsoid()
    data = np.zeros(SHAPE, dtype=np.float32)
    data[brain] = 60.0 + rng.uniform(0.0, 20.0, size=int(brain.sum()))
    data[12:, :, :][brain[12:, :, :]] += 40.0  # x >= 12 is the patient's right
    data[11:13, 21:23, :][brain[11:13, 21:23, :]] = 400.0  # anterior marker (y near the front of the brain)
    return data, brain


def write_volumes(root):
    """Three volumes of the same brain: RAS, y stored flipped (hand-made affine), and axes stored as P,S,L."""
    data, brain = ras_brain()
    volumes = root / "volumes"
    volumes.mkdir()
    ras = nib.Nifti1Image(data, np.eye(4))
    nib.save(ras, volumes / "sub-ras.nii.gz")
    flipped_affine = np.diag([1.0, -1.0, 1.0, 1.0])
    flipped_affine[1, 3] = SHAPE[1] - 1  # stored j = 0 is the most anterior plane
    nib.save(nib.Nifti1Image(data[:, ::-1, :].copy(), flipped_affine), volumes / "sub-flip.nii")
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt("PSL"))
    psl = ras.as_reoriented(transform)
    assert nib.aff2axcodes(psl.affine) == ("P", "S", "L")
    nib.save(psl, volumes / "sub-psl.nii.gz")
    return volumes, brain


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png")) if os.path.isdir(folder) else []


def read_png(path):
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image, dtype=np.float64)


@pytest.fixture
def nifti_inputs(tmp_path):
    volumes, brain = write_volumes(tmp_path)
    split = write_csv(tmp_path / "split.csv", ["file", "folder"],
                      [["sub-ras.nii.gz", "pos"], ["sub-flip.nii", "train/neg"], ["sub-psl", "test_neg"]])
    return volumes, split, brain


def expected_slices(brain, fraction):
    area = brain.sum(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(area >= fraction * area.max())]


def test_nifti_layout_slice_choice_intensity_and_orientation(tmp_path, nifti_inputs):
    volumes, split, brain = nifti_inputs
    out = tmp_path / "data" / "Toy"
    counts = prepare_command.prepare_nifti(str(volumes), str(split), str(out), min_brain_fraction=0.3, image_size=32)

    keep = expected_slices(brain, 0.3)
    assert 0 < len(keep) < SHAPE[2]  # the fraction really drops the thin top and bottom slices
    names = {pid: [prepare_command.slice_filename(pid, k) for k in keep] for pid in ("sub-ras", "sub-flip", "sub-psl")}
    assert pngs(out / "train/pos") == names["sub-ras"]
    assert pngs(out / "train/neg") == names["sub-flip"]
    assert pngs(out / "test/neg") == names["sub-psl"]
    assert pngs(out / "train/neg_mixed") == [] and pngs(out / "test/pos") == []
    assert counts["train/pos"] == (len(keep), 1)
    assert {patient_id(n) for n in names["sub-ras"]} == {"sub-ras"}
    assert (out / layout_staging.MANIFEST_NAME).is_file()
    assert not [n for n in os.listdir(out) if n.startswith(".prepare_data")]  # staging folder is gone

    middle = prepare_command.slice_filename("sub-ras", keep[len(keep) // 2])
    image = read_png(out / "train/pos" / middle)
    assert image.shape == (32, 32)
    assert image.min() == 0 and image.max() == 255  # background black, top brain percentile white
    brain_pixels = image[image > 0]
    assert brain_pixels.size > 100 and np.median(brain_pixels) < 200  # the marker does not wash the brain out

    rows, cols = np.nonzero(image == 255)
    assert rows.mean() < 32 / 2 - 3  # the anterior marker is in the upper part of the image
    assert abs(cols.mean() - 15.5) < 3  # ... and left-right centred
    left, right = image[:, :16], image[:, 16:]
    assert left[left > 0].mean() > right[right > 0].mean()  # radiological: the patient's right is on the left

    # the flipped-affine and permuted-axes volumes hold the same brain: identical slices, marker on top too
    for folder, pid in (("train/neg", "sub-flip"), ("test/neg", "sub-psl")):
        for k in keep:
            np.testing.assert_array_equal(read_png(out / folder / prepare_command.slice_filename(pid, k)),
                                          read_png(out / "train/pos" / prepare_command.slice_filename("sub-ras", k)))


def test_nifti_explicit_slices_and_masks(tmp_path, nifti_inputs):
    volumes, split, brain = nifti_inputs
    masks = tmp_path / "masks"
    masks.mkdir()
    cut = brain.copy()
    cut[:12] = False  # a mask of the patient's right half only (x >= 12): the rest must be zeroed
    for name in os.listdir(volumes):
        image = nib.load(volumes / name)
        ras = nib.as_closest_canonical(image)
        mask_ras = nib.Nifti1Image(cut.astype(np.uint8), ras.affine)
        nib.save(mask_ras.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(image.affine))), masks / name)
    out = tmp_path / "out"
    prepare_command.prepare_nifti(str(volumes), str(split), str(out), masks=str(masks), slices="5:9", image_size=24)
    assert pngs(out / "train/pos") == [f"sub-ras__00{k}.png" for k in range(5, 9)]
    image = read_png(out / "test/neg" / "sub-psl__007.png")
    assert image[:, 12:].max() == 0  # outside the mask (patient's left = image right) is black
    assert image[:, :12].max() > 100  # inside it (patient's right = image left) the brain is kept


def test_nifti_command_line(tmp_path, nifti_inputs):
    volumes, split, _ = nifti_inputs
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "prepare_data.py", "nifti", "--volumes", str(volumes),
                             "--split", str(split), "--out", str(out), "--image_size", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    n = len(pngs(out / "train/pos"))
    assert n > 0 and read_png(out / "train/pos" / pngs(out / "train/pos")[0]).shape == (20, 20)
    assert f"train/pos        {n:>7} slices from 1 patients" in result.stdout  # the count per folder


def test_nifti_missing_volume_is_exit_2_naming_it(tmp_path, nifti_inputs, capsys):
    volumes, _, _ = nifti_inputs
    split = write_csv(tmp_path / "bad.csv", ["patient_id", "folder"], [["sub-ras", "pos"], ["sub-gone", "neg"]])
    out = tmp_path / "out"
    code = prepare_command.main(["nifti", "--volumes", str(volumes), "--split", str(split), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert os.path.join(str(volumes), "sub-gone.nii.gz") in err and "Fix:" in err
    assert not out.exists()  # checked before anything is written


def test_nifti_unreadable_volume_leaves_nothing_behind(tmp_path, nifti_inputs, capsys):
    volumes, split, _ = nifti_inputs
    (volumes / "sub-flip.nii").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    code = prepare_command.main(["nifti", "--volumes", str(volumes), "--split", str(split), "--out", str(out)])
    assert code == 2 and "sub-flip.nii" in capsys.readouterr().err
    assert not out.exists()  # the slices of the volume read before the broken one were not kept half-done


def test_non_empty_output_needs_overwrite_and_keeps_files(tmp_path, nifti_inputs):
    volumes, split, _ = nifti_inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [sys.executable, "prepare_data.py", "nifti", "--volumes", str(volumes), "--split", str(split),
            "--out", str(out), "--slices", "2:4", "--image_size", "16"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert str(out) in result.stderr and "--overwrite" in result.stderr
    assert os.listdir(out) == ["notes.txt"]

    stale = out / "train/pos/old__000.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    assert prepare_command.main(args[2:] + ["--overwrite"]) == 0
    assert pngs(out / "train/pos") == ["sub-ras__002.png", "sub-ras__003.png"]  # the layout folder is replaced
    assert (out / "notes.txt").read_text() == "mine"  # other files are kept


def test_square_resize_keeps_physical_proportions():
    image = np.ones((10, 20), dtype=np.float32)
    same = nifti_volumes.square_resize(image, (2.0, 1.0), 20)  # 20 mm x 20 mm: fills the square
    assert same.shape == (20, 20) and same.min() > 0.99
    padded = nifti_volumes.square_resize(image, (1.0, 1.0), 20)  # 10 mm x 20 mm: centred band, zero padding
    assert padded[5:15].min() > 0.99 and padded[:5].max() == 0 and padded[15:].max() == 0


# ------------------------------------------------------------------------------------------------ kaggle

KAGGLE_COUNTS = {
    ("train", "No Impairment"): 10, ("train", "Very Mild Impairment"): 3, ("train", "Mild Impairment"): 3,
    ("train", "Moderate Impairment"): 2, ("test", "No Impairment"): 3, ("test", "Very Mild Impairment"): 2,
    ("test", "Mild Impairment"): 1, ("test", "Moderate Impairment"): 1,
}


def fake_kaggle(root):
    src = root / "Combined Dataset"
    rng = np.random.default_rng(1)
    for (split, cls), n in KAGGLE_COUNTS.items():
        folder = src / split / cls
        folder.mkdir(parents=True)
        for i in range(n):
            size = (16, 20) if i % 2 else (12, 12)  # (width, height)
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{split[:2]} ({i}).jpg", quality=95)
    return src


def layout_listing(out):
    return {folder: pngs(out / folder) for folder in dataset_layout.LAYOUT_FOLDERS}


def test_kaggle_shares_names_sizes_and_seed(tmp_path, capsys):
    src = fake_kaggle(tmp_path)
    counts = slice_importers.prepare_kaggle(str(src), str(tmp_path / "a"), mixed_disease_share=0.4, neg_share=0.5, seed=0)
    stdout = capsys.readouterr().out
    assert {f: c[0] for f, c in counts.items()} == {
        "test/neg": 3, "test/pos": 4,  # every test image, healthy vs the three impaired classes
        "train/neg": 5, "train/neg_mixed": 5,  # neg_share 0.5 of the 10 healthy training images
        "train/pos": 3,  # round(0.4 * 5 / 0.6): 3 / (3 + 5) is the closest to 40% diseased
    }
    sizes = stdout.split("image sizes (width x height: count): ")[1].splitlines()[0]  # real sizes, not assumed
    assert [s.split(":")[0] for s in sizes.split(", ")] == ["12x12", "16x20"]
    assert sum(int(s.split(": ")[1]) for s in sizes.split(", ")) == 20  # every image written
    assert "rho = 0.625" in stdout

    listing = layout_listing(tmp_path / "a")
    every = [n for names in listing.values() for n in names]
    assert len(set(every)) == len(every)  # one patient per image, no id shared between folders
    assert all("__" not in n for n in every)
    assert all(n.startswith("no-impairment_") for n in listing["train/neg"] + listing["test/neg"])
    assert all(not n.startswith("no-impairment_") for n in listing["train/pos"] + listing["test/pos"])
    assert "no-impairment_tr-0.png" in every  # readable: class slug + original stem
    assert read_png(tmp_path / "a/test/neg/no-impairment_te-0.png").shape == (12, 12)  # native size, grayscale

    slice_importers.prepare_kaggle(str(src), str(tmp_path / "b"), 0.4, 0.5, seed=0)
    slice_importers.prepare_kaggle(str(src), str(tmp_path / "c"), 0.4, 0.5, seed=1)
    assert layout_listing(tmp_path / "b") == listing  # same seed, same split
    assert layout_listing(tmp_path / "c") != listing  # the seed drives the split


def test_kaggle_caps_the_disease_share_and_says_so(tmp_path, capsys):
    src = fake_kaggle(tmp_path)
    counts = slice_importers.prepare_kaggle(str(src), str(tmp_path / "out"), mixed_disease_share=0.9, neg_share=0.5)
    assert counts["train/pos"][0] == 8  # all impaired training images there are
    assert "only 8 exist" in capsys.readouterr().out


def test_kaggle_missing_class_folder_is_exit_2_naming_it(tmp_path, capsys):
    src = fake_kaggle(tmp_path)
    missing = src / "test" / "Mild Impairment"
    for name in os.listdir(missing):
        os.remove(missing / name)
    missing.rmdir()
    out = tmp_path / "out"
    assert prepare_command.main(["kaggle", "--src", str(src), "--out", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()



def test_kaggle_without_subject_ids_warns_that_each_image_is_its_own_patient(tmp_path, capsys):
    src = fake_kaggle(tmp_path)
    assert prepare_command.main(["kaggle", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "each image is its own patient" in err and "inflates AUCp and the inductive AUC" in err
    assert "--subjects" in err


def kaggle_subject(split, cls, i):
    """A made-up grouping of the fake Kaggle images: two images per subject (per split and class); subject tr-h0
    also has the first healthy test image, so it is in Kaggle's train/ and test/ at once."""
    if cls == "No Impairment":
        return "tr-h0" if (split, i) == ("test", 0) else f"{split[:2]}-h{i // 2}"
    return f"{split[:2]}-d{sorted(c for s, c in KAGGLE_COUNTS if s == split).index(cls)}-{i // 2}"


def write_subjects(tmp_path, src, skip=None, relabel=None):
    rows = []
    for (split, cls), n in KAGGLE_COUNTS.items():
        for i in range(n):
            if (split, cls, i) == skip:
                continue
            subject = kaggle_subject(split, cls, i)
            rows.append([f"{split}/{cls}/{split[:2]} ({i}).jpg", relabel.get((split, cls, i), subject)
                         if relabel else subject])
    return write_csv(tmp_path / "subjects.csv", ["image", "subject"], rows)


def test_kaggle_subjects_csv_puts_all_of_a_subjects_images_in_one_folder_as_one_patient(tmp_path, capsys):
    src = fake_kaggle(tmp_path)
    out = tmp_path / "out"
    assert prepare_command.main(["kaggle", "--src", str(src), "--out", str(out), "--subjects",
                                 str(write_subjects(tmp_path, src))]) == 0
    captured = capsys.readouterr()
    assert "each image is its own patient" not in captured.err
    expected = {}
    for (split, cls), n in KAGGLE_COUNTS.items():
        for i in range(n):
            subject = kaggle_subject(split, cls, i)
            expected[subject] = expected.get(subject, 0) + 1
    listing = layout_listing(out)
    folders = {}
    for folder, names in listing.items():
        for name in names:
            assert "__" in name, name  # <subject>__NNN.png: the subject is the patient
            folders.setdefault(patient_id(name), set()).add(folder)
    assert set(folders) <= set(expected) and all(len(f) == 1 for f in folders.values())  # one folder per subject
    written = {pid: sum(patient_id(n) == pid for names in listing.values() for n in names) for pid in folders}
    assert written == {pid: expected[pid] for pid in folders}  # every image of every subject written
    # every test subject and every healthy one is written; of the impaired training subjects, what the share needs:
    # round(0.4 * 2 / 0.6) = 1 subject beside the 2 healthy subjects of the mixed set
    assert set(expected) - set(folders) == {pid for pid in expected if pid.startswith("tr-d")} - set(folders)
    assert len([pid for pid, f in folders.items() if f == {"train/pos"}]) == 1
    assert folders["tr-h0"] == {"test/neg"} and written["tr-h0"] == 3  # it had a test image: all go to test
    healthy_train = {pid for pid in expected if pid.startswith("tr-h")} - {"tr-h0"}
    assert {pid for pid, f in folders.items() if f & {"train/neg", "train/neg_mixed"}} == healthy_train
    assert len([pid for pid in healthy_train if folders[pid] == {"train/neg"}]) == round(0.5 * len(healthy_train))
    mixed = [pid for pid, f in folders.items() if f & {"train/pos", "train/neg_mixed"}]
    rho = sum(folders[pid] == {"train/neg_mixed"} for pid in mixed) / len(mixed)
    assert f"rho = {rho:.3f}" in captured.out  # the healthy share of the mixed set's patients
    assert "1 subject(s) have images in both train/ and test/" in captured.out


@pytest.mark.parametrize("case", ["image missing", "healthy and impaired", "unknown image"])
def test_a_bad_subjects_csv_is_exit_2_naming_the_row_or_image(tmp_path, capsys, case):
    src = fake_kaggle(tmp_path)
    if case == "image missing":
        subjects = write_subjects(tmp_path, src, skip=("train", "Mild Impairment", 2))
        expected = ["gives no subject for 1 of the 25 images", "train/Mild Impairment/tr (2).jpg"]
    elif case == "healthy and impaired":
        subjects = write_subjects(tmp_path, src, relabel={("train", "Mild Impairment", 0): "tr-h1"})
        expected = ["subject tr-h1 has images of No Impairment and Mild Impairment"]
    else:
        subjects = write_subjects(tmp_path, src)
        with open(subjects, "a") as handle:
            handle.write("train/No Impairment/elsewhere.jpg,tr-h9\n")
        expected = [f"{subjects} row 27", "train/No Impairment/elsewhere.jpg"]
    out = tmp_path / "out"
    assert prepare_command.main(["kaggle", "--src", str(src), "--out", str(out), "--subjects", str(subjects)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Fix:" in err and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ csv

def sliced_tree(root):
    src = root / "slices"
    for sub, pid, n in (("a", "p1", 2), ("a", "p2", 1), ("b", "p3", 3), ("b/c", "p4", 1), ("b", "p5", 2),
                        ("b", "extra", 1)):
        (src / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(np.full((8, 8), 10 * k, dtype=np.uint8), mode="L").save(src / sub / f"{pid}__{k:03d}.png")
    return src


ADNI_ROWS = [["p1", "AD_Mixed", "train"], ["p2", "NL_Mixed", "train"], ["p3", "NL", "train"],
             ["p4", "AD", "test"], ["p5", "NL", "test"], ["p6", "NL", "test"], ["p7", "AD", "test"]]


def test_csv_maps_adni_classes_and_warns_about_missing_patients(tmp_path, capsys):
    src = sliced_tree(tmp_path)
    split = write_csv(tmp_path / "AD_DS1.csv", ["patient_id", "class", "split"], ADNI_ROWS)
    out = tmp_path / "out"
    assert prepare_command.main(["csv", "--split", str(split), "--src", str(src), "--out", str(out), "--link"]) == 0
    captured = capsys.readouterr()
    assert layout_listing(out) == {
        "train/pos": ["p1__000.png", "p1__001.png"], "train/neg_mixed": ["p2__000.png"],
        "train/neg": ["p3__000.png", "p3__001.png", "p3__002.png"], "test/pos": ["p4__000.png"],
        "test/neg": ["p5__000.png", "p5__001.png"],
    }
    assert os.path.samefile(out / "test/pos/p4__000.png", src / "b/c/p4__000.png")  # --link hard-links
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 of 7" in warnings[0] and "p6" in warnings[0] and "p7" in warnings[0]


def test_csv_copies_and_class_map_overrides(tmp_path):
    src = sliced_tree(tmp_path)
    split = write_csv(tmp_path / "split.csv", ["patient_id", "class", "split"],
                      [["p1", "Dementia", "train"], ["p2", "CN", "train"], ["p3", "CN", "test"], ["extra", "MCI", "x"]])
    out = tmp_path / "out"
    slice_importers.prepare_csv(str(split), str(src), str(out),
                             "Dementia=train/pos,CN:train=neg_mixed,CN:test=test/neg,MCI=skip")
    assert pngs(out / "train/pos") == ["p1__000.png", "p1__001.png"]
    assert pngs(out / "test/neg") == ["p3__000.png", "p3__001.png", "p3__002.png"]
    assert not os.path.samefile(out / "train/pos/p1__000.png", src / "a/p1__000.png")  # a copy by default
    assert "extra__000.png" not in sum(layout_listing(out).values(), [])


def test_csv_patient_in_two_folders_is_exit_2(tmp_path, capsys):
    src = sliced_tree(tmp_path)
    split = write_csv(tmp_path / "split.csv", ["patient_id", "class", "split"], ADNI_ROWS + [["p1", "NL", "test"]])
    out = tmp_path / "out"
    assert prepare_command.main(["csv", "--split", str(split), "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "p1" in err and "train/pos" in err and "test/neg" in err and str(split) in err
    assert not out.exists()


def test_csv_unknown_class_is_a_user_error(tmp_path):
    src = sliced_tree(tmp_path)
    split = write_csv(tmp_path / "split.csv", ["patient_id", "class", "split"], [["p1", "MCI", "train"]])
    with pytest.raises(UserError, match="--class_map"):
        slice_importers.prepare_csv(str(split), str(src), str(tmp_path / "out"))


def test_output_inside_source_is_refused(tmp_path):
    src = sliced_tree(tmp_path)
    split = write_csv(tmp_path / "AD_DS1.csv", ["patient_id", "class", "split"], ADNI_ROWS)
    with pytest.raises(UserError, match="overlap"):
        slice_importers.prepare_csv(str(split), str(src), str(src / "out"))


@pytest.mark.parametrize("command", ["nifti", "csv"])
def test_a_split_csv_saved_as_cp1252_is_one_message_naming_file_and_line(tmp_path, nifti_inputs, capsys, command):
    volumes, _, _ = nifti_inputs
    split = tmp_path / "windows.csv"
    if command == "nifti":
        text = "file,folder,note\nsub-ras.nii.gz,pos,ok\nsub-flip.nii,neg,scanner \u2013 caf\u00e9\n"
        argv = ["nifti", "--volumes", str(volumes)]
    else:
        text = "patient_id,class,split,note\np1,AD_Mixed,,ok\np2,NL,train,scanner \u2013 caf\u00e9\n"
        (tmp_path / "slices").mkdir()
        argv = ["csv", "--src", str(tmp_path / "slices")]
    split.write_bytes(text.encode("cp1252"))
    out = tmp_path / "out"
    assert prepare_command.main([*argv, "--split", str(split), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {split} line 3 is not UTF-8 text") and "Traceback" not in err
    assert "Fix: save it as UTF-8" in err and "--split" in err
    assert not out.exists()
