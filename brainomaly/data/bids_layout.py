"""A BIDS dataset -> which T1w scan of which participant goes to which layout folder (pybids, an optional extra).

Rules are pandas query expressions over participants.tsv, given on the command line:
    --healthy  RULE   the known-healthy set H           -> train/neg
    --mixed    RULE   the unannotated mixed set M       -> train/pos (matches --diseased) or train/neg_mixed
    --test     RULE   the labelled test set (optional)  -> test/pos (matches --diseased) or test/neg
    --diseased RULE   the label inside M and the test set (used to evaluate only, never to train)
e.g. --healthy "group == 'CN' and site == 'A'" --mixed "site == 'B'" --diseased "group == 'AD'".
A participant matched by no set rule is left out. Several T1w scans of one participant (sessions, runs, acq-...)
are one patient: --session and --run pick one, else the first in BIDS order, and the choice is reported.
"""
import os
from dataclasses import dataclass

from brainomaly.data.layout_staging import not_utf8
from brainomaly.errors import UserError

SET_FOLDERS = {"healthy": ("train/neg", "train/neg"), "mixed": ("train/pos", "train/neg_mixed"),
               "test": ("test/pos", "test/neg")}  # set -> (folder if diseased, folder if not)
PARTICIPANTS = "participants.tsv"


@dataclass
class Selection:
    participant: str   # participant_id, e.g. sub-01 (the patient id of its slices)
    scan: str          # path of the chosen T1w NIfTI
    folder: str        # layout folder
    set_name: str      # healthy, mixed or test
    label: int         # 1 diseased, 0 not (by --diseased)
    session: str       # chosen session label, "" when the dataset has none
    run: str           # chosen run label, ""
    note: str          # what was chosen among several scans, "" when there was one


def require_pybids():
    try:
        import bids
    except ImportError as err:
        raise UserError(f"reading a BIDS dataset needs pybids, which is not installed ({err}).\n"
                        f"Fix: pip install -r requirements-preprocess.txt (antspyx and pybids), then rerun.") from err
    return bids


def read_participants(root):
    """participants.tsv as a pandas DataFrame with a participant_id column of 'sub-<label>' strings."""
    import pandas as pd
    path = os.path.join(root, PARTICIPANTS)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the rules select rows of participants.tsv.\nFix: add a participants.tsv "
                        f"with a participant_id column and the columns your rules use (e.g. group), one row per "
                        f"subject.")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype={"participant_id": str})
    except UnicodeDecodeError as err:
        raise not_utf8(path, f"put it in place of {PARTICIPANTS} in --root {root}") from err
    table.columns = [str(c).strip() for c in table.columns]
    if "participant_id" not in table.columns:
        raise UserError(f"{path} has columns {list(table.columns)} but no participant_id.\nFix: name the subject "
                        f"column participant_id, with values like sub-01.")
    missing = table["participant_id"].isna() | (table["participant_id"].fillna("x").str.strip() == "")
    if missing.any():
        with open(path, encoding="utf-8") as handle:
            lines = [number for number, text in enumerate(handle, start=1) if text.strip()]  # pandas skips blanks
        row = int(missing.to_numpy().nonzero()[0][0])
        value = "n/a" if table["participant_id"].isna().iloc[row] else "empty"
        raise UserError(f"{path} line {lines[row + 1]} has no participant_id ({value}); every row is one subject.\n"
                        f"Fix: give that row its subject's id (e.g. sub-01, as its folder is named) or remove the row.")
    table["participant_id"] = [p if p.startswith("sub-") else f"sub-{p}" for p in table["participant_id"].str.strip()]
    duplicated = table["participant_id"][table["participant_id"].duplicated()].tolist()
    if duplicated:
        raise UserError(f"{path} lists {duplicated[0]} more than once.\nFix: keep one row per subject.")
    return table


def matching(table, rule, flag, path):
    """participant_ids of the rows a rule selects (a UserError when it is not a valid expression)."""
    try:
        selected = table.query(rule, engine="python")
    except Exception as err:  # pandas raises NameError, SyntaxError, TypeError... for a bad expression
        raise UserError(f"{flag} \"{rule}\" cannot be applied to {path} ({type(err).__name__}: {err}).\n"
                        f"Fix: write a pandas query over its columns {list(table.columns)}, e.g. "
                        f"{flag} \"group == 'CN'\".") from err
    return list(selected["participant_id"])


