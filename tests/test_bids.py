"""prepare_data.py bids: a BIDS tree + rules over participants.tsv -> the layout, split.csv and prepare.json."""
import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from brainomaly.data import dataset_layout, layout_staging, prepare_command
from brainomaly.data.synthetic_cohort import make_cohort

pytest.importorskip("bids", reason="pybids is an optional extra (requirements-preprocess.txt); CI installs it")

RULES = ["--healthy", "cohort == 'ref'", "--mixed", "cohort == 'pool'", "--test", "cohort == 'test'",
         "--diseased", "group == 'AD'"]
BROKEN = "sub-9999"  # listed in participants.tsv, no scan on disk
TWO_SESSIONS = "sub-0005"  # a known-healthy subject scanned twice


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """make_cohort --nifti output: 2 + 2 mixed, 2 known-healthy, 1 + 1 test subjects, 6 slices of 32 px."""
    root = str(tmp_path_factory.mktemp("cohort") / "Vol")
    rows = make_cohort(root, mixed=4, disease_share=0.5, healthy=2, test_pos=1, test_neg=1, image_size=32,
                       n_slices=6, seed=5, progress=False, nifti=True)
    subjects = {}
    for row in rows:
        subjects[row["pid"]] = (row["folder"], int(row["label"]))
    return root, subjects


def build_bids(cohort, root):
    """A BIDS tree of the cohort's volumes; TWO_SESSIONS has ses-01 and ses-02 (ses-02 at half intensity)."""
    source, subjects = cohort
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    lines = ["participant_id\tgroup\tcohort\tage"]
    for pid, (folder, label) in sorted(subjects.items()):
        volume = os.path.join(source, "nifti", folder, f"{pid}.nii.gz")
        cohort_name = {"train/neg": "ref", "test/pos": "test", "test/neg": "test"}.get(folder, "pool")
        lines.append(f"{pid}\t{'AD' if label else 'CN'}\t{cohort_name}\t70")
        if pid == TWO_SESSIONS:
            for session, factor in (("01", 1.0), ("02", 0.5)):
                anat = root / pid / f"ses-{session}" / "anat"
                anat.mkdir(parents=True)
                image = nib.load(volume)
                nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) * factor, image.affine),
                         anat / f"{pid}_ses-{session}_T1w.nii.gz")
        else:
            (root / pid / "anat").mkdir(parents=True)
            shutil.copyfile(volume, root / pid / "anat" / f"{pid}_T1w.nii.gz")
    lines.append(f"{BROKEN}\tCN\tspare\tn/a")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root, subjects


@pytest.fixture
def bids_root(cohort, tmp_path):
    return build_bids(cohort, tmp_path / "bids")


def patients(folder):
    return sorted({name.split("__")[0] for name in os.listdir(folder)}) if os.path.isdir(folder) else []


def test_rules_put_each_subject_in_its_folder_and_split_csv_says_where(bids_root, tmp_path, capsys):
    root, subjects = bids_root
    out = tmp_path / "data"
    assert prepare_command.main(["bids", "--root", str(root), "--out", str(out), *RULES, "--image_size", "32"]) == 0
    for folder in dataset_layout.LAYOUT_FOLDERS:
        assert patients(out / folder) == sorted(p for p, (f, _) in subjects.items() if f == folder), folder
    with open(out / "split.csv") as handle:
        split = {row["participant_id"]: row for row in csv.DictReader(handle)}
    assert set(split) == set(subjects)  # the spare subject matched no rule and is left out
    assert all(split[p]["folder"] == f and split[p]["label"] == str(label) for p, (f, label) in subjects.items())
    assert split[TWO_SESSIONS]["session"] == "01"
    assert split[TWO_SESSIONS]["file"] == f"{TWO_SESSIONS}/ses-01/anat/{TWO_SESSIONS}_ses-01_T1w.nii.gz"
    printed = capsys.readouterr().out
    assert f"{TWO_SESSIONS} has 2 T1w scans; using {split[TWO_SESSIONS]['file']}" in printed
    assert f"prepared {len(subjects)} scans in " in printed  # the summary
    with open(out / "prepare.json") as handle:
        record = json.load(handle)
    assert record["command"] == "bids" and record["preprocess"] is None and record["min_brain_fraction"] == 0.3


