"""Supervised fine-tuning with a LoRASYM adapter: parse, load, adapt, train, save.

    asymllm train                                   # built-in default: SmolLM2-135M + built-in data
    deepspeed launch/sft.py --recipe A_rand_hB_zero --deepspeed ds_configs/zero3.json ...
    torchrun --nproc_per_node 8 launch/sft.py --config launch/run.example.yaml --model meta-llama/Llama-2-7b-hf

Order matters under ZeRO-3: the distributed bootstrap, then the SFTConfig (it activates
the DeepSpeed config), then `from_pretrained` (which then loads the base partitioned),
then the adapter (its SVD inits gather the full weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapters.files import AdapterFileError
from ..adapters.init import InitError
from ..adapters.model import LoRASYMConfig, get_lorasym_model
from ..adapters.recipe import Recipe, RecipeError, describe
from ..adapters.targets import TargetError, is_all_linear
from ..attention import AttentionError, choose_attention, model_attention  # noqa: F401 (choose_attention: a name tests use)
from ..builtin import resolve_model
from ..data import BUILTIN_DATASET, BUILTIN_HELDOUT, DataError, load_examples, split_heldout
from ..distributed import bootstrap_cpu_distributed, finish_distributed, restart_store_warning
from ..quantization import QuantizationError, check_layers_quantized, release_checkpoint_memory
from ..records import source_identity, split_read
from ..run_record import training_settings, write_run_record
from ..tokenizer import ensure_chat_template, ensure_pad_token
from ..zero import count_parameters, rank_and_world
from .checkpoints import (EXIT_STALE_CHECKPOINT, INCOMPLETE_PREFIX, StaleCheckpoint, check_complete, latest_complete_checkpoint,
                          remove_incomplete)
from .config import ConfigError, check_quantization, check_run_flags, parse_train_args, training_dtype_name, uses_deepspeed, zero_stage
from .faults import Diverged, StepGuard, StopSignals, check_not_diverged_before, exit_diverged, exit_stopped_by_signal
from .packing import PackingError, check_packing
from .preflight import check_push_to_hub, preflight
from .report import plot_loss_curve, write_run_card
from .tokenize import tokenize_examples
from .trainer import LorasymSFTTrainer, RestoreFrozenFactors, StopAfterSteps, check_checkpoint_settings

logger = logging.getLogger("asymllm.train")


class ModelLoadError(RuntimeError):
    """--model names nothing that can be loaded."""


# Mistakes a user can make in flags, files or data: one clear line, no traceback.
USER_ERRORS = (AttentionError, QuantizationError, RecipeError, DataError, TargetError, InitError, AdapterFileError, PackingError, ModelLoadError, ConfigError)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        bootstrapped, bootstrap_line = bootstrap_cpu_distributed(uses_deepspeed(argv))
        adapter_args, model_args, data_args, sft_config = parse_train_args(argv, use_configured_state=bootstrapped)
        logger.info(bootstrap_line)
        if restart_store_warning():
            logger.warning(restart_store_warning())
        result = train(adapter_args, model_args, data_args, sft_config)
    except StaleCheckpoint as error:  # its own exit code: a sweep starts such a cell afresh, logging this one line
        print(f"asymllm train: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STALE_CHECKPOINT) from None
    except USER_ERRORS as error:
        raise SystemExit(f"asymllm train: error: {error}") from None
    # Only a run that ended on every rank together meets the others at the final barrier: one
    # that failed on some ranks only would wait there forever for ranks in another collective.
    finish_distributed()
    return result


def train(adapter_args, model_args, data_args, sft_config) -> dict:
    recipe = check_run_flags(adapter_args, data_args, sft_config)  # before anything loads: a typo costs no model load
    quant = check_quantization(model_args, sft_config)
    if sft_config.disable_tqdm:
        disable_library_progress_bars()
    sft_config.output_dir = sft_config.output_dir.format(recipe=recipe.name, lora_r=adapter_args.lora_r, seed=sft_config.seed)
    check_reporters(sft_config.report_to)
    check_push_to_hub(sft_config.push_to_hub, sft_config.hub_model_id, sft_config.hub_token)
    check_not_diverged_before(sft_config.output_dir)  # a torchrun restart would diverge again
    # Before anything is loaded: a refusal should not cost a model load.
    resume = resolve_resume(sft_config.resume_from_checkpoint, sft_config.output_dir, data_args.overwrite_output_dir)
    model_path = check_model_path(resolve_model(model_args.model))
    settings = training_settings(adapter_args, model_args, data_args, sft_config, recipe, model_path, data_sources(data_args))
    if resume:
        check_checkpoint_settings(resume, run_settings(adapter_args, recipe, sft_config.seed), training=settings)
    attn = model_attention(model_path, model_args.attn_implementation)  # an impossible --attn_implementation costs nothing
    earlier = [] if sft_config.resume_from_checkpoint else check_fresh_output_dir(sft_config.output_dir, data_args.overwrite_output_dir)
    preflight(sft_config.output_dir, model_path, adapter_args, recipe, agreed_settings(adapter_args, model_path, data_args,
                                                                                       sft_config, recipe, resume))
    tokenizer = load_tokenizer(model_path, data_args.chat_template)  # a template it cannot take is refused here
    remove_earlier_run(sft_config.output_dir, earlier)  # check first, delete last: a refused run costs no earlier one
    train_set, eval_set = load_data(data_args, tokenizer, sft_config)
    if getattr(sft_config, "precision_note", ""):
        logger.info(sft_config.precision_note)
    logger.info(check_packing(sft_config.packing, attn, strategy=sft_config.packing_strategy, padding_free=sft_config.padding_free))
    model = load_model(model_path, sft_config, attn, tokenizer, quant)
    init_kwargs, sft_config.model_init_kwargs = sft_config.model_init_kwargs, None  # used; TRL, given a model, would warn
    model = get_lorasym_model(model, LoRASYMConfig(
        recipe=recipe, r=adapter_args.lora_r, lora_alpha=adapter_args.lora_alpha, lora_dropout=adapter_args.lora_dropout,
        target_modules=adapter_args.target_modules, use_rslora=adapter_args.use_rslora, seed=sft_config.seed,
        fuse_frozen_a=adapter_args.fused_frozen_a))
    logger.info("target modules%s: %s", " (all-linear)" if is_all_linear(adapter_args.target_modules) else "",
                ", ".join(sorted(model.peft_config["default"].target_modules)))
    trainable, total = count_parameters(model)
    logger.info("recipe %s; trainable parameters %s of %s (%.3f%%)", describe(recipe), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    restore = None
    if resume:  # the default or a regex --target_modules is known only now, as peft resolved it
        check_checkpoint_settings(resume, {"--target_modules": model.peft_config["default"].target_modules})
        restore = RestoreFrozenFactors(model, resume, recipe)  # compares before trainer.train() loads the checkpoint
    signals = StopSignals()
    guard = StepGuard(signals, max_bad_steps=sft_config.max_bad_steps)
    trainer = LorasymSFTTrainer(model=model, args=sft_config, train_dataset=train_set, eval_dataset=eval_set,
                                processing_class=tokenizer, guard=guard)
    sft_config.model_init_kwargs = init_kwargs  # as given, for the run record
    if restore:  # added after the Trainer's own callbacks (and any a subclass adds), so it has the last word
        trainer.add_callback(restore)
    if data_args.stop_after_steps:
        trainer.add_callback(StopAfterSteps(data_args.stop_after_steps))
    write_run_record(sft_config.output_dir, adapter_args, model_args, data_args, sft_config, recipe, model_path,
                     resumed_from=resume, training_settings=settings, chat_template=template_record(tokenizer),
                     quantization=quant.record(training_dtype_name(sft_config)), adapter_path=model.lorasym_adapter_path)
    signals.install()  # from here a SIGTERM/SIGUSR1 means "checkpoint and exit", not "die now"
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Diverged as where:
        exit_diverged(str(where), sft_config.output_dir, sft_config.max_bad_steps)
    finally:
        signals.uninstall()
    if guard.stop_signal is not None and trainer.state.global_step < trainer.state.max_steps:
        trainer.save_stop_checkpoint()
        exit_stopped_by_signal(guard.stop_signal, trainer.state, sft_config.output_dir)
    if guard.skipped:
        logger.warning("%d step(s) had a non-finite loss and were skipped: %s", len(guard.skipped), guard.skipped)
    if data_args.stop_after_steps and trainer.state.global_step < trainer.state.max_steps:
        logger.info("stopped at step %d as asked (--stop_after_steps)", trainer.state.global_step)
        return {"stopped_at": trainer.state.global_step, "output_dir": sft_config.output_dir}
    return finish(trainer, sft_config, eval_set, result, adapter_args.save_frozen_as)


REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",), "comet_ml": ("comet_ml",)}


def check_reporters(report_to) -> None:
    """`--report_to X` whose package is missing fails deep inside transformers; say it here."""
    import importlib.util

    for name in [report_to] if isinstance(report_to, str) else (report_to or []):
        modules = REPORTERS.get(name)
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"--report_to {name}: the {modules[0]!r} package is not installed (pip install {modules[0]})")


def load_tokenizer(model_path: str, chat_template: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"--model {model_path}: cannot load its tokenizer ({first})") from None
    tokenizer.asymllm_template_line = ensure_chat_template(tokenizer, chat_template)  # the run record says it too
    logger.info(tokenizer.asymllm_template_line)
    logger.info(ensure_pad_token(tokenizer))
    return tokenizer


def template_record(tokenizer) -> dict:
    """The chat template this run renders its data with, as the run record keeps it."""
    text = tokenizer.chat_template
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chosen": getattr(tokenizer, "asymllm_template_line", None)}


def data_sources(data_args) -> tuple[str, str | None]:
    """(training data, held-out data or None) as the flags name them, the built-in sets by default."""
    return data_args.dataset or BUILTIN_DATASET, data_args.eval_dataset or (BUILTIN_HELDOUT if data_args.dataset is None else None)


def load_data(data_args, tokenizer, sft_config):
    """Tokenized train and held-out sets (input_ids + labels), with every skip reported."""
    source, eval_source = data_sources(data_args)
    if eval_source:
        check_heldout_is_not_training_data(data_args, source, eval_source)
    examples, skips = load_examples(source, split=data_args.dataset_split)
    logger.info("data: %d examples; %s", len(examples), skips.summary())
    held_out = []
    if eval_source:
        held_out, eval_skips = load_examples(eval_source, split=data_args.eval_split)
        logger.info("held-out: %d examples; %s", len(held_out), eval_skips.summary())
    elif data_args.eval_fraction > 0:
        examples, held_out = split_heldout(examples, data_args.eval_fraction, seed=sft_config.seed)
        logger.info("held out %d of the examples (--eval_fraction %s)", len(held_out), data_args.eval_fraction)
    cut = {"max_length": sft_config.max_length, "truncation_mode": sft_config.truncation_mode,
           "train_on_inputs": data_args.train_on_inputs}
    train_set, report = tokenize_examples(examples, tokenizer, **cut)
    logger.info("train tokens: %s", report.summary())
    eval_set = None
    if held_out:
        eval_set, eval_report = tokenize_examples(held_out, tokenizer, **cut)
        logger.info("held-out tokens: %s", eval_report.summary())
    return train_set, eval_set


def check_heldout_is_not_training_data(data_args, source: str, eval_source: str) -> None:
    """A held-out loss on the training examples looks like a fine result and means nothing."""
    if source_identity(eval_source) != source_identity(source):
        return
    train_split = split_read(source, data_args.dataset_split)
    if train_split is None:
        raise ConfigError(f"--eval_dataset {eval_source} is the --dataset file, and it has no named splits, so it would hold out "
                          "the training examples themselves; use --eval_fraction to hold out part of it, or give another --eval_dataset")
    if split_read(eval_source, data_args.eval_split) == train_split:
        raise ConfigError(f"--eval_dataset {eval_source} --eval_split {data_args.eval_split} is the training data "
                          f"(--dataset {source} --dataset_split {data_args.dataset_split}); choose another --eval_split "
                          "(default: test) or use --eval_fraction")


def check_model_path(model_path: str) -> str:
    """A path-like --model that does not exist is a typo, not a hub name."""
    looks_local = model_path.startswith(("/", "./", "../", "~")) or os.path.sep + os.path.sep in model_path
    if looks_local and not os.path.isdir(os.path.expanduser(model_path)):
        raise ModelLoadError(f"--model {model_path}: no such folder")
    return os.path.expanduser(model_path)


def load_model(model_path: str, sft_config, attn: str, tokenizer, quant=None):
    dtype = torch.bfloat16 if sft_config.bf16 else (torch.float16 if sft_config.fp16 else torch.float32)
    init_kwargs = dict(sft_config.model_init_kwargs or {})  # --model_init_kwargs: what TRL would pass to from_pretrained
    if quant is not None and quant.enabled:
        init_kwargs.update(quant.load_kwargs(default_compute=training_dtype_name(sft_config)))
        if zero_stage(sft_config.deepspeed) == 3:  # ZeRO-3 places the partitions itself
            init_kwargs.pop("device_map")
        logger.info("base quantized while it loads: %s; the adapter trains against its dequantized weights, and norms "
                    "and the output head stay in %s (peft's prepare_model_for_kbit_training would cast them to fp32, "
                    "doubling their memory on a bf16 run)", quant.describe(training_dtype_name(sft_config)),
                    str(dtype).removeprefix("torch."))
    logger.info("model %s in %s, attention %s%s", model_path, str(dtype).removeprefix("torch."), attn,
                f", from_pretrained({', '.join(f'{k}={v!r}' for k, v in sft_config.model_init_kwargs.items())})"
                if sft_config.model_init_kwargs else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn, **init_kwargs)
    except TypeError as error:  # a keyword from_pretrained or the model class does not take
        raise ModelLoadError(f"--model_init_kwargs {init_kwargs}: {error}") from None
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"--model {model_path}: cannot load ({first}); give a local folder or a hub name that is cached or reachable") from None
    if quant is not None and quant.enabled:
        note = check_layers_quantized(model, quant.bits)  # QuantizationError: a user error, one line
        if note:
            logger.warning(note)
        released = release_checkpoint_memory(model)
        if released:
            logger.info("quantized base loaded: %.0f MiB of checkpoint pages and freed copies returned to the system", released)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if sft_config.activation_checkpointing:
        model.enable_input_require_grads()  # a frozen base gives checkpointed blocks no grad input otherwise
    return model


def resolve_resume(value: str | None, output_dir: str, overwrite: bool = False) -> str | None:
    if not value:
        return None
    if overwrite:
        raise ConfigError(f"--overwrite_output_dir and --resume_from_checkpoint {value}: one starts {output_dir} afresh, "
                          "the other continues it; give one of them")
    if value == "auto":
        try:
            last = latest_complete_checkpoint(output_dir)
        except ConfigError as error:
            raise ConfigError(f"--resume_from_checkpoint auto: {error}") from None
        logger.info("resume auto: %s", f"continuing from {last}" if last else f"no checkpoint in {output_dir}; starting from scratch")
        return last
    if not os.path.isdir(value):
        raise ConfigError(f"--resume_from_checkpoint {value}: no such checkpoint folder (use 'auto' to take the latest in --output_dir)")
    try:
        check_complete(value)
    except ConfigError as error:
        raise ConfigError(f"--resume_from_checkpoint {value}: {error}") from None
    return value


def run_settings(adapter_args, recipe: Recipe, seed: int) -> dict:
    """What a checkpoint must have been made with for this run to continue it, by flag. The
    target set only when given as a list; otherwise it is checked once peft has resolved it."""
    targets = adapter_args.target_modules
    explicit = isinstance(targets, list) and not is_all_linear(targets)
    return {"--recipe": recipe.name, "--seed": seed, "--lora_r": adapter_args.lora_r, "--lora_alpha": adapter_args.lora_alpha,
            "--use_rslora": adapter_args.use_rslora, "--target_modules": targets if explicit else None}


def agreed_settings(adapter_args, model_path: str, data_args, sft_config, recipe: Recipe, resume: str | None) -> dict:
    """What every rank must share, by flag: ranks that differ in any of these would train
    different things, or call collectives a different number of times and hang."""
    return {**run_settings(adapter_args, recipe, sft_config.seed), "--target_modules": adapter_args.target_modules,
            "--model": model_path, "--dataset": data_args.dataset, "--resume_from_checkpoint": resume,
            "--output_dir": sft_config.output_dir, **{f"--{name}": getattr(sft_config, name) for name in (
                "max_bad_steps", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                "learning_rate", "max_length", "save_strategy", "save_steps", "deepspeed", "packing")}}


def earlier_run_outputs(output_dir: str) -> list[str]:
    """The adapter/, checkpoint-* and incomplete-checkpoint-* folders an earlier run left in output_dir."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if os.path.isdir(os.path.join(output_dir, name)) and (
        name == "adapter" or name.startswith((f"{PREFIX_CHECKPOINT_DIR}-", f"{INCOMPLETE_PREFIX}{PREFIX_CHECKPOINT_DIR}-"))))


