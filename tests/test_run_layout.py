"""The protocol table, and the run folder: what report.py reads is what the protocols write."""
import json

import torch
from conftest import TINY_FLAGS

from brainomaly.evaluate import checkpoint_selection, protocols, report
from brainomaly.run import checkpoint as ckpt
from brainomaly.run import run_layout
from brainomaly.run.networks import model_path, saved_config
from main import parse_config
from model import Generator
from solver import Runtime


def test_protocol_table_names_each_protocols_folders_labels_and_options():
    table = protocols.PROTOCOLS
    assert list(table) == ["inductive", "transductive", "aucp"]
    assert table["inductive"].sets == (("test/neg", 0), ("test/pos", 1))
    assert table["transductive"].sets == (("train/neg_mixed", 0), ("train/pos", 1))
    assert table["aucp"].sets == (("train/neg", 0), ("train/pos", 1), ("train/neg_mixed", 1))
    assert [p.label_names for p in table.values()] == [("healthy", "diseased")] * 2 + [("known healthy", "mixed set")]
    # Only AUCp is label-free, selects checkpoints and keeps the healthy reference; it has no lesion masks to score.
    assert [(p.label_free, p.healthy_reference, p.pixel_metrics) for p in table.values()] == [
        (False, False, True), (False, False, True), (True, True, False)]
    assert [(p.title, p.metric) for p in table.values()] == [("Inductive", "AUC"), ("Transductive", "AUC"),
                                                               ("AUCp", "AUCp")]


def test_report_reads_the_files_the_protocols_write(toy_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", run_dir, "--refiner", "off", *TINY_FLAGS])
    assert config.result_dir == run_layout.default_folder(run_dir, "result_dir")
    for iteration in (1, 2):  # two untrained stage-1 checkpoints
        torch.manual_seed(iteration)
        generator = Generator(1, config.g_conv_dim, config.g_repeat_num, zero_map=False)
        ckpt.atomic_save({"state_dict": generator.state_dict(), "config": saved_config(config)},
                         model_path(config, iteration, "G"))
    runtime = Runtime(config)
    results = {name: protocols.run_protocol(runtime, config, name, 2) for name in protocols.PROTOCOLS}
    written = {name: result["auc"] for name, result in results.items()}
    sweeps = {name: checkpoint_selection.checkpoint_sweep(runtime, config, name) for name in ("aucp", "inductive")}

    # the coarse run's files, and the intensity-corrected AUC each of them reports beside it
    rows = dict(report.summary_rows(toy_dataset, run_dir, 2))
    assert list(rows) == ["Brainomaly-Diff, calibrated (ckpt 2)", "Brainomaly-Diff, coarse (ckpt 2)"]
    assert {name: rows["Brainomaly-Diff, coarse (ckpt 2)"][name] for name in written} == written
    assert {name: rows["Brainomaly-Diff, calibrated (ckpt 2)"][name] for name in written} == {
        name: result["auc_by_reconstruction"]["calibrated"] for name, result in results.items()}
    curve = report.learning_curve(run_dir)
    assert curve == run_layout.learning_curve(config.result_dir)
    with open(run_layout.sweep_table(config.result_dir, "aucp", "json")) as f:
        selection = json.load(f)
    assert selection["table"] == sweeps["aucp"]
    assert [row["iteration"] for row in selection["table"]] == [1, 2]
    # the written choice is the default rule's (the newest checkpoint: two untrained ones are not significantly
    # different), with the reconstruction that separates best there, and every candidate's interval
    last = {row["reconstruction"]: row["aucp"] for row in selection["candidates"] if row["iteration"] == 2}
    assert selection["best_iteration"] == 2 and selection["best_reconstruction"] == max(last, key=last.get)
    assert {(row["iteration"], row["reconstruction"]) for row in selection["candidates"]} == {
        (1, "coarse"), (1, "calibrated"), (2, "coarse"), (2, "calibrated")}