def sources(out):
    """{patient id: the scan its slices were made from} from the manifest."""
    with open(out / layout_staging.MANIFEST_NAME) as handle:
        return {row["patient_id"]: row["source"] for row in csv.DictReader(handle)}


def test_session_flag_picks_that_session_and_subjects_without_sessions_keep_theirs(bids_root, tmp_path):
    root, subjects = bids_root
    out = tmp_path / "data"
    assert prepare_command.main(["bids", "--root", str(root), "--out", str(out), *RULES, "--image_size", "32",
                              "--session", "02"]) == 0
    used = sources(out)
    assert used[TWO_SESSIONS] == str(root / TWO_SESSIONS / "ses-02" / "anat" / f"{TWO_SESSIONS}_ses-02_T1w.nii.gz")
    other = next(p for p in subjects if p != TWO_SESSIONS)
    assert used[other] == str(root / other / "anat" / f"{other}_T1w.nii.gz")


@pytest.mark.parametrize("case", ["no participants.tsv", "rule matching nobody", "subject in two sets",
                                  "T1 missing", "session missing", "healthy subject labelled diseased",
                                  "participant_id n/a", "participants.tsv in Latin-1"])
def test_bad_bids_input_is_one_message_exit_2_and_nothing_written(bids_root, tmp_path, capsys, case):
    root, subjects = bids_root
    rules = list(RULES)
    diseased = next(p for p, (folder, _) in sorted(subjects.items()) if folder == "train/pos")
    expected = {"no participants.tsv": ["participants.tsv not found", "Fix: add a participants.tsv"],
                "rule matching nobody": ["--mixed \"cohort == 'nobody'\" matches no row", "Fix:"],
                "subject in two sets": ["is matched by both --healthy", "--mixed \"group == 'CN'\"", "Fix:"],
                "T1 missing": [f"{BROKEN} has no T1w scan", "Fix: add the scan, or leave"],
                "session missing": [f"{TWO_SESSIONS} has no T1w scan with session 03 (it has session 01, 02)",
                                    "Fix: pick another --session"],
                "healthy subject labelled diseased": ["is in the known-healthy set", "Fix:"],
                "participant_id n/a": [f"{root / 'participants.tsv'} line 4 has no participant_id (n/a)",
                                       "Fix: give that row its subject's id"],
                "participants.tsv in Latin-1": [f"{root / 'participants.tsv'} line 3 is not UTF-8 text",
                                                "Fix: save it as UTF-8", "iconv"]}[case]
    if case == "no participants.tsv":
        os.remove(root / "participants.tsv")
    elif case == "rule matching nobody":
        rules[3] = "cohort == 'nobody'"
    elif case == "subject in two sets":
        rules[3] = "group == 'CN'"
    elif case == "T1 missing":
        rules[1] = "cohort == 'ref' or cohort == 'spare'"
    elif case == "session missing":
        rules += ["--session", "03"]
    elif case == "participant_id n/a":
        lines = (root / "participants.tsv").read_text().splitlines()
        lines[3] = "n/a\t" + lines[3].split("\t", 1)[1]
        (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    elif case == "participants.tsv in Latin-1":
        lines = (root / "participants.tsv").read_text().splitlines()
        sites = ["site"] + ["Zürich" if number == 2 else "Bern" for number in range(1, len(lines))]
        text = "\n".join(f"{line}\t{site}" for line, site in zip(lines, sites)) + "\n"
        (root / "participants.tsv").write_bytes(text.encode("latin-1"))
    else:
        rules[1] = f"cohort == 'ref' or participant_id == '{diseased}'"
        rules[3] = f"cohort == 'pool' and participant_id != '{diseased}'"
    out = tmp_path / "data"
    code = prepare_command.main(["bids", "--root", str(root), "--out", str(out), *rules, "--image_size", "32"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()
