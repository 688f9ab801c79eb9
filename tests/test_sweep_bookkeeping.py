"""The sweep's bookkeeping: what each phase is scored on, which flags it reads, when a cell is
reused, re-evaluated, retrained or recorded as diverged. Tiny model, real `asymllm train` and
`asymllm eval` processes."""

import json
import logging
import shutil

import pytest

from asymllm import sweep
from asymllm.data import BUILTIN_HELDOUT
from asymllm.sweep.cells import Phase, RunSpec, cell_settings, lora_alpha
from asymllm.sweep.compare import grid_edges, next_rate
from asymllm.sweep.report import comparisons
from asymllm.tiny import save_tiny_model

EVAL = "--limit 3 --max_new_tokens 4 --batch_size 3 --no_progress"
QUICK = ["--max_steps", "2", "--logging_steps", "1", "--per_device_eval_batch_size", "64", "--save_strategy", "no"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny"))


def user_data(folder, train=24, heldout=6):
    """A user's own train and test files (alpaca layout), not the built-in ones."""
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
            for w in ("apple", "stone", "river", "cloud", "piano", "tiger") * 6]
    paths = {}
    for name, part in (("train.jsonl", rows[:train]), ("test.jsonl", rows[train:train + heldout])):
        paths[name] = str(folder / name)
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths["train.jsonl"], paths["test.jsonl"]


# --- finding 1: what each phase is scored on ----------------------------------------------


def test_eval_flags_may_not_choose_the_scored_data():
    """`--eval_flags "--data test.jsonl"` was appended after the selection's validation file and
    won: the learning rate was chosen on the test set."""
    for flags in ("--data /tmp/test.jsonl --limit 6", "--limit 6 --data=/tmp/test.jsonl", "--split test"):
        with pytest.raises(SystemExit) as refused:
            sweep.parse_args(["--configs", "lora:4", "--output", "/tmp/unused", "--eval_flags", flags, "--", "--max_steps", "2"])
        assert "the sweep chooses the scored data itself" in str(refused.value)
        assert "--eval_dataset" in str(refused.value) or "--eval_split" in str(refused.value)


def test_user_data_without_a_heldout_set_is_refused_not_scored_on_the_builtin_set():
    with pytest.raises(SystemExit) as refused:
        sweep.main(["--configs", "lora:4", "--output", "/tmp/unused", "--", "--dataset", "/tmp/mine.jsonl"])
    assert "has no held-out set" in str(refused.value) and "--eval_dataset FILE" in str(refused.value)


@pytest.mark.slow
def test_selection_and_final_phase_score_the_users_data_named_with_equals(tiny, tmp_path):
    """`--dataset=PATH` (with `=`) was ignored by the selection, which then split the built-in
    data; the final phase was scored on the built-in held-out set whatever the runs trained on."""
    train_file, test_file = user_data(tmp_path)
    out = tmp_path / "sweep"
    sweep.main(["--configs", "lora:4", "--learning_rates", "1e-3", "--select_on", "validation", "--select_metric",
                "exact_match", "--seeds", "0", "--final_seeds", "1", "--validation_fraction", "0.25",
                "--output", str(out), "--eval_flags", EVAL,
                "--", "--model", tiny, f"--dataset={train_file}", f"--eval_dataset={test_file}", *QUICK])
    split = json.loads((out / "selection" / "data" / "split.json").read_text())
    assert split["source"] == train_file and (split["train"], split["validation"]) == (18, 6)
    selection_eval = json.loads(next((out / "selection" / "runs").glob("*/eval/alpaca_summary.json")).read_text())
    assert selection_eval["data"] == split["validation_file"]
    final_eval = json.loads(next((out / "final" / "runs").glob("*/eval/alpaca_summary.json")).read_text())
    assert final_eval["data"] == test_file
    report = (out / "sweep.md").read_text()
    assert f"Selection scored on `{split['validation_file']}` (sha256 {split['sha256']['validation_file']})" in report
    assert f"Held-out numbers scored on `{test_file}` (sha256 {sweep.flags.file_sha256(test_file)})" in report


