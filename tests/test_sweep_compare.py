"""The sweep's statistics and learning-rate selection, against hand computations and scipy."""

import math

import pytest

from asymllm.sweep import plan
from asymllm.sweep.command import parse_args
from asymllm.sweep.compare import (equal_parameter_references, mean_interval, paired, select_learning_rates,
                                   t_cdf, t_quantile)


def test_t_quantiles_match_the_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_cdf(0.0, 7) == pytest.approx(0.5)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 4, 6, 12, 50):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_interval_of_five_paired_differences_by_hand():
    # mean 0.026, sample sd sqrt(0.00212 / 4) = 0.0230217, se = sd / sqrt(5) = 0.0102956, t(0.975, 4) = 2.776445
    mean, low, high = mean_interval([0.02, 0.05, -0.01, 0.04, 0.03])
    assert mean == pytest.approx(0.026)
    assert (low, high) == (pytest.approx(0.026 - 0.0285850, abs=1e-6), pytest.approx(0.026 + 0.0285850, abs=1e-6))
    assert math.isnan(mean_interval([0.1])[1])


def _run(recipe, rank, lr, seed, exact_match=None, loss=None, trainable=1000):
    return {"recipe": recipe, "rank": rank, "lr": lr, "seed": seed, "heldout_exact_match": exact_match,
            "heldout_loss": loss, "trainable_params": trainable}


def test_paired_comparison_is_seed_by_seed_with_wins_ties_losses_and_a_reading():
    reference = [_run("lora", 16, 1e-3, s, em) for s, em in zip(range(5), (0.60, 0.62, 0.58, 0.61, 0.60))]
    asym = [_run("asym", 16, 3e-3, s, em + d) for s, em, d in zip(range(5), (0.60, 0.62, 0.58, 0.61, 0.60),
                                                                   (0.02, 0.05, -0.01, 0.04, 0.03))]
    result = paired(reference + asym, ("asym", 16, 3e-3), ("lora", 16, 1e-3), "heldout_exact_match")
    assert result.seeds == [0, 1, 2, 3, 4] and result.diffs == pytest.approx([0.02, 0.05, -0.01, 0.04, 0.03])
    assert (result.wins, result.ties, result.losses) == (4, 0, 1)
    assert result.verdict == "no detectable difference"  # [-0.0026, +0.0546] holds 0
    clearly = [_run("asym", 16, 3e-3, s, em + 0.05 + 0.001 * s) for s, em in zip(range(5), (0.60, 0.62, 0.58, 0.61, 0.60))]
    assert paired(reference + clearly, ("asym", 16, 3e-3), ("lora", 16, 1e-3), "heldout_exact_match").verdict == "better"
    # for a loss, lower is better: a positive difference is a loss of the comparison
    worse = [_run("lora", 16, 1e-3, s, loss=0.5) for s in range(3)] + [_run("asym", 16, 1e-3, s, loss=0.6 + 0.01 * s) for s in range(3)]
    loss = paired(worse, ("asym", 16, 1e-3), ("lora", 16, 1e-3), "heldout_loss")
    assert (loss.wins, loss.losses, loss.verdict) == (0, 3, "worse")


def test_only_seeds_both_configurations_ran_are_paired():
    runs = [_run("lora", 16, None, 0, 0.5), _run("lora", 16, None, 1, 0.6), _run("asym", 16, None, 1, 0.7)]
    result = paired(runs, ("asym", 16, None), ("lora", 16, None), "heldout_exact_match")
    assert result.seeds == [1] and result.verdict == "one seed: no interval"


def test_selection_picks_the_best_mean_validation_rate_and_never_a_diverged_one():
    runs = [_run("asym", 16, lr, seed, loss=loss) for lr, losses in
            ((1e-4, (0.9, 0.8)), (3e-4, (0.5, 0.7)), (1e-3, (0.55, 0.6)), (3e-3, (float("nan"), 0.1)))
            for seed, loss in zip((0, 1), losses)]
    runs += [_run("lora", 16, lr, seed, exact_match=em) for lr, ems in ((1e-4, (0.2, 0.3)), (1e-3, (0.5, 0.4)))
             for seed, em in zip((0, 1), ems)]
    # asym: means 0.85, 0.60, 0.575, nan -> 1e-3 (3e-3 diverged at one seed: worst, despite its 0.1)
    assert select_learning_rates([r for r in runs if r["recipe"] == "asym"], "heldout_loss") == {("asym", 16): 1e-3}
    assert select_learning_rates([r for r in runs if r["recipe"] == "lora"], "heldout_exact_match") == {("lora", 16): 1e-3}
    tie = [_run("lora", 8, lr, 0, loss=0.5) for lr in (3e-3, 1e-4)]
    assert select_learning_rates(tie, "heldout_loss") == {("lora", 8): 1e-4}


def test_equal_parameter_pairs_are_within_five_percent_at_another_rank():
    runs = [_run("lora", 16, 1e-3, 0, trainable=1000), _run("asym", 32, 3e-3, 0, trainable=1040),
            _run("asym", 16, 3e-3, 0, trainable=500), _run("A_V_hB_zero", 32, 1e-3, 0, trainable=1060)]
    assert equal_parameter_references(runs, "lora") == [(("asym", 32, 3e-3), ("lora", 16, 1e-3))]


def test_learning_rates_are_an_axis_of_the_grid_and_of_the_run_names():
    specs = plan("lora,asym", "16", "0,1", "1e-4,3e-3")
    assert len(specs) == 8 and specs[0].name == "hA_he_hB_zero-r16-lr0.0001-s0"
    assert specs[-1].name == "A_rand_hB_zero-r16-lr0.003-s1" and specs[-1].lr == 3e-3
    assert plan("lora", "16", "0")[0].name == "hA_he_hB_zero-r16-s0"  # without the axis: names as before


def test_configs_are_recipe_rank_pairs_instead_of_the_full_cross():
    specs = plan(None, "16", "0", "1e-3", configs="lora:16,asym:16,asym:32")
    assert [(s.recipe, s.rank) for s in specs] == [("hA_he_hB_zero", 16), ("A_rand_hB_zero", 16), ("A_rand_hB_zero", 32)]
    with pytest.raises(SystemExit, match="RECIPE:RANK"):
        plan(None, "16", "0", configs="lora16")


@pytest.mark.parametrize("argv, message", [
    (["--learning_rates", "1e-3", "--", "--learning_rate", "1e-4"], "contradict"),
    (["--select_on", "validation", "--learning_rates", "1e-3"], "--final_seeds"),
    (["--select_on", "validation", "--learning_rates", "1e-3", "--seeds", "0,1", "--final_seeds", "1,2"], "fresh"),
    (["--final_seeds", "3"], "--select_on validation"),
    (["--learning_rates", "fast"], "--learning_rates 'fast': expected comma-separated positive numbers"),
    (["--configs", "lora:16"], "one of them"),
])
def test_contradictory_or_bad_sweep_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--recipes", "lora", "--output", "x", *argv])
    assert message in capsys.readouterr().err + str(stop.value.code)
