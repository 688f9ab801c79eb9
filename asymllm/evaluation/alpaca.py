"""`asymllm eval alpaca` (or `python eval/alpaca.py`): generate, score, optionally judge.

    asymllm eval alpaca --adapter outputs/A_rand_hB_zero-r16-s42/adapter            # built-in held-out set
    asymllm eval alpaca --model DIR --data alpaca_eval.json --max_new_tokens 1024 --judge JUDGE_DIR
    asymllm eval alpaca --adapter RUN/adapter --data alpaca_eval.json \\
        --judge http://127.0.0.1:8000/v1 --judge_model Qwen2.5-7B-Instruct      # a vLLM server as judge
    asymllm eval alpaca --adapter B/adapter --reference_outputs outputs/eval/A/model_outputs.json --judge J

Writes into --output_dir (default outputs/eval/<generator name>):
    model_outputs.json     alpaca_eval's format [{instruction, output, generator, dataset}]: the official
                           `alpaca_eval --model_outputs ...` can judge it where an API is reachable
    alpaca_summary.json    health figures, exact match vs the references, judge results (see below)
    alpaca_summary.md      the same for people
    generations.jsonl      one line per output as it is made (resume log: a rerun skips what is done)
    judgments-<id>.jsonl   one per judge setup (judge, reference, seed, template), also resumable
    annotations.json       the judged pairs in alpaca_eval's annotation layout (output_1 = reference,
                           output_2 = model, preference), for alpaca_eval.metrics functions

alpaca_summary.json: {generator, model, fingerprint, data, n, generation: {settings}, health: {n, mean_length_chars,
mean_length_tokens, eos_share, truncated_share, repetition_rate}, exact_match: {accuracy, n, n_correct,
by_group} | null, judge: {judge, reference, win_rate, standard_error, discrete_win_rate, n_wins,
n_wins_base, n_draws, n_total, n_unscored, length_controlled_win_rate, lc_standard_error,
length_coefficient, lc_method, seed, fingerprint} | null}. Win rates in percent (alpaca_eval's unit), shares and
accuracies as fractions. See health.py, exact_match.py, judge.py and winrate.py for the definitions.
fingerprint {id, model, adapter}: the files evaluated (asymllm/fingerprint.py); the generations and
judgments are bound to them, so another adapter, model or local judge in the same folder is refused
(rerun with --overwrite, or another --output_dir).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import sys

from ..builtin import DEFAULT_MODEL
from ..cli_args import ArgumentParser
from ..data import DataError
from ..fingerprint import fingerprint_record, model_fingerprint
from .generation import GenerationError, GenerationSettings, generate
from .instructions import InstructionsError, load_instructions, read_model_outputs, write_model_outputs
from .judge import DEFAULT_MAX_CHARS, JUDGE_TEMPLATE, JudgeError, check_judge_spec, judge_pairs, make_judge
from ..quantization import add_quantization_flags, quantization_from_args
from .loading import EvalModelError, evaluated_fingerprints, load_for_eval
from .metrics import exact_match
from .metrics import health_figures
from .resume import ResumeError, ResumeLog
from .winrate import length_controlled_win_rate, win_rate

logger = logging.getLogger("asymllm.eval.alpaca")

USER_ERRORS = (DataError, InstructionsError, EvalModelError, GenerationError, JudgeError, ResumeError)

LC_METHOD = ("asymllm logistic fit of the preference on tanh(standardised length difference) + intercept, "
             "predicted at zero difference; in the spirit of alpaca_eval length_controlled_v1, not equal to it")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="asymllm eval alpaca", description="Alpaca-style generation, "
                            "health figures, exact match and a pairwise judge; resumable.")
    model = parser.add_argument_group("model under evaluation")
    model.add_argument("--model", help=f"base model path or name (default: the adapter's base, else {DEFAULT_MODEL})")
    model.add_argument("--adapter", help="a LoRASYM adapter folder (e.g. RUN/adapter)")
    model.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    add_quantization_flags(parser)
    model.add_argument("--chat_template", help="chat template for a model without one saved beside its adapter: chatml, llama3, llama2, mistral, alpaca, tokenizer or a Jinja file (default: as training chooses; an adapter's own is always used)")
    model.add_argument("--generator_name", help="the run's name in the outputs (default: from --adapter or --model)")
    data = parser.add_argument_group("instructions")
    data.add_argument("--data", help="alpaca_eval JSON or alpaca JSON/JSONL (default: the built-in held-out set)")
    data.add_argument("--split", default="eval", help="split, for JSON keyed by split and hub datasets (%(default)s)")
    data.add_argument("--limit", type=int, help="only the first N instructions")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (%(default)s)")
    gen.add_argument("--max_new_tokens", type=int, default=512, help="(%(default)s)")
    gen.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="with --do_sample (%(default)s)")
    gen.add_argument("--top_p", type=float, default=1.0, help="with --do_sample (%(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, and the judge's order of each pair (%(default)s)")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", default="none", help="none (default) | a local model path or name | http://host:port/v1")
    judge.add_argument("--judge_model", help="the served model's name, for an HTTP judge (default: the only one served)")
    judge.add_argument("--judge_batch_size", type=int, default=8, help="pairs per judge call (%(default)s)")
    judge.add_argument("--judge_max_chars", type=int, default=DEFAULT_MAX_CHARS,
                       help="outputs longer than this are cut before judging (%(default)s)")
    judge.add_argument("--reference_outputs", help="another run's model_outputs.json to judge against, "
                                                   "instead of the dataset's references")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", help="default: outputs/eval/<generator name>")
    out.add_argument("--overwrite", action="store_true", help="discard earlier results in --output_dir")
    out.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.judge != "none" and args.judge_batch_size < 1:
        parser.error(f"--judge_batch_size must be at least 1, got {args.judge_batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="[asymllm eval] %(message)s", level=logging.INFO)
    try:
        return evaluate(args)
    except USER_ERRORS as error:
        raise SystemExit(f"asymllm eval alpaca: error: {error}") from None


def evaluate(args: argparse.Namespace) -> dict:
    if args.judge != "none":
        check_judge_spec(args.judge)
    items = load_instructions(args.data, split=args.split, limit=args.limit)
    generator = args.generator_name or default_generator_name(args.model, args.adapter)
    out_dir = args.output_dir or os.path.join("outputs", "eval", generator)
    os.makedirs(out_dir, exist_ok=True)
    if args.overwrite:
        for name in os.listdir(out_dir):
            if name.startswith("judgments-"):
                os.remove(os.path.join(out_dir, name))

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    settings.validate()
    # Bound to the files evaluated, not their paths: another adapter or model in the same
    # folder refuses the old generations (asymllm/fingerprint.py).
    fingerprints = evaluated_fingerprints(args.model, args.adapter, quantization_from_args(args))
    log = ResumeLog(os.path.join(out_dir, "generations.jsonl"), {"dtype": args.dtype, **settings.resume_key(),
                                                                  **({"chat_template": args.chat_template} if args.chat_template else {})},
                    overwrite=args.overwrite, fingerprints=fingerprints)
    todo = [item for item in items if item.key not in log.done]
    description = generate_missing(args, todo, settings, log)
    done = [log.done[item.key] for item in items]
    outputs = {item.key: record["output"] for item, record in zip(items, done)}
    write_model_outputs(os.path.join(out_dir, "model_outputs.json"), items, outputs, generator)

    summary = {
        "generator": generator,
        "model": description or f"{args.model or DEFAULT_MODEL}" + (f" + adapter {args.adapter}" if args.adapter else ""),
        "fingerprint": fingerprint_record(fingerprints),
        "data": args.data or "built-in held-out set",
        "n": len(items),
        "n_generated_now": len(todo),
        "generation": settings.resume_key(),
        "health": health_figures([r["output"] for r in done], [r["n_tokens"] for r in done], [r["stopped"] for r in done]),
        "exact_match": exact_match([r["output"] for r in done], [i.reference for i in items], [i.group for i in items]),
        "judge": None,
    }
    if args.judge != "none":
        summary["judge"] = judge_run(args, items, outputs, generator, out_dir)
    with open(os.path.join(out_dir, "alpaca_summary.json"), "w") as f:
        json.dump(_finite(summary), f, indent=2)
    with open(os.path.join(out_dir, "alpaca_summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    logger.info("outputs in %s (model_outputs.json is alpaca_eval's format)", out_dir)
    return summary


def default_generator_name(model: str | None, adapter: str | None) -> str:
    """The adapter's run name (RUN for RUN/adapter), else the model's folder or hub name."""
    if adapter:
        path = os.path.normpath(os.path.abspath(adapter))
        name = os.path.basename(path)
        return os.path.basename(os.path.dirname(path)) if name in ("adapter", "final", "checkpoint") else name
    return os.path.basename(os.path.normpath(model or DEFAULT_MODEL))


def generate_missing(args, todo, settings: GenerationSettings, log: ResumeLog) -> str | None:
    """Generate `todo`, appending to `log` batch by batch; the model is loaded only if needed."""
    if not todo:
        return None
    from tqdm.auto import tqdm

    model, tokenizer, description = load_for_eval(args.model, args.adapter, args.dtype, chat_template=args.chat_template,
                                                  quantization=quantization_from_args(args))
    with tqdm(total=len(todo), desc="generating", unit="output", disable=args.no_progress) as bar:
        for records in generate(model, tokenizer, todo, settings):
            log.append(records)
            bar.update(len(records))
    del model
    gc.collect()
    return description


def judge_run(args, items, outputs: dict[str, str], generator: str, out_dir: str) -> dict:
    if args.reference_outputs:
        by_instruction, reference_name = read_model_outputs(args.reference_outputs)
        references = {i.key: by_instruction[i.instruction] for i in items if i.instruction in by_instruction}
        reference_label, reference_name = os.path.abspath(args.reference_outputs), reference_name or "reference_outputs"
        missing = len(items) - len(references)
        if not references:
            raise InstructionsError(f"--reference_outputs {args.reference_outputs}: none of its instructions is in the data")
        if missing:
            logger.warning("--reference_outputs: %d of %d instructions have no output there; judged without them", missing, len(items))
    else:
        references = {i.key: i.reference for i in items if i.reference is not None}
        reference_label, reference_name = "dataset references", "reference"
        if not references:
            raise InstructionsError("the data has no reference outputs to judge against; pass --reference_outputs")
    judged = [i for i in items if i.key in references]
    pairs = [{"key": f"{i.key}:{_digest(outputs[i.key], references[i.key])}", "order_key": i.key,
              "instruction": i.instruction, "output": outputs[i.key], "reference": references[i.key]} for i in judged]
    setup = {"judge": args.judge, "judge_model": args.judge_model, "reference": reference_label, "seed": args.seed,
             "max_chars": args.judge_max_chars, "template": _digest(JUDGE_TEMPLATE)}
    # A local judge is bound to its files too: a folder holding another judge now refuses
    # the cached judgments. A served (HTTP) judge is known by its URL and model name only.
    judge_fingerprints = {} if _is_http(args.judge) else {"judge": model_fingerprint(args.judge)}
    log = ResumeLog(os.path.join(out_dir, f"judgments-{_digest(json.dumps(setup, sort_keys=True))}.jsonl"), setup,
                    fingerprints=judge_fingerprints)
    judge, judge_label = None, args.judge + (f" ({args.judge_model})" if args.judge_model else "")
    if any(pair["key"] not in log.done for pair in pairs):  # load the judge only when there is judging to do
        judge = make_judge(args.judge, args.judge_model, args.dtype)
    preferences = judge_pairs(judge, pairs, seed=args.seed, batch_size=args.judge_batch_size,
                              max_chars=args.judge_max_chars, log=log, progress=not args.no_progress)
    values = [preferences[pair["key"]] for pair in pairs]
    annotations = [{"instruction": p["instruction"], "output_1": p["reference"], "output_2": p["output"],
                    "generator_1": reference_name, "generator_2": generator, "preference": v,
                    "annotator": judge_label} for p, v in zip(pairs, values)]
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(_finite(annotations), f, indent=2, ensure_ascii=False)
    lc = length_controlled_win_rate(values, [len(p["output"]) for p in pairs], [len(p["reference"]) for p in pairs])
    return {
        "judge": judge_label,
        "reference": reference_label,
        **win_rate(values),
        "n_unscored": sum(math.isnan(v) for v in values),
        "length_controlled_win_rate": lc["length_controlled_win_rate"],
        "lc_standard_error": lc["lc_standard_error"],
        "length_coefficient": lc["length_coefficient"],
        "lc_method": LC_METHOD,
        "seed": args.seed,
        "fingerprint": fingerprint_record(judge_fingerprints) if judge_fingerprints else None,
    }


def _is_http(judge: str) -> bool:
    return judge.startswith(("http://", "https://"))


def _digest(*texts: str) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:10]


def _finite(value):
    """NaN (no preference, no standard error from one item) as JSON null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summary_markdown(summary: dict) -> str:
    health, em, judge = summary["health"], summary["exact_match"], summary["judge"]
    lines = [f"# {summary['generator']}: alpaca-style evaluation", "",
             f"model: {summary['model']} (fingerprint {summary['fingerprint']['id']}); "
             f"data: {summary['data']} ({summary['n']} instructions); "
             f"generation: {', '.join(f'{k}={v}' for k, v in summary['generation'].items())}", "",
             "| figure | value |", "|---|---|",
             f"| mean output length | {health['mean_length_chars']:.1f} chars, {health['mean_length_tokens']:.1f} tokens |",
             f"| stopped with EOS | {health['eos_share']:.1%} |",
             f"| repetition rate (word 4-grams) | {health['repetition_rate']:.1%} |"]
    if em:
        lines.append(f"| exact match vs reference | {em['accuracy']:.1%} ({em['n_correct']}/{em['n']}) |")
    if judge:
        lines += [f"| win rate vs {judge['reference']} | {judge['win_rate']:.1f} ± {judge['standard_error']:.1f} "
                  f"(n={judge['n_total']}, unscored {judge['n_unscored']}) |",
                  f"| length-controlled win rate | {judge['length_controlled_win_rate']:.1f} ± {judge['lc_standard_error']:.1f} |",
                  f"| judge | {judge['judge']} |"]
    if em and em["by_group"]:
        lines += ["", "| task | exact match | n |", "|---|---|---|"]
        lines += [f"| {g} | {v['accuracy']:.1%} | {v['n']} |" for g, v in em["by_group"].items()]
    if judge:
        lines += ["", f"Length control: {judge['lc_method']}."]
    return "\n".join(lines) + "\n"
