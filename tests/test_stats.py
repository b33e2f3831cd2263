"""harness.stats and harness.profiles on synthetic runs: intervals, tests, Holm, best/tied
marks, IQM with its stratified bootstrap, performance profiles and regression checks."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from harness import profiles, stats


def frame(values: dict, task: str = "mnist", arch: str = "mlp", seeds=None) -> pd.DataFrame:
    """A runs DataFrame: label → list of values (seeds 0, 1, … unless ``seeds`` gives them)."""
    rows = []
    for label, vals in values.items():
        for i, v in enumerate(vals):
            seed = seeds[label][i] if seeds and label in seeds else i
            rows.append(dict(label=label, algorithm=label, task_label=task, arch=arch,
                             seed=seed, status="ok", clean_test=v))
    return pd.DataFrame(rows)


def test_t_interval_matches_a_hand_computation():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, std sqrt(2.5), sem sqrt(2.5/5); t(0.975, df=4) = 2.7764451051977987 (tables)
    half = 2.7764451051977987 * math.sqrt(2.5 / 5)
    assert (s.n, s.dropped, s.mean) == (5, 0, 3.0)
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.ci == pytest.approx((3.0 - half, 3.0 + half))


def test_an_interval_is_cut_where_it_passes_what_the_metric_can_take():
    """Few spread seeds give a t interval below 0 for an error and above 100 for an accuracy;
    the cut interval keeps the mean and the side inside the range."""
    errors = stats.summarize([0.01, 0.02, 300.0])
    assert errors.ci[0] < 0
    for name in ("mse", "persistence_mse", "mse_orig", "mae_orig", "bpc", "s", "ratio"):
        cut = stats.within_range(errors, name)
        assert cut.ci == (0.0, errors.ci[1]) and cut.mean == errors.mean
    assert stats.within_range(errors, "angle").ci == errors.ci        # unbounded: as it was
    accuracy = stats.summarize([99.9, 99.95, 90.0])
    assert accuracy.ci[1] > 100
    assert stats.within_range(accuracy, "accuracy").ci == (accuracy.ci[0], 100.0)
    assert stats.within_range(accuracy, "balanced_accuracy").ci[1] == 100.0
    inside = stats.summarize([98.0, 98.2, 98.4])
    assert stats.within_range(inside, "accuracy") is inside
    assert stats.within_range(stats.summarize([1.0]), "mse").ci is None


def test_nan_none_dropped_and_one_value_has_no_interval():
    s = stats.summarize([2.0, None, float("nan"), 4.0])
    assert (s.n, s.dropped, s.mean) == (2, 2, 3.0)
    one = stats.summarize({7: 98.0, 8: None})
    assert (one.n, one.dropped, one.mean, one.std, one.ci) == (1, 1, 98.0, None, None)
    assert "no interval" in one.note
    assert stats.summarize([]).mean is None


def test_paired_by_seed_when_the_seeds_match_welch_otherwise():
    base = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    rule = {0: 1.11, 1: 2.09, 2: 3.10, 3: 4.12}   # a steady +0.1 on a large seed effect
    paired = stats.difference(rule, base)
    assert paired.paired and (paired.n_a, paired.n_b) == (4, 4)
    ref = sps.ttest_rel(list(rule.values()), list(base.values()))
    assert paired.p == pytest.approx(ref.pvalue) and paired.p < 0.01
    assert paired.ci == pytest.approx(tuple(ref.confidence_interval()))
    assert paired.estimate == pytest.approx(0.105)

    shifted = {s + 10: v for s, v in rule.items()}            # other seeds: nothing to pair
    welch = stats.difference(shifted, base)
    ref = sps.ttest_ind(list(rule.values()), list(base.values()), equal_var=False)
    assert not welch.paired and welch.p == pytest.approx(ref.pvalue) and welch.p > 0.5
    assert welch.ci == pytest.approx(tuple(ref.confidence_interval()))
    # unequal sizes and spreads: Welch's p, not the pooled-variance test's
    wide = stats.difference({10: 1.0, 11: 5.0, 12: 9.0}, base)
    assert wide.p == pytest.approx(0.3936133866900074)
    assert wide.p != pytest.approx(sps.ttest_ind([1.0, 5.0, 9.0], [1, 2, 3, 4]).pvalue)
    assert not stats.difference(list(rule.values()), list(base.values())).paired

    thin = stats.difference({0: 1.0}, base)
    assert thin.p is None and thin.ci is None and (thin.n_a, thin.n_b) == (1, 4)
    assert "fewer than two" in thin.note
    assert thin.estimate == pytest.approx(1.0 - 2.5)


def test_holm_matches_statsmodels_and_skips_untested():
    pvalues = [0.01, 0.04, 0.03, 0.2, 0.001]
    expected = multipletests(pvalues, method="holm")[1]
    assert stats.holm(pvalues) == pytest.approx(list(expected))
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]


def test_baseline_differences_are_corrected_across_the_whole_table():
    runs = pd.concat([
        frame({"bp": [98.0, 98.2, 98.1, 98.3], "fa": [97.0, 97.3, 97.1, 97.2],
               "dfa": [98.1, 98.0, 98.3, 98.2]}),
        frame({"bp": [80.0, 81.0, 80.5], "fa": [70.0, 71.0, 72.0], "dfa": [79.0]},
              task="cifar10", arch="cnn")])
    diffs = stats.baseline_differences(runs, "clean_test", baseline="bp")
    assert set(diffs) == {("fa", "mnist", "mlp"), ("dfa", "mnist", "mlp"),
                          ("fa", "cifar10", "cnn"), ("dfa", "cifar10", "cnn")}
    assert diffs[("dfa", "cifar10", "cnn")].p is None          # one seed: no test
    tested = [k for k, d in diffs.items() if d.p is not None]
    expected = multipletests([diffs[k].p for k in tested], method="holm")[1]
    assert [diffs[k].p_holm for k in tested] == pytest.approx(list(expected))
    assert diffs[("fa", "mnist", "mlp")].estimate < 0
    with pytest.raises(ValueError, match="baseline"):
        stats.baseline_differences(runs, "clean_test", baseline="pc")


def test_overlapping_seeds_are_tied_a_real_gap_is_best():
    tied = stats.best_rows(frame({"a": [98.1, 98.3, 98.2, 98.0], "b": [98.2, 98.1, 98.3, 98.0],
                                  "c": [90.0, 90.1, 90.2, 89.9]}), "clean_test", "max")
    assert tied == {("a", "mnist", "mlp"): "tied", ("b", "mnist", "mlp"): "tied",
                    ("c", "mnist", "mlp"): None}
    gap = stats.best_rows(frame({"a": [99.0, 99.05, 98.95, 99.02],
                                 "b": [97.0, 97.05, 96.95, 97.03]}), "clean_test", "max")
    assert gap == {("a", "mnist", "mlp"): "best", ("b", "mnist", "mlp"): None}
    # a "min" metric: the lower row wins
    low = stats.best_rows(frame({"a": [0.10, 0.11, 0.09, 0.10], "b": [0.50, 0.52, 0.49, 0.51]},
                                task="forecast"), "clean_test", {"forecast": "min"})
    assert low[("a", "forecast", "mlp")] == "best" and low[("b", "forecast", "mlp")] is None


def test_best_needs_every_comparison_to_survive_holm():
    top = [10.0, 10.2, 10.1, 10.3]
    others = {"b": [9.8, 10.1, 9.85, 10.2], "c": [9.9, 9.9, 9.8, 10.1],
              "d": [9.85, 10.05, 10.05, 10.05]}
    raw = [sps.ttest_rel(top, v).pvalue for v in others.values()]
    assert max(raw) < 0.05                      # each alone would pass; corrected, none does
    marks = stats.best_rows(frame({"a": top, **others}), "clean_test", "max")
    assert set(marks.values()) == {"tied"}
    two = stats.best_rows(frame({"a": top, "d": others["d"]}), "clean_test", "max")
    assert two[("a", "mnist", "mlp")] == "best"


def test_marks_are_corrected_across_the_table_as_the_differences_are():
    """A best mark is a claim the difference column must not contradict: both are corrected
    over the whole table. Two cells whose one comparison each passes alone (p ≈ 0.03) are
    told apart by neither once the table's two tests are corrected together."""
    top, other = [10.0, 10.2, 10.1, 10.3], [9.85, 10.15, 10.0, 10.1]
    raw = sps.ttest_rel(top, other).pvalue
    assert 0.025 < raw < 0.05
    one = stats.best_rows(frame({"a": top, "b": other}), "clean_test", "max")
    assert one[("a", "mnist", "mlp")] == "best"                 # alone in its table: best
    both = pd.concat([frame({"a": top, "b": other}),
                      frame({"a": top, "b": other}, task="fashion_mnist")])
    marks = stats.best_rows(both, "clean_test", "max")
    assert set(marks.values()) == {"tied"}
    diffs = stats.baseline_differences(both, "clean_test", baseline="a")
    assert all(not d.significant() for d in diffs.values())     # the same verdict


