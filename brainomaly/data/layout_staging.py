"""Writing a dataset layout safely: a staging folder that replaces the output only when complete, the layout counts,
and CSV reading with one clear error per bad row."""
import csv
import os
import shutil
import tempfile

from brainomaly.data import preparation_record
from brainomaly.data.dataset_layout import LAYOUT_FOLDERS, is_image_file, patient_id
from brainomaly.errors import UserError

MANIFEST_NAME = "prepare_data_manifest.csv"
PREPROCESSED = "preprocessed"
# Files and folders besides the layout that describe one preparation: replaced (or removed) with the layout.
RECORD_FILES = (preparation_record.RECORD_NAME, "split.csv", PREPROCESSED)

# Folder names accepted in a NIfTI split CSV ("folder" column), lower-cased, "\" read as "/".
FOLDER_ALIASES = {
    "pos": "train/pos", "train/pos": "train/pos", "train_pos": "train/pos",
    "neg_mixed": "train/neg_mixed", "train/neg_mixed": "train/neg_mixed", "train_neg_mixed": "train/neg_mixed",
    "neg": "train/neg", "train/neg": "train/neg", "train_neg": "train/neg",
    "test_pos": "test/pos", "test/pos": "test/pos",
    "test_neg": "test/neg", "test/neg": "test/neg",
}


# ----------------------------------------------------------------------------------------------------
# Output folder handling (shared by all subcommands)
# ----------------------------------------------------------------------------------------------------

class Staging:
    """Write the layout into OUT/.prepare_data-XXXX, then move the five folders into OUT on success."""

    def __init__(self, out, overwrite, sources=()):
        self.out = os.path.abspath(out)
        for source in sources:
            source = os.path.abspath(source)
            if _inside(self.out, source) or _inside(source, self.out):
                raise UserError(f"output folder {out} and source {source} overlap (one contains the other).\n"
                                f"Fix: pick an --out outside the source folder, e.g. data/NAME.")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UserError(f"--out {out} exists and is not a folder.\nFix: choose another --out path.")
        if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
            raise UserError(f"output folder {out} is not empty; nothing was written.\n"
                            f"Fix: choose a new --out, or add --overwrite to replace its "
                            f"{', '.join(LAYOUT_FOLDERS)} folders and its {', '.join(RECORD_FILES)} (other files "
                            f"there are kept).")
        self.created = not os.path.exists(self.out)
        self.path = None
        self.manifest = []  # rows: folder, file, patient_id, source, slice

    def __enter__(self):
        os.makedirs(self.out, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=".prepare_data-", dir=self.out)
        for folder in LAYOUT_FOLDERS:
            os.makedirs(os.path.join(self.path, folder))
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._commit()
        shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None and self.created and os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)  # we created it; leave no empty folder behind
        return False

    def target(self, folder, name):
        return os.path.join(self.path, folder, name)

    def record_path(self, name):
        """Where to write one of RECORD_FILES; it is moved into OUT with the layout."""
        assert name in RECORD_FILES, name
        return os.path.join(self.path, name)

    def record(self, folder, name, pid, source, slice_index=""):
        self.manifest.append((folder, name, pid, source, slice_index))

    def _commit(self):
        with open(os.path.join(self.path, MANIFEST_NAME), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("folder", "file", "patient_id", "source", "slice"))
            writer.writerows(sorted(self.manifest))
        for folder in LAYOUT_FOLDERS:
            final = os.path.join(self.out, folder)
            if os.path.lexists(final):
                shutil.rmtree(final) if os.path.isdir(final) and not os.path.islink(final) else os.remove(final)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(os.path.join(self.path, folder), final)
        for name in RECORD_FILES:  # a record of an earlier preparation must not describe this one
            final = os.path.join(self.out, name)
            if os.path.isdir(final) and not os.path.islink(final):
                shutil.rmtree(final)
            elif os.path.lexists(final):
                os.remove(final)
            if os.path.lexists(os.path.join(self.path, name)):
                os.replace(os.path.join(self.path, name), final)
        os.replace(os.path.join(self.path, MANIFEST_NAME), os.path.join(self.out, MANIFEST_NAME))


def _inside(path, parent):
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def count_layout(out):
    """{folder: (images, patients)} of a written layout."""
    counts = {}
    for folder in LAYOUT_FOLDERS:
        path = os.path.join(out, folder)
        names = [n for n in os.listdir(path) if is_image_file(n)] if os.path.isdir(path) else []
        counts[folder] = (len(names), len({patient_id(n) for n in names}))
    return counts


def print_counts(out, counts, unit):
    print(f"wrote {out}:")
    for folder in LAYOUT_FOLDERS:
        images, patients = counts[folder]
        extra = f" from {patients} patients" if unit == "slices" else ""
        print(f"  {folder:<16} {images:>7} {unit}{extra}")


def not_utf8(path, how):
    """The UserError for a text file that is not UTF-8, naming its first such line; how: where the file goes."""
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            name = os.path.basename(path)
            return UserError(f"{path} line {number} is not UTF-8 text (byte 0x{line[err.start]:02x} at column "
                             f"{err.start + 1}; saved as Latin-1 or Windows-1252?).\nFix: save it as UTF-8 (a "
                             f"spreadsheet's Save As 'CSV UTF-8', or iconv -f cp1252 -t utf-8 {name} > utf8-{name}) "
                             f"and {how}.")
    return UserError(f"{path} is not UTF-8 text.\nFix: save it as UTF-8 and {how}.")


def read_csv_rows(path, required_any, what, flag="--split"):
    """Rows of a CSV as dicts with stripped keys/values; the file must have one of `required_any` columns."""
    if not os.path.isfile(path):
        raise UserError(f"split CSV {path} not found.\nFix: pass the path of an existing CSV with {flag}.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as err:
        raise not_utf8(path, f"pass that file with {flag}") from err
    for group in required_any:
        if not any(c in columns for c in group):
            raise UserError(f"{path} has columns {columns}, but {what} needs a column named "
                            f"{' or '.join(group)}.\nFix: add or rename that column.")
    if not rows:
        raise UserError(f"{path} has no rows.\nFix: list one {what.split()[0]} per row.")
    return rows