def check_fresh_output_dir(output_dir: str, overwrite: bool) -> list[str]:
    """A fresh run never mixes with an earlier one: refused, or (asked for) the earlier one's
    folders returned, for remove_earlier_run once every check has passed. Left in place, a stale
    checkpoint-N would be what a later `--resume_from_checkpoint auto` takes, and save_total_limit
    would rotate out the new run's."""
    earlier = earlier_run_outputs(output_dir)
    if earlier and not overwrite:
        raise ConfigError(f"--output_dir {output_dir} already holds an earlier run ({', '.join(f'{n}/' for n in earlier)}); pass "
                          "--overwrite_output_dir to replace it, --resume_from_checkpoint auto to continue it, or choose another --output_dir")
    return earlier


def remove_earlier_run(output_dir: str, earlier: list[str]) -> None:
    """--overwrite_output_dir, after the model, flags and preflight checks and before anything is written there."""
    if earlier and int(os.environ.get("RANK", "0")) == 0:  # one rank deletes
        for name in earlier:
            shutil.rmtree(os.path.join(output_dir, name))
        logger.warning("--overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(f"{n}/" for n in earlier), output_dir)


def finish(trainer, sft_config, eval_set, result, frozen_as: str = "tensor") -> dict:
    final_dir = os.path.join(sft_config.output_dir, "adapter")
    trainer.save_model(final_dir, frozen_as=frozen_as)  # compact: logged by adapters/compact.py
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "trainable_params": count_parameters(trainer.model)[0]}
    if eval_set is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics["first_logged_loss"], metrics["last_logged_loss"] = (logged[0], logged[-1]) if logged else (None, None)
    if rank_and_world()[0] == 0:
        curve = plot_loss_curve(trainer.state.log_history, os.path.join(sft_config.output_dir, "loss_curve.png"))
        with open(os.path.join(sft_config.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        card = write_run_card(sft_config.output_dir)
        remove_incomplete(sft_config.output_dir, up_to_step=None, because=f"the run finished (its adapter: {final_dir})")
        print_next_steps(sft_config.output_dir, final_dir, metrics, written=[p for p in (curve, card) if p])
    return {**metrics, "adapter_dir": final_dir, "output_dir": sft_config.output_dir}


def print_next_steps(output_dir: str, adapter_dir: str, metrics: dict, written: list[str] = ()) -> None:
    """The end-of-run summary; only files that exist are named (`written`: the optional ones)."""
    first, last = metrics["first_logged_loss"], metrics["last_logged_loss"]
    record = os.path.join(output_dir, "asymllm_run.json")
    optional = {os.path.basename(p): p for p in written if os.path.isfile(p)}
    lines = [
        "",
        f"done: {metrics['steps']} steps; train loss {first:.4f} (first log) -> {last:.4f} (last log)" if first is not None
        else f"done: {metrics['steps']} steps; train loss {metrics['train_loss']:.4f} (mean)",
        f"held-out loss: {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else None,
        f"adapter:    {adapter_dir}   (peft format; frozen factors included; recipe in lorasym.json)",
        f"loss curve: {optional['loss_curve.png']}" if "loss_curve.png" in optional else None,
        f"model card: {optional['README.md']}" if "README.md" in optional else None,
        f"run record: {record}" if os.path.isfile(record) else None,
        "next:",
        f"  asymllm chat --adapter {adapter_dir}    # talk to it (--prompt \"...\" for one reply)",
        f"  asymllm eval alpaca --adapter {adapter_dir} --max_new_tokens 64    # held-out exact match, health figures",
        f"  asymllm eval mmlu --adapter {adapter_dir} --limit 10    # 10 questions per subject; drop --limit for all",
        f"  asymllm export --adapter {adapter_dir} --output {os.path.join(output_dir, 'merged')}",
    ]
    print("\n".join(line for line in lines if line is not None), flush=True)


def disable_library_progress_bars() -> None:
    """Without a terminal (output redirected to a file), the bars of model loading and dataset
    maps become ever-growing lines; the Trainer's progress is then PlainProgress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format=f"[asymllm rank{rank}] %(message)s", level=logging.INFO if rank == 0 else logging.WARNING)


if __name__ == "__main__":
    main()
