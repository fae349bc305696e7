"""The healing study's measures (bench/healing_speed.py): when a run heals, and whether it stays healed."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from healing_speed import healed_from, stability  # noqa: E402


def test_stability_counts_the_checkpoints_after_the_first_heal_and_the_largest_fall():
    iterations = [200, 400, 600, 800, 1000, 1200]
    aucs = [0.70, 0.76, 0.74, 0.60, 0.90, 0.80]  # baseline 0.75: first reached at 400
    first, share, fall = stability(iterations, aucs, 0.75)
    assert first == 400
    assert share == 3 / 4  # of 0.74, 0.60, 0.90, 0.80: all but 0.60 are >= 0.75 - 0.02
    assert abs(fall - 0.14) < 1e-12  # 0.74 -> 0.60; the rise 0.60 -> 0.90 is no fall
    assert healed_from(iterations, aucs, 0.75) == 1000  # at or above the baseline from 1000 to the end


def test_a_run_that_never_reaches_the_baseline_has_no_stability_and_a_last_heal_no_share():
    assert stability([200, 400], [0.6, 0.7], 0.75) == (None, None, None)
    first, share, fall = stability([200, 400], [0.6, 0.8], 0.75)
    assert (first, share, fall) == (400, None, 0.0)
