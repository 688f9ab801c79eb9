"""`asymllm sweep` on a tiny model: 2 recipes x 1 rank x 1 seed, stopped after the first run and resumed."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from asymllm import sweep
from asymllm.sweep import plan
from asymllm.tiny import save_tiny_model

pytestmark = pytest.mark.slow


def sweep_command(model_dir, output):
    return [sys.executable, "-m", "asymllm.cli", "sweep", "--recipes", "lora,asym", "--ranks", "4", "--seeds", "3",
            "--output", str(output), "--eval_flags", "--limit 6 --max_new_tokens 8 --batch_size 6 --no_progress",
            "--", "--model", model_dir, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
            "--logging_steps", "2", "--per_device_eval_batch_size", "64"]


def test_plan_canonicalises_and_crosses():
    specs = plan("lora,asym", "8,16", "0,1")
    assert len(specs) == 8 and specs[0].name == "hA_he_hB_zero-r8-s0" and specs[-1].name == "A_rand_hB_zero-r16-s1"


def test_sweep_stopped_after_first_run_resumes_and_tabulates(tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "model"))
    output = tmp_path / "sweep"
    first = output / "runs" / "hA_he_hB_zero-r4-s3" / "result.json"
    process = subprocess.Popen(sweep_command(model_dir, output), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert first.exists(), process.communicate()[0][-3000:] if process.poll() is not None else "first run did not finish"
    os.killpg(process.pid, signal.SIGKILL)  # stop the sweep while the second run is under way
    process.wait()
    first_mtime = first.stat().st_mtime

    done = subprocess.run(sweep_command(model_dir, output), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hA_he_hB_zero-r4-s3: done already, skipped" in done.stderr
    assert first.stat().st_mtime == first_mtime

    rows = list(csv.DictReader(open(output / "sweep.csv")))
    assert [r["recipe"] for r in rows] == ["hA_he_hB_zero", "A_rand_hB_zero"]
    lora, asym = rows
    # B-only trains r * d_out per module; LoRA r * (d_in + d_out): the asymmetric run has fewer.
    assert int(asym["trainable_params"]) < int(lora["trainable_params"])
    assert int(asym["trainable_params"]) == 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64) * 2
    for row in rows:
        assert float(row["train_loss"]) > 0 and float(row["heldout_loss"]) > 0
        assert 0.0 <= float(row["heldout_exact_match"]) <= 1.0
    assert (output / "sweep.md").read_text().count("|") > 20
    assert (output / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((output / "runs" / "A_rand_hB_zero-r4-s3" / "result.json").read_text())
    assert result["seed"] == 3 and result["rank"] == 4


def test_a_cell_whose_adapter_changed_is_reevaluated_not_reused(tmp_path, caplog):
    """result.json is reused only for the adapter it was computed from (its fingerprint)."""
    from transformers import AutoModelForCausalLM

    from asymllm import load_lorasym_model, save_adapter
    from asymllm.fingerprint import adapter_fingerprint
    from asymllm.tiny import randomize_lora_B

    model_dir = save_tiny_model(str(tmp_path / "model"))
    argv = ["--recipes", "asym", "--ranks", "4", "--seeds", "0", "--output", str(tmp_path / "sweep"),
            "--eval_flags", "--limit 3 --max_new_tokens 4 --no_progress",
            "--", "--model", model_dir, "--max_steps", "2", "--logging_steps", "1", "--per_device_eval_batch_size", "64"]
    cell = tmp_path / "sweep" / "runs" / "A_rand_hB_zero-r4-s0"
    adapter, summary = cell / "train" / "adapter", cell / "eval" / "alpaca_summary.json"
    caplog.set_level(logging.INFO, logger="asymllm.sweep")
    first = sweep.main(argv)[0]
    assert first["adapter_fingerprint"]["id"] == adapter_fingerprint(str(adapter))["id"]
    train_log = (cell / "train.log").stat().st_mtime_ns

    peft_model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    randomize_lora_B(peft_model, std=2.0, seed=7)  # another adapter in the cell's folder
    save_adapter(peft_model, str(adapter))
    new_id = adapter_fingerprint(str(adapter))["id"]
    assert new_id != first["adapter_fingerprint"]["id"]
    caplog.clear()
    second = sweep.main(argv)[0]
    assert "A_rand_hB_zero-r4-s0: the adapter changed since result.json was written" in caplog.text
    assert "done already, skipped" not in caplog.text
    assert second["adapter_fingerprint"]["id"] == new_id
    assert json.loads((cell / "result.json").read_text())["adapter_fingerprint"]["id"] == new_id
    assert json.loads(summary.read_text())["fingerprint"]["adapter"]["id"] == new_id  # evaluated again, this adapter
    assert (cell / "train.log").stat().st_mtime_ns == train_log  # not trained again

    caplog.clear()
    assert sweep.main(argv)[0]["adapter_fingerprint"]["id"] == new_id
    assert "A_rand_hB_zero-r4-s0: done already, skipped" in caplog.text

    # The adapters pruned (or the sweep resumed on another machine from its committed result
    # files): only --reuse_without_adapter reuses the numbers, and the report says so.
    import shutil

    shutil.rmtree(adapter)
    caplog.clear()
    kept = sweep.main(["--reuse_without_adapter", *argv])[0]
    assert "A_rand_hB_zero-r4-s0: done already (its adapter is not here; result.json reused: --reuse_without_adapter)" in caplog.text
    assert kept["adapter_fingerprint"]["id"] == new_id and not adapter.exists()
    assert (cell / "train.log").stat().st_mtime_ns == train_log
    assert "1 of these 1 runs were reused without their adapter" in (tmp_path / "sweep" / "sweep.md").read_text()
    caplog.clear()
    retrained = sweep.main(argv)[0]
    assert "training (result.json is there but its adapter" in caplog.text and adapter.exists()
    assert (cell / "train.log").stat().st_mtime_ns != train_log
    assert "reused without their adapter" not in (tmp_path / "sweep" / "sweep.md").read_text()
    assert retrained["adapter_fingerprint"]["id"] == adapter_fingerprint(str(adapter))["id"]


def selection_command(model_dir, output):
    return [sys.executable, "-m", "asymllm.cli", "sweep", "--recipes", "lora,asym", "--ranks", "4",
            "--learning_rates", "1e-6,1e-2", "--select_on", "validation", "--seeds", "0", "--final_seeds", "1,2",
            "--output", str(output), "--eval_flags", "--limit 6 --max_new_tokens 8 --batch_size 6 --no_progress",
            "--", "--model", model_dir, "--max_steps", "4", "--warmup_steps", "0", "--logging_steps", "2",
            "--per_device_eval_batch_size", "64"]


def test_learning_rates_are_selected_on_validation_then_run_with_fresh_seeds_and_resume(tmp_path):
    """4 steps at lr 1e-6 leave a tiny model where it started; at 1e-2 its validation loss
    drops: selection must pick 1e-2 for both recipes, from the training data only. A kill in the
    final phase resumes without redoing the selection or the finished final cell."""
    model_dir = save_tiny_model(str(tmp_path / "model"))
    output = tmp_path / "sweep"
    first_final = output / "final" / "runs" / "hA_he_hB_zero-r4-lr0.01-s1" / "result.json"
    process = subprocess.Popen(selection_command(model_dir, output), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not first_final.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert first_final.exists(), process.communicate()[0][-3000:] if process.poll() is not None else "no final run"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    done = subprocess.run(selection_command(model_dir, output), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("done already, skipped") == 5  # 4 selection cells + the first final one
    split = json.loads((output / "selection" / "data" / "split.json").read_text())
    assert (split["validation"], split["train"]) == (60, 420)
    selected = json.loads((output / "selection" / "selected.json").read_text())["selected"]
    assert {(s["recipe"], s["lr"]) for s in selected} == {("hA_he_hB_zero", 1e-2), ("A_rand_hB_zero", 1e-2)}
    selection_log = (output / "selection" / "runs" / "A_rand_hB_zero-r4-lr1e-06-s0" / "train.log").read_text()
    assert "--dataset" in selection_log and str(output / "selection" / "data" / "validation.jsonl") in selection_log
    assert not (output / "selection" / "runs" / "A_rand_hB_zero-r4-lr1e-06-s0" / "eval").exists()  # loss needs no generation
    for recipe in ("hA_he_hB_zero", "A_rand_hB_zero"):
        for seed in (1, 2):
            run = output / "final" / "runs" / f"{recipe}-r4-lr0.01-s{seed}"
            log = (run / "train.log").read_text().splitlines()[0]
            assert "--learning_rate 0.01" in log and "--lora_alpha 8" in log and "--dataset" not in log
            result = json.loads((run / "result.json").read_text())
            assert result["lr"] == 1e-2 and 0.0 <= result["heldout_exact_match"] <= 1.0
    rows = list(csv.DictReader(open(output / "sweep.csv")))
    assert [r["phase"] for r in rows] == ["selection"] * 4 + ["final"] * 4
    report = (output / "sweep.md").read_text()
    assert "## Selection" in report and "60 of the 480 training examples" in report and "## Final" in report
    assert "Paired against hA_he_hB_zero at the same rank" in report and "A_rand_hB_zero r=4 lr=0.01" in report


def test_a_result_json_cut_short_by_a_kill_reruns_the_cell_instead_of_crashing(tmp_path, caplog):
    """A sweep killed while a cell wrote result.json left it empty, and the resumed sweep died
    on it with a JSONDecodeError (seen in CI). The file is now written whole or not at all, and
    an unreadable one counts as not done."""
    from asymllm.sweep.cells import load_result, write_result

    (tmp_path / "result.json").write_text("")
    assert load_result(str(tmp_path)) is None
    assert f"{tmp_path / 'result.json'} is unreadable" in caplog.text
    write_result(str(tmp_path), {"heldout_loss": 0.5})
    assert load_result(str(tmp_path)) == {"heldout_loss": 0.5} and sorted(os.listdir(tmp_path)) == ["result.json"]
