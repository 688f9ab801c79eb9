"""`asymllm eval report RUN_DIR...`: one table and one chart from evaluation folders."""

from __future__ import annotations

import json

import pytest

from asymllm.evaluation import report


def _write(directory, name, payload):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(payload))


def _alpaca_summary(win_rate, se, lc, em, length, eos, judge="judge-x"):
    return {
        "generator": "g", "n": 120,
        "health": {"n": 120, "mean_length_chars": length, "mean_length_tokens": length / 4, "eos_share": eos,
                   "truncated_share": 1 - eos, "repetition_rate": 0.01},
        "exact_match": {"accuracy": em, "n": 120, "n_correct": round(em * 120), "by_group": {}},
        "judge": {"judge": judge, "reference": "dataset references", "win_rate": win_rate, "standard_error": se,
                  "length_controlled_win_rate": lc, "lc_standard_error": 1.0},
    }


@pytest.fixture
def runs(tmp_path):
    base, lora, mmlu_only = tmp_path / "base", tmp_path / "A_rand_hB_zero", tmp_path / "mmlu_only"
    _write(base, "mmlu.json", {"micro": 0.245, "micro_stderr": 0.0036, "macro": 0.25, "n": 14042, "categories": {}, "subjects": {}})
    _write(base, "alpaca_summary.json", _alpaca_summary(31.25, 4.0, 35.5, 0.1, 210.0, 0.97))
    _write(lora, "alpaca_summary.json", _alpaca_summary(55.0, 4.5, 51.0, 0.625, 40.5, 1.0))
    _write(mmlu_only, "mmlu.json", {"micro": 0.3, "macro": 0.31, "n": 570, "categories": {}, "subjects": {}})
    return [base, lora, mmlu_only]


def test_report_on_fake_runs(runs, tmp_path):
    out = tmp_path / "report"
    result = report.main([*map(str, runs), "--output_dir", str(out)])
    table = (out / "report.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| run | MMLU micro (%) | win rate (%) | LC win rate (%) | exact match (%) | mean length")
    assert lines[2] == "| base | 24.5 ± 0.4 | 31.2 ± 4.0 | 35.5 ± 1.0 | 10.0 | 210.0 | 97.0 |"
    assert lines[3] == "| A_rand_hB_zero | not run | 55.0 ± 4.5 | 51.0 ± 1.0 | 62.5 | 40.5 | 100.0 |"
    assert lines[4] == "| mmlu_only | 30.0 | not run | not run | not run | not run | not run |"
    assert "- base: judge-x against dataset references" in table and "do not compare" not in table
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["run"] for r in result["rows"]] == ["base", "A_rand_hB_zero", "mmlu_only"]


def test_report_flags_incomparable_judges(runs, tmp_path):
    _write(runs[1], "alpaca_summary.json", _alpaca_summary(55.0, 4.5, 51.0, 0.6, 40.0, 1.0, judge="other-judge"))
    report.main([*map(str, runs[:2]), "--output_dir", str(tmp_path / "r")])
    assert "do not compare" in (tmp_path / "r" / "report.md").read_text()


def test_report_tolerates_nulls_and_refuses_empty_runs(tmp_path):
    summary = _alpaca_summary(None, None, None, 0.5, 10.0, 0.5)
    summary["judge"], summary["exact_match"] = None, None
    _write(tmp_path / "plain", "alpaca_summary.json", summary)
    report.main([str(tmp_path / "plain"), "--output_dir", str(tmp_path / "r")])
    assert "| plain | not run | not run | not run | not run | 10.0 | 50.0 |" in (tmp_path / "r" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither mmlu.json nor alpaca_summary.json"):
        report.main([str(tmp_path / "empty"), "--output_dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="no such folder"):
        report.main([str(tmp_path / "missing")])


@pytest.fixture
def base_without_mmlu_and_zero_exact_match(tmp_path):
    """The base model, evaluated with alpaca only and scoring exact match 0, beside a tuned run."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    _write(base, "alpaca_summary.json", _alpaca_summary(31.25, 4.0, 35.5, 0.0, 210.0, 0.97))
    _write(tuned, "mmlu.json", {"micro": 0.3, "micro_stderr": 0.004, "macro": 0.31, "n": 570, "categories": {}, "subjects": {}})
    _write(tuned, "alpaca_summary.json", _alpaca_summary(55.0, 4.5, 51.0, 0.5, 40.5, 1.0))
    return [report.read_run(str(base)), report.read_run(str(tuned))]


def _bar_marks(fig, run: str) -> dict[str, str | None]:
    """metric label -> the text drawn at that run's bar (None: nothing drawn there)."""
    from matplotlib.container import BarContainer

    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    bars = next(c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == run)
    texts = {round(t.get_position()[0], 6): t.get_text() for t in ax.texts}
    return {label: texts.get(round(p.get_x() + p.get_width() / 2, 6)) for label, p in zip(labels, bars.patches)}


def test_chart_tells_a_metric_not_run_from_a_zero(base_without_mmlu_and_zero_exact_match):
    import matplotlib.pyplot as plt

    fig = report.draw_report(base_without_mmlu_and_zero_exact_match)
    base, tuned = _bar_marks(fig, "base"), _bar_marks(fig, "tuned")
    plt.close(fig)
    assert base["MMLU micro"] == "not run" and base["exact match"] == "0.0"
    assert tuned["MMLU micro"] == "30.0" and tuned["exact match"] == "50.0" and base["win rate"] == "31.2"


def test_table_tells_a_metric_not_run_from_a_zero(base_without_mmlu_and_zero_exact_match):
    lines = report.report_markdown(base_without_mmlu_and_zero_exact_match).splitlines()
    assert lines[2] == "| base | not run | 31.2 ± 4.0 | 35.5 ± 1.0 | 0.0 | 210.0 | 97.0 |"