def test_a_mark_and_the_difference_column_never_disagree_about_a_pair():
    """Three rows: the top row's test against the baseline is one comparison of both tables,
    corrected once in one family — marked best only where the difference column stars it."""
    runs = frame({"x": [98.171, 98.463, 98.06, 98.242, 97.976],
                  "bp": [97.838, 98.111, 98.017, 98.055, 97.893],
                  "y": [97.691, 98.088, 97.68, 98.002, 97.773]})
    marks, diffs = stats.table_tests(runs, "clean_test", "max", "bp")
    assert marks == stats.best_rows(runs, "clean_test", "max", baseline="bp")
    assert diffs == stats.baseline_differences(runs, "clean_test", "bp", direction="max")
    x_vs_bp = diffs[("x", "mnist", "mlp")]
    assert (marks[("x", "mnist", "mlp")] == "best") == x_vs_bp.significant()
    # the family: x–bp, x–y (the marks) and y–bp (the differences), each once
    raw = [sps.ttest_rel(runs[runs.label == a].clean_test, runs[runs.label == b].clean_test
                         ).pvalue for a, b in (("x", "bp"), ("x", "y"), ("y", "bp"))]
    expected = multipletests(raw, method="holm")[1]
    assert [x_vs_bp.p_holm, diffs[("y", "mnist", "mlp")].p_holm] == \
        pytest.approx([expected[0], expected[2]])