# --- finding 3: an evaluation change re-evaluates, it does not retrain ------------------------


@pytest.mark.slow
def test_a_changed_evaluation_setting_reevaluates_the_kept_adapter(tiny, tmp_path, caplog):
    argv = ["--configs", "asym:4", "--seeds", "0", "--output", str(tmp_path / "sweep"), "--", "--model", tiny, *QUICK]
    cell = tmp_path / "sweep" / "runs" / "A_rand_hB_zero-r4-s0"
    caplog.set_level(logging.INFO, logger="asymllm.sweep")
    sweep.main(["--eval_flags", EVAL, *argv])
    trained = (cell / "train.log").stat().st_mtime_ns
    caplog.clear()
    second = sweep.main(["--eval_flags", EVAL.replace("--limit 3", "--limit 4"), *argv])[0]
    assert "re-evaluating" in caplog.text and "its evaluation settings changed (eval_flags)" in caplog.text
    assert (cell / "train.log").stat().st_mtime_ns == trained  # not trained again
    assert json.loads((cell / "eval" / "alpaca_summary.json").read_text())["n"] == 4
    assert second["settings"]["eval"]["eval_flags"].startswith("--limit 4")

    shutil.rmtree(cell / "train" / "adapter")  # pruned: this change cannot be evaluated without training
    with pytest.raises(SystemExit) as blocked:
        sweep.main(["--eval_flags", EVAL, *argv])
    assert "A_rand_hB_zero-r4-s0: its evaluation settings changed (eval_flags)" in str(blocked.value)
    assert "--retrain_to_evaluate" in str(blocked.value)
    assert (cell / "train.log").stat().st_mtime_ns == trained
    sweep.main(["--eval_flags", EVAL, "--retrain_to_evaluate", *argv])
    assert (cell / "train.log").stat().st_mtime_ns != trained and (cell / "train" / "adapter").is_dir()


# --- finding 4: a diverged cell is a result -------------------------------------------------