def assign_sets(table, rules, diseased_rule, path):
    """{participant_id: (set name, label)} from the set rules; every rule must match somebody, nobody two sets."""
    assigned, matched_by = {}, {}
    for set_name, rule in rules.items():
        flag = f"--{set_name}"
        ids = matching(table, rule, flag, path)
        if not ids:
            raise UserError(f"{flag} \"{rule}\" matches no row of {path}.\nFix: check the column names and values "
                            f"(columns: {', '.join(table.columns)}), or drop {flag}.")
        for pid in ids:
            if pid in matched_by:
                raise UserError(f"{pid} is matched by both {matched_by[pid]} and {flag} \"{rule}\".\nFix: make the "
                                f"rules exclusive (a subject belongs to one set), e.g. add "
                                f"\"and participant_id != '{pid}'\" to one of them.")
            matched_by[pid] = f"{flag} \"{rule}\""
            assigned[pid] = set_name
    diseased = set(matching(table, diseased_rule, "--diseased", path))
    labelled = [pid for pid, set_name in assigned.items() if set_name != "healthy"]
    if labelled and not diseased & set(labelled):
        raise UserError(f"--diseased \"{diseased_rule}\" matches nobody in the mixed or test set of {path}.\n"
                        f"Fix: check the rule (columns: {', '.join(table.columns)}).")
    healthy_but_diseased = sorted(pid for pid, s in assigned.items() if s == "healthy" and pid in diseased)
    if healthy_but_diseased:
        raise UserError(f"{healthy_but_diseased[0]} is in the known-healthy set (--healthy \"{rules['healthy']}\") "
                        f"but matches --diseased \"{diseased_rule}\".\nFix: exclude diseased subjects from --healthy.")
    return {pid: (s, int(pid in diseased)) for pid, s in assigned.items()}


def same_label(value, wanted):
    """A BIDS entity value equals a label given on the command line (run 1 == '01', session '01' != '1')."""
    if isinstance(value, int) and str(wanted).isdigit():
        return value == int(wanted)
    return value is not None and str(value) == str(wanted)


def choose_scan(layout, pid, session, run, root):
    """(path, session, run, note) of the T1w scan to use for one participant."""
    label = pid[len("sub-"):]
    scans = sorted(layout.get(subject=label, suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"]),
                   key=lambda f: f.path)
    if not scans:
        raise UserError(f"{pid} has no T1w scan in {root} (looked for {pid}/[ses-*/]anat/{pid}_*T1w.nii[.gz]).\n"
                        f"Fix: add the scan, or leave {pid} out of the rules (e.g. "
                        f"\"and participant_id != '{pid}'\").")
    candidates = scans
    for entity, wanted, flag in (("session", session, "--session"), ("run", run, "--run")):
        if wanted is None or all(f.entities.get(entity) is None for f in scans):
            continue  # a subject scanned without sessions (runs) has only the one to use
        candidates = [f for f in candidates if same_label(f.entities.get(entity), wanted)]
        if not candidates:
            have = sorted({str(f.entities.get(entity, "")) for f in scans})
            raise UserError(f"{pid} has no T1w scan with {entity} {wanted} (it has {entity} "
                            f"{', '.join(have) if have != [''] else 'none'}).\nFix: pick another {flag}, or leave "
                            f"{pid} out of the rules.")
    chosen = candidates[0]
    note = ""
    if len(scans) > 1:
        note = (f"{pid} has {len(scans)} T1w scans; using {os.path.relpath(chosen.path, root)} "
                f"(choose with --session / --run)")
    return chosen.path, str(chosen.entities.get("session", "")), str(chosen.entities.get("run", "")), note


def select_scans(root, rules, diseased_rule, session=None, run=None):
    """[Selection] for every participant a set rule matches, in participants.tsv order; validated in full before
    anything is written."""
    if not os.path.isdir(root):
        raise UserError(f"--root {root} is not a folder.\nFix: pass the BIDS dataset's top folder (it holds "
                        f"participants.tsv and the sub-* folders).")
    bids = require_pybids()
    table = read_participants(root)
    path = os.path.join(root, PARTICIPANTS)
    sets = assign_sets(table, rules, diseased_rule, path)
    layout = bids.BIDSLayout(root, validate=False)
    selections = []
    for pid in table["participant_id"]:
        if pid not in sets:
            continue
        set_name, label = sets[pid]
        scan, chosen_session, chosen_run, note = choose_scan(layout, pid, session, run, root)
        folder = SET_FOLDERS[set_name][0 if label else 1]
        selections.append(Selection(pid, scan, folder, set_name, label, chosen_session, chosen_run, note))
    return selections


def split_rows(selections, root):
    """The rows of split.csv: which participant (and which of its scans) went where."""
    return [{"participant_id": s.participant, "set": s.set_name, "label": s.label, "folder": s.folder,
             "session": s.session, "run": s.run, "file": os.path.relpath(s.scan, root)} for s in selections]
