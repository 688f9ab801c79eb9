"""Comparing sweep configurations fairly: paired per-seed differences with a Student-t 95%
interval and wins/ties/losses, the learning rate each configuration selects on validation,
and which configurations have the same number of trainable parameters.

A configuration is (recipe, rank, learning rate); runs with the same seed see the same data
order, so configurations are compared seed by seed (paired), not by their means alone.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# metric -> +1 when higher is better, -1 when lower is better
DIRECTION = {"heldout_exact_match": +1, "heldout_loss": -1, "mmlu": +1}
SELECT_METRICS = {"loss": "heldout_loss", "exact_match": "heldout_exact_match"}
EQUAL_PARAMETERS = 0.05  # trainable counts within 5% are "the same size"


def config_key(result: dict) -> tuple:
    return result["recipe"], result["rank"], result.get("lr")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (bisection: t_cdf is monotone)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean; (mean, nan, nan) for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass
class Paired:
    """`config` minus `reference` on `metric`, seed by seed."""

    config: tuple
    reference: tuple
    metric: str
    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int

    @property
    def verdict(self) -> str:
        if len(self.diffs) < 2:
            return "one seed: no interval"
        if self.low <= 0.0 <= self.high:
            return "no detectable difference"
        better = (self.mean > 0) == (DIRECTION[self.metric] > 0)
        return "better" if better else "worse"


def paired(results: list[dict], config: tuple, reference: tuple, metric: str) -> Paired | None:
    """The paired comparison over the seeds both configurations ran with a value of `metric`."""
    by_seed = {}
    for r in results:
        if config_key(r) in (config, reference) and _finite(r.get(metric)):
            by_seed.setdefault(r["seed"], {})[config_key(r)] = r[metric]
    seeds = sorted(s for s, values in by_seed.items() if len(values) == 2)
    if not seeds:
        return None
    diffs = [by_seed[s][config] - by_seed[s][reference] for s in seeds]
    mean, low, high = mean_interval(diffs)
    signed = [d * DIRECTION[metric] for d in diffs]
    return Paired(config, reference, metric, seeds, diffs, mean, low, high,
                  wins=sum(d > 0 for d in signed), ties=sum(d == 0 for d in signed), losses=sum(d < 0 for d in signed))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def select_learning_rates(results: list[dict], metric: str) -> dict[tuple, float]:
    """(recipe, rank) -> the learning rate with the best mean `metric` over its seeds. A
    diverged run (no finite value) counts as the worst; ties go to the smaller rate."""
    sign = DIRECTION[metric]
    scores: dict[tuple, dict[float, list[float]]] = {}
    for r in results:
        value = r.get(metric)
        scores.setdefault((r["recipe"], r["rank"]), {}).setdefault(r["lr"], []).append(
            value if _finite(value) else -sign * math.inf)
    return {group: max(sorted(by_lr), key=lambda lr: sign * statistics.fmean(by_lr[lr]))
            for group, by_lr in scores.items()}


def trainable_counts(results: list[dict]) -> dict[tuple, int]:
    return {config_key(r): r["trainable_params"] for r in results if r.get("trainable_params")}


def equal_parameter_references(results: list[dict], reference_recipe: str) -> list[tuple[tuple, tuple]]:
    """(config, reference config) pairs whose trainable counts are within EQUAL_PARAMETERS of
    each other, the reference being `reference_recipe` at a rank other than the config's."""
    counts = trainable_counts(results)
    pairs = []
    for config, n in counts.items():
        if config[0] == reference_recipe:
            continue
        for reference, m in counts.items():
            if reference[0] == reference_recipe and reference[1] != config[1] and abs(n - m) <= EQUAL_PARAMETERS * m:
                pairs.append((config, reference))
    return pairs


def tried_rates(results: list[dict], group: tuple) -> list[float]:
    """The learning rates (recipe, rank) ran with, ascending."""
    return sorted({r["lr"] for r in results if (r["recipe"], r["rank"]) == group and r.get("lr") is not None})


def grid_edges(results: list[dict], chosen: dict[tuple, float]) -> dict[tuple, str]:
    """(recipe, rank) -> "largest" or "smallest" where the selected rate is that end of the rates
    it tried (of two or more): its best rate may lie beyond the grid."""
    edges = {}
    for group, lr in chosen.items():
        rates = tried_rates(results, group)
        if len(rates) >= 2 and lr in (rates[0], rates[-1]):
            edges[group] = "largest" if lr == rates[-1] else "smallest"
    return edges


def next_rate(rates: list[float], side: str) -> float:
    """The next learning rate beyond `side` of ascending `rates`, continuing the grid's pattern one
    decade on (1e-4,3e-4,1e-3,3e-3 -> 1e-2 above, 3e-5 below), else its last ratio (1e-3,2e-3 -> 4e-3)."""
    up = side == "largest"
    edge, inner = (rates[-1], rates[-2]) if up else (rates[0], rates[1])
    shifted = edge / 10 if up else edge * 10  # the same point of the pattern a decade inside
    for i, rate in enumerate(rates):
        if math.isclose(rate, shifted, rel_tol=1e-6):
            neighbour = rates[i + 1] if up else rates[i - 1] if i > 0 else None
            if neighbour is not None and not math.isclose(neighbour, edge, rel_tol=1e-6):
                return float(f"{neighbour * (10 if up else 0.1):.3g}")
    return float(f"{edge * edge / inner:.3g}")