def test_a_one_seed_row_is_never_best():
    top_alone = stats.best_rows(frame({"a": [99.9], "b": [90.0, 90.1, 89.9, 90.0]}),
                                "clean_test", "max")
    assert top_alone[("a", "mnist", "mlp")] == "tied"
    assert top_alone[("b", "mnist", "mlp")] == "tied"
    # a one-seed row worse than the top is tested as a new observation of the top's seeds:
    # t = (99.0 - y) / (s * sqrt(1 + 1/n)), n - 1 degrees of freedom
    top = [99.0, 99.1, 98.9, 99.05]
    n, mean, sd = len(top), float(np.mean(top)), float(np.std(top, ddof=1))
    for y, expected in ((95.0, "best"), (99.09, "tied"), (99.5, "tied")):   # far, near, above
        t = (mean - y) / (sd * math.sqrt(1 + 1 / n))
        p = 2 * sps.t.sf(abs(t), n - 1)
        assert stats.single_value_p(top, y) == pytest.approx(p)
        marks = stats.best_rows(frame({"a": top, "b": [y]}), "clean_test", "max")
        assert marks[("a", "mnist", "mlp")] == expected, (y, p)
    assert stats.single_value_p([99.0], 95.0) is None           # no spread to test against
    # and it joins the Holm family of the cell: one such row at p ≈ 0.047 is told apart, two
    # are not (the smaller p doubled is above 0.05)
    assert 0.04 < stats.single_value_p(top, 98.7) < 0.05
    alone = stats.best_rows(frame({"a": top, "b": [98.7]}), "clean_test", "max")
    assert alone[("a", "mnist", "mlp")] == "best"
    twice = stats.best_rows(frame({"a": top, "b": [98.7], "c": [98.7]}), "clean_test", "max")
    assert twice[("a", "mnist", "mlp")] == "tied"


def _two_task_runs():
    rng = np.random.default_rng(1)
    parts = []
    for task, base, n_fa in (("mnist", 98.0, 5), ("fashion_mnist", 88.0, 5), ("svhn", 90.0, 4)):
        parts.append(frame({"bp": list(base + rng.normal(0, 0.2, 5)),
                            "fa": list(base - 3 + rng.normal(0, 0.5, n_fa)),
                            "dll": list(base - 1 + rng.normal(0, 0.3, 3)) + [base - 1]},
                           task=task))
    return pd.concat(parts, ignore_index=True)


def test_iqm_and_its_stratified_bootstrap_are_reproducible_and_contain_the_estimate():
    runs = _two_task_runs()
    first = profiles.interquartile_means(runs, "clean_test", "max", random_state=3)
    again = profiles.interquartile_means(runs, "clean_test", "max", random_state=3)
    assert first == again
    scores = profiles.normalized_scores(runs, "clean_test", "max")
    fa = np.array([s for key, _, s in scores if key[0] == "fa"])
    assert first["fa"].iqm == pytest.approx(sps.trim_mean(fa, 0.25))
    assert (first["fa"].n_runs, first["fa"].n_cells) == (14, 3)
    for agg in first.values():
        low, high = agg.ci
        assert low <= agg.iqm <= high and low < high
    assert first["fa"].ci[1] < 1.0 and first["bp"].ci[0] < 1.0 < first["bp"].ci[1]
    other = profiles.interquartile_means(runs, "clean_test", "max", random_state=4)
    assert other["fa"].ci != first["fa"].ci


def test_one_run_cells_stay_in_every_bootstrap_resample():
    runs = pd.concat([frame({"bp": [1.0], "pc": [1.0, 1.1]})]
                     + [frame({"bp": [1.0], "pc": [2.0]}, task=t) for t in ("a", "b", "c")])
    agg = profiles.interquartile_means(runs, "clean_test", "max")["pc"]
    assert agg.iqm == pytest.approx(sps.trim_mean([1.0, 1.1, 2.0, 2.0, 2.0], 0.25))
    assert agg.ci[0] <= agg.iqm <= agg.ci[1] and agg.ci[0] > 1.5