@pytest.mark.slow
def test_a_diverging_learning_rate_counts_as_the_worst_and_is_not_retried(tiny, tmp_path, caplog):
    """Train exits 3 on a non-finite loss; the sweep used to stop there, on every rerun."""
    out = tmp_path / "sweep"
    argv = ["--configs", "lora:4", "--learning_rates", "1e-3,1e30", "--select_on", "validation", "--seeds", "0",
            "--final_seeds", "1", "--output", str(out), "--eval_flags", EVAL,
            "--", "--model", tiny, "--max_steps", "6", "--warmup_steps", "0", "--save_strategy", "no", "--logging_steps", "1"]
    caplog.set_level(logging.INFO, logger="asymllm.sweep")
    sweep.main(argv)
    cell = out / "selection" / "runs" / "hA_he_hB_zero-r4-lr1e+30-s0"
    result = json.loads((cell / "result.json").read_text())
    assert result["diverged"]["step"] is not None and "step" in result["diverged"]["where"]
    assert result["heldout_loss"] is None
    selected = json.loads((out / "selection" / "selected.json").read_text())["selected"]
    assert [(s["lr"], s["at_grid_edge"]) for s in selected] == [(1e-3, "smallest")]
    report = (out / "sweep.md").read_text()
    assert "| 1 (1 diverged) |" in report and "**At the edge of the grid**" in report
    csv_rows = (out / "sweep.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",diverged_at_step") and csv_rows[2].endswith(f",{result['diverged']['step']}")
    trained = (cell / "train.log").stat().st_mtime_ns
    caplog.clear()
    sweep.main(argv)
    assert "hA_he_hB_zero-r4-lr1e+30-s0: done already, skipped (diverged:" in caplog.text
    assert (cell / "train.log").stat().st_mtime_ns == trained


# --- the grid's edge ------------------------------------------------------------------------


def test_the_next_rate_continues_the_grid_pattern():
    assert next_rate([1e-4, 3e-4, 1e-3, 3e-3], "largest") == 1e-2
    assert next_rate([1e-4, 3e-4, 1e-3, 3e-3], "smallest") == 3e-5
    assert next_rate([1e-4, 1e-3, 1e-2], "largest") == 1e-1
    assert next_rate([1e-3, 2e-3], "largest") == 4e-3
    runs = [{"recipe": "a", "rank": 4, "lr": lr} for lr in (1e-3, 3e-3, 1e-2)]
    assert grid_edges(runs, {("a", 4): 1e-2}) == {("a", 4): "largest"}
    assert grid_edges(runs, {("a", 4): 3e-3}) == {}


@pytest.mark.slow
def test_extend_grid_runs_the_next_rate_while_the_choice_is_at_the_edge(tiny, tmp_path):
    out = tmp_path / "sweep"
    sweep.main(["--configs", "lora:4", "--learning_rates", "1e-5,1e-4", "--select_on", "validation", "--seeds", "0",
                "--final_seeds", "1", "--extend_grid", "1", "--output", str(out), "--eval_flags", EVAL,
                "--", "--model", tiny, "--max_steps", "4", "--warmup_steps", "0", "--save_strategy", "no"])
    assert (out / "selection" / "runs" / "hA_he_hB_zero-r4-lr0.001-s0" / "result.json").exists()
    selected = json.loads((out / "selection" / "selected.json").read_text())["selected"]
    assert [(s["lr"], s["at_grid_edge"]) for s in selected] == [(1e-3, "largest")]  # still the edge: one extension allowed


# --- minor: flags read as train reads them --------------------------------------------------


def test_alpha_ratio_never_overrides_a_lora_alpha_of_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_alpha: 8\n")
    args = sweep.parse_args(["--configs", "lora:16", "--output", str(tmp_path / "s"), "--config", str(config)])
    assert lora_alpha(RunSpec("hA_he_hB_zero", 16, 0), args) is None  # the file's 8 stands, at every rank
    with pytest.raises(SystemExit):
        sweep.parse_args(["--configs", "lora:16", "--output", str(tmp_path / "s"), "--config", str(config), "--alpha_ratio", "2"])
    plain = sweep.parse_args(["--configs", "lora:16", "--output", str(tmp_path / "s"), "--", "--lora_alpha=4"])
    assert lora_alpha(RunSpec("hA_he_hB_zero", 16, 0), plain) is None


def test_an_edited_config_file_or_dataset_is_another_setting(tmp_path):
    config, data = tmp_path / "run.yaml", tmp_path / "mine.jsonl"
    config.write_text("warmup_steps: 0\n")
    data.write_text('{"instruction": "a", "output": "b"}\n')
    argv = ["--configs", "lora:4", "--output", str(tmp_path / "s"), "--config", str(config), "--",
            "--dataset", str(data), "--eval_dataset", str(data), "--eval_split", "x"]
    spec, phase = RunSpec("hA_he_hB_zero", 4, 0), Phase(str(tmp_path / "s" / "runs"), [])
    before = cell_settings(spec, phase, sweep.parse_args(argv))
    config.write_text("warmup_steps: 5\n")
    after_config = cell_settings(spec, phase, sweep.parse_args(argv))
    data.write_text('{"instruction": "a", "output": "c"}\n')
    after_data = cell_settings(spec, phase, sweep.parse_args(argv))
    assert before != after_config != after_data
    assert after_config["files_sha256"]["dataset"] == before["files_sha256"]["dataset"]


def test_the_builtin_heldout_set_keeps_the_settings_of_earlier_sweeps(tmp_path):
    """The final phase now passes the built-in held-out file explicitly; its settings must still
    equal those recorded by earlier sweeps (the committed study resumes from them)."""
    args = sweep.parse_args(["--configs", "lora:16", "--output", str(tmp_path / "s"), "--eval_flags", EVAL])
    settings = cell_settings(RunSpec("hA_he_hB_zero", 16, 3, 1e-3), Phase("x", [], name="final", eval_data=BUILTIN_HELDOUT), args)
    assert settings["eval"]["data"] is None and "files_sha256" not in settings
    assert set(settings) == {"run", "lora_alpha", "config", "train_flags", "data_sha256", "eval"}


def test_extra_fields_of_parquet_rows_are_written_as_text(tmp_path):
    """A datetime or bytes column made json.dumps raise TypeError while writing the split."""
    import datetime

    import pyarrow
    import pyarrow.parquet

    from asymllm.data import load_examples
    from asymllm.sweep.command import write_examples

    table = pyarrow.table({"instruction": ["say hi"], "output": ["hi"],
                           "created": [datetime.datetime(2026, 1, 2, 3, 4, 5)], "blob": [b"\x00raw"]})
    pyarrow.parquet.write_table(table, tmp_path / "data.parquet")
    examples, _ = load_examples(str(tmp_path / "data.parquet"))
    path = write_examples(str(tmp_path / "out"), {"part.jsonl": examples})["part.jsonl"]
    row = json.loads(open(path).read())
    assert row["created"] == "2026-01-02T03:04:05" and row["blob"] == "\x00raw"


def test_grid_mode_compares_at_matched_learning_rates_only():
    runs = [{"recipe": recipe, "rank": 4, "lr": lr, "seed": seed, "trainable_params": 100,
             "heldout_loss": 1.0 + seed / 10 + (recipe == "a") * 0.01}
            for recipe in ("a", "ref") for lr in (1e-3, 1e-2) for seed in (0, 1)]
    pairs = [(p.config, p.reference) for _, found in comparisons(runs, "ref", matched_lr=True) for p in found]
    assert sorted(set(pairs)) == [(("a", 4, 1e-3), ("ref", 4, 1e-3)), (("a", 4, 1e-2), ("ref", 4, 1e-2))]
    every = [(p.config, p.reference) for _, found in comparisons(runs, "ref") for p in found]
    assert len(set(every)) == 4  # every rate with every rate: what grid mode no longer reports


# --- finding 2: an unfinished cell continues only a checkpoint of its own settings ------------


@pytest.mark.slow
def test_an_unfinished_cell_of_other_settings_starts_afresh_and_says_why(tiny, tmp_path, caplog):
    """The issue's repro: a cell's training stopped at step 4 of 40, then the sweep runs with
    --max_steps 8; it used to continue the old optimizer, schedule and data position."""
    from asymllm.training.train import main as train

    cell = tmp_path / "sweep" / "runs" / "hA_he_hB_zero-r4-s0"
    train(["--model", tiny, "--recipe", "lora", "--lora_r", "4", "--lora_alpha", "8", "--seed", "0",
           "--output_dir", str(cell / "train"), "--max_steps", "40", "--save_steps", "2", "--save_strategy", "steps",
           "--stop_after_steps", "4", "--logging_steps", "2"])
    assert (cell / "train" / "checkpoint-4").is_dir()
    caplog.set_level(logging.INFO, logger="asymllm.sweep")
    result = sweep.main(["--configs", "lora:4", "--seeds", "0", "--output", str(tmp_path / "sweep"), "--eval_flags", EVAL,
                         "--", "--model", tiny, "--max_steps", "8", "--logging_steps", "2"])[0]
    assert "hA_he_hB_zero-r4-s0: starting afresh: asymllm train: error: --resume_from_checkpoint" in caplog.text
    assert "--max_steps" in caplog.text  # the setting that differs is named
    log = (cell / "train.log").read_text()
    assert "continuing from" not in log and "--overwrite_output_dir" in log.splitlines()[0]
    state = json.loads((cell / "train" / "adapter" / ".." / "metrics.json").read_text())
    assert state["steps"] == 8 and result["settings"]["train_flags"][-3:] == ["8", "--logging_steps", "2"]
