"""Win rates from pairwise preferences, in alpaca_eval's convention.

A preference is a float in [1, 2]: 1 = the reference (alpaca_eval's output_1) wins, 2 = the
model (output_2) wins, 1.5 (or 0) a draw; NaN or anything outside [1, 2] is not a preference
and is dropped, as alpaca_eval drops it. Weighted preferences are 1 + P(model better).

    win_rate(preferences)
        {win_rate, standard_error, n_wins, n_wins_base, n_draws, n_total, discrete_win_rate}:
        the same numbers as alpaca_eval.metrics.get_winrate (tests check it), in percent.
    length_controlled_win_rate(preferences, model_lengths, reference_lengths)
        {length_controlled_win_rate, lc_standard_error, length_coefficient, n}

Length control, in the spirit of alpaca_eval's length_controlled_v1 but not the same
computation: alpaca_eval fits a logistic model of the preference on tanh(standardised length
difference), a per-instruction difficulty and regularisation towards gamed baselines, and
its difficulty and baselines come from a hub file (`df_gamed.csv`), so it cannot run
offline. Here: the same length feature and an intercept, nothing else,

    P(model wins) = sigmoid(b0 + b1 * tanh((len_ref - len_model) / sd(len_ref - len_model)))

lengths in characters as alpaca_eval counts them, fitted by maximum likelihood on the soft
labels (preference - 1) with a tiny L2 penalty (LC_L2, so that a run that always wins still
has a finite fit), and predicted at zero length difference: LC win rate = 100 sigmoid(b0).
Its standard error is the delta method on a sandwich (robust) covariance of b0, since soft
labels are not Bernoulli draws. Compare LC figures with each other, not with alpaca_eval's.
"""

from __future__ import annotations

import math

import numpy as np

LC_L2 = 1e-2  # penalty on (b0, b1); negligible next to the likelihood of tens of instructions


def _valid(preferences) -> np.ndarray:
    """Preferences as floats, draws coded 0 made 1.5, with NaN where not a preference."""
    values = np.array([np.nan if p is None else float(p) for p in preferences], dtype=float)
    values[values == 0] = 1.5
    values[~((values >= 1) & (values <= 2))] = np.nan
    return values


def win_rate(preferences) -> dict:
    values = _valid(preferences)
    kept = values[~np.isnan(values)] - 1  # in [0, 1]: the model's share of each comparison
    n = len(kept)
    discrete = np.where(kept == 0.5, 0.5, np.round(kept))
    return {
        "win_rate": float(kept.mean() * 100) if n else math.nan,
        "standard_error": float(kept.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else math.nan,
        "n_wins": int((kept > 0.5).sum()),
        "n_wins_base": int((kept < 0.5).sum()),
        "n_draws": int((kept == 0.5).sum()),
        "n_total": n,
        "discrete_win_rate": float(discrete.mean() * 100) if n else math.nan,
    }


def length_controlled_win_rate(preferences, model_lengths, reference_lengths, l2: float = LC_L2) -> dict:
    values = _valid(preferences)
    keep = ~np.isnan(values)
    y = values[keep] - 1  # soft label: P(model wins)
    delta = (np.asarray(reference_lengths, dtype=float) - np.asarray(model_lengths, dtype=float))[keep]
    n = len(y)
    if n == 0:
        return {"length_controlled_win_rate": math.nan, "lc_standard_error": math.nan, "length_coefficient": math.nan, "n": 0}
    sd = delta.std(ddof=1) if n > 1 else 0.0
    x = np.tanh(delta / sd) if sd > 0 else np.zeros(n)
    X = np.stack([np.ones(n), x], axis=1)  # (n, 2): intercept, length feature
    beta = np.zeros(2)
    for _ in range(100):  # Newton on a strictly concave objective: converges in a few steps
        p = 1 / (1 + np.exp(-(X @ beta)))
        gradient = X.T @ (y - p) - l2 * beta
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    p = 1 / (1 + np.exp(-(X @ beta)))
    hessian = X.T @ (X * (p * (1 - p))[:, None]) + l2 * np.eye(2)
    bread = np.linalg.inv(hessian)
    meat = X.T @ (X * ((y - p) ** 2)[:, None])
    var_b0 = (bread @ meat @ bread)[0, 0]
    p0 = 1 / (1 + math.exp(-beta[0]))
    return {
        "length_controlled_win_rate": p0 * 100,
        "lc_standard_error": p0 * (1 - p0) * math.sqrt(max(var_b0, 0.0)) * 100 if n > 1 else math.nan,
        "length_coefficient": float(beta[1]),  # < 0: the judge favours the longer output
        "n": n,
    }