def test_normalised_scores_follow_the_direction():
    runs = frame({"bp": [0.2, 0.2], "pc": [0.1, 0.4]}, task="forecast")
    scores = {(k[0], s): v for k, s, v in
              profiles.normalized_scores(runs, "clean_test", {"forecast": "min"})}
    assert scores[("pc", 0)] == pytest.approx(2.0) and scores[("pc", 1)] == pytest.approx(0.5)
    one_run_cells = profiles.interquartile_means(frame({"bp": [0.2], "pc": [0.1]}),
                                                 "clean_test", "min")
    assert one_run_cells["pc"].ci is None and one_run_cells["pc"].iqm == pytest.approx(2.0)


def test_performance_profile_is_monotone_and_the_winner_reaches_one_at_tau_one():
    profile = profiles.performance_profile(_two_task_runs(), "clean_test", "max")
    assert profile.taus[0] == 1.0 and len(profile.cells) == 3
    for fractions in profile.fractions.values():
        assert all(b >= a for a, b in zip(fractions, fractions[1:]))
        assert fractions[-1] == 1.0          # the default grid reaches every finite ratio
    assert profile.fractions["bp"][0] == 1.0
    assert profile.fractions["fa"][0] == 0.0 and profile.fractions["dll"][0] == 0.0
    partial = profiles.performance_profile(
        pd.concat([frame({"a": [1.0], "b": [2.0]}), frame({"a": [3.0]}, task="svhn")]),
        "clean_test", "min")
    assert partial.fractions["a"][0] == 1.0 and partial.fractions["b"][-1] == 0.5


def test_profile_plot_uses_the_given_colours():
    profile = profiles.performance_profile(_two_task_runs(), "clean_test", "max")
    from harness.report.plots import palette
    colours = palette(["bp", "fa", "dll"])
    fig = profiles.plot_profile(profile, colours)
    lines = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert set(lines) == {"bp", "fa", "dll"}
    assert all(tuple(lines[n]) == tuple(colours[n]) for n in lines)
    with pytest.raises(ValueError, match="no colour"):
        profiles.plot_profile(profile, {"bp": "k"})


def _timed(values, seconds):
    runs = frame(values)
    runs["train_s_per_epoch"] = seconds
    return runs


def test_compare_flags_a_real_regression_and_not_a_result_set_against_itself():
    a = _timed({"bp": [98.0, 98.2, 98.1, 98.3]}, [1.0, 1.1, 1.0, 1.05])
    b = _timed({"bp": [96.0, 96.2, 96.1, 96.3]}, [1.0, 1.1, 1.0, 1.05])   # 2 points worse
    changes = stats.compare(a, b, "clean_test", "max", time="train_s_per_epoch")
    (change,) = changes
    assert change.key == ("bp", "mnist", "mlp") and change.metric.paired
    assert change.metric.estimate == pytest.approx(-2.0)
    assert stats.has_regression(changes, threshold=0.5)
    assert not stats.has_regression(changes, threshold=2.5)     # not beyond the threshold
    itself = stats.compare(a, a, "clean_test", "max", time="train_s_per_epoch")
    assert not stats.has_regression(itself, threshold=0.5, time_threshold=0.0)
    better = stats.compare(b, a, "clean_test", "max")
    assert not stats.has_regression(better, threshold=0.5)      # improvements never count


def test_compare_time_regression_and_noise_is_not_one():
    a = _timed({"bp": [98.0, 98.2, 98.1, 98.3]}, [1.0, 1.1, 1.0, 1.05])
    slow = _timed({"bp": [98.0, 98.2, 98.1, 98.3]}, [2.0, 2.1, 2.05, 2.0])
    changes = stats.compare(a, slow, "clean_test", "max", time="train_s_per_epoch")
    assert not stats.has_regression(changes, threshold=0.5)
    assert stats.has_regression(changes, threshold=0.5, time_threshold=0.2)
    noisy = _timed({"bp": [97.0, 99.0, 96.5, 99.5]}, [1.0, 1.1, 1.0, 1.05])
    assert not stats.has_regression(stats.compare(a, noisy, "clean_test", "max"), 0.1)


def test_p_values_are_printed_on_their_side_of_alpha():
    assert stats.format_p(0.0497) == "0.0497"          # not "0.05" beside "* below 0.05"
    assert stats.format_p(0.0504) == "0.05"            # 0.05 is not below 0.05
    assert stats.format_p(0.013) == "0.013" and stats.format_p(0.51) == "0.51"
    assert stats.format_p(0.00999, alpha=0.01) == "0.00999"
