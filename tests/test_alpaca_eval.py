"""`asymllm eval alpaca`: generation, resume, health figures, exact match, judges, win rates.

Everything runs on a tiny random model (asymllm.tiny) and a six-instruction fixture; the HTTP
judge is a stub OpenAI-compatible server on 127.0.0.1, started and stopped by the test (the
thing under test is our client and aggregation, not a remote model).
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import math
import random
import re
import sys
import threading
import types

import pytest

from asymllm.training.tokenize import IGNORE_INDEX, encode_example
from asymllm.data import Example
from asymllm.evaluation import alpaca
from asymllm.evaluation.metrics import exact_match
from asymllm.evaluation.generation import GenerationSettings, encode_prompt, generate, prepare_tokenizer
from asymllm.evaluation.metrics import health_figures, repetition_rate
from asymllm.evaluation.instructions import load_instructions
from asymllm.evaluation.judge import HTTPJudge, JudgeError, LocalJudge, judge_pairs, judge_prompt, model_goes_first, preference
from asymllm.evaluation.winrate import length_controlled_win_rate, win_rate

FIXTURE = [
    {"instruction": "Reverse the order of the words: cat dog bird", "output": "bird dog cat", "dataset": "reverse"},
    {"instruction": "What is 2 + 3?", "output": "5", "dataset": "add"},
    {"instruction": "Write a haiku about autumn.", "output": "Leaves drift on cold wind\nthe river carries red gold\nsilence after rain", "dataset": "open"},
    {"instruction": "Give me a name for a coffee shop.", "output": "The Daily Grind", "dataset": "open"},
    {"instruction": "What is 12 + 30?", "output": "42", "dataset": "add"},
    {"instruction": "Reverse the order of the words: sun moon star", "output": "star moon sun", "dataset": "reverse"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from asymllm.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def fixture_file(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(FIXTURE))
    return str(path)


def run_alpaca(*flags) -> dict:
    return alpaca.main(["--no_progress", *map(str, flags)])


# --- generation ------------------------------------------------------------------------------


def test_generation_writes_alpaca_eval_json(tiny_dir, fixture_file, tmp_path):
    out = tmp_path / "run"
    summary = run_alpaca("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 6, "--batch_size", 4,
                         "--output_dir", out, "--generator_name", "tiny-run")
    records = json.loads((out / "model_outputs.json").read_text())
    assert [r["instruction"] for r in records] == [f["instruction"] for f in FIXTURE]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in records)
    assert all(isinstance(r["output"], str) and r["generator"] == "tiny-run" for r in records)
    assert [r["dataset"] for r in records] == [f["dataset"] for f in FIXTURE]
    saved = json.loads((out / "alpaca_summary.json").read_text())
    assert saved["n"] == 6 and saved["judge"] is None
    assert set(saved["health"]) >= {"mean_length_chars", "eos_share", "repetition_rate"}
    assert saved["exact_match"]["n"] == 6 and set(saved["exact_match"]["by_group"]) == {"add", "open", "reverse"}
    assert all(0 < g["n_tokens"] <= 6 or g["stopped"] for g in map(json.loads, (out / "generations.jsonl").read_text().splitlines()))
    assert summary["generator"] == "tiny-run" and (out / "alpaca_summary.md").exists()


def test_prompts_match_training_and_batching_does_not_change_greedy_outputs(tiny_dir, fixture_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prepare_tokenizer(tokenizer)
    assert tokenizer.padding_side == "left"
    items = load_instructions(fixture_file)
    for item in items:  # the prompt is exactly the start of the training sequence, all of it without loss
        ids, labels = encode_example(Example(item.messages + [{"role": "assistant", "content": item.reference}], "x"), tokenizer)[:2]
        prompt = encode_prompt(tokenizer, item.messages)
        assert ids[:len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[:len(prompt)])
        assert labels[len(prompt)] != IGNORE_INDEX
    settings = GenerationSettings(max_new_tokens=8, batch_size=6)
    batched = {r["key"]: r for batch in generate(model, tokenizer, items, settings) for r in batch}
    settings.batch_size = 1
    alone = {r["key"]: r for batch in generate(model, tokenizer, items, settings) for r in batch}
    assert batched == alone  # left padding: padded rows generate what they generate alone


def test_a_reply_ends_at_every_end_token_of_the_generation_config(tiny_dir, fixture_file):
    """Instruct models list several end tokens (Gemma's <end_of_turn>, Phi-3's <|end|>); passing
    eos_token_id=tokenizer.eos_token_id replaced that list, and replies ran to --max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    items = load_instructions(fixture_file)[:1]
    settings = GenerationSettings(max_new_tokens=12, batch_size=1)
    free = next(generate(model, tokenizer, items, settings))[0]
    ids = tokenizer(free["output"], add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token first seen mid-reply
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[cut]]
    ended = next(generate(model, tokenizer, items, settings))[0]
    assert ended["stopped"] and ended["n_tokens"] == cut
    assert ended["output"] == tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def test_resume_generates_only_what_is_missing(tiny_dir, fixture_file, tmp_path):
    out = tmp_path / "run"
    common = ("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 5, "--output_dir", out)
    first = run_alpaca(*common, "--limit", 3)
    assert first["n"] == 3 and first["n_generated_now"] == 3
    lines_before = (out / "generations.jsonl").read_text().splitlines()
    (out / "generations.jsonl").open("a").write('{"key": "torn li')  # a run killed mid-write
    second = run_alpaca(*common)
    assert second["n"] == 6 and second["n_generated_now"] == 3
    lines_after = (out / "generations.jsonl").read_text().splitlines()
    assert lines_after[:3] == lines_before and len(lines_after) == 6  # the first three untouched, the torn line gone
    assert len(json.loads((out / "model_outputs.json").read_text())) == 6
    assert run_alpaca(*common)["n_generated_now"] == 0  # nothing left: the model is not even loaded
    with pytest.raises(SystemExit, match="max_new_tokens: 5 then, 9 now"):
        run_alpaca("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 9, "--output_dir", out)
    assert run_alpaca("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 9, "--output_dir", out,
                      "--overwrite", "--limit", 2)["n_generated_now"] == 2


def _outputs(out_dir) -> list[str]:
    return [r["output"] for r in json.loads((out_dir / "model_outputs.json").read_text())]


def test_another_model_or_adapter_in_the_same_folder_is_refused_not_reused(fixture_file, tmp_path):
    """Results are bound to a fingerprint of what made them, not to the paths it came from."""
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, get_lorasym_model, save_adapter
    from asymllm.tiny import randomize_lora_B, save_tiny_model

    model = save_tiny_model(tmp_path / "model", seed=0)
    common = ("--model", model, "--data", fixture_file, "--max_new_tokens", 6, "--output_dir", tmp_path / "eval")
    first = run_alpaca(*common)
    saved = json.loads((tmp_path / "eval" / "alpaca_summary.json").read_text())
    assert saved["fingerprint"] == first["fingerprint"] and "config.json" in saved["fingerprint"]["model"]["files"]
    save_tiny_model(model, seed=1)  # other weights in the same folder
    with pytest.raises(SystemExit, match=r"asymllm eval alpaca: error: .*another model .*model\.safetensors.*--overwrite"):
        run_alpaca(*common)
    replaced = run_alpaca(*common, "--overwrite")
    assert replaced["n_generated_now"] == 6 and replaced["fingerprint"]["id"] != first["fingerprint"]["id"]

    adapter = str(tmp_path / "run" / "adapter")
    for seed in (0, 1):  # the second adapter is trained into the first one's folder
        peft_model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(model), LoRASYMConfig(r=4, seed=1))
        randomize_lora_B(peft_model, std=2.0, seed=seed)
        save_adapter(peft_model, adapter)
        if seed == 0:
            adapted = run_alpaca(*common[:-1], tmp_path / "adapted", "--adapter", adapter)
    with pytest.raises(SystemExit, match=r"another adapter .*adapter_model\.safetensors"):
        run_alpaca(*common[:-1], tmp_path / "adapted", "--adapter", adapter)
    again = run_alpaca(*common[:-1], tmp_path / "adapted", "--adapter", adapter, "--overwrite")
    fresh = run_alpaca(*common[:-1], tmp_path / "fresh", "--adapter", adapter)
    assert again["fingerprint"]["id"] == fresh["fingerprint"]["id"] != adapted["fingerprint"]["id"]
    assert _outputs(tmp_path / "adapted") == _outputs(tmp_path / "fresh")


def test_another_judge_in_the_same_folder_is_refused_not_reused(tiny_dir, fixture_file, tmp_path):
    from asymllm.tiny import save_tiny_model

    judge = save_tiny_model(tmp_path / "judge", seed=0)
    flags = ("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 4, "--output_dir", tmp_path / "eval",
             "--judge", judge)
    first = run_alpaca(*flags)["judge"]
    save_tiny_model(judge, seed=1)
    with pytest.raises(SystemExit, match=r"judgments-.*another judge .*model\.safetensors.*--overwrite"):
        run_alpaca(*flags)
    again = run_alpaca(*flags, "--overwrite")["judge"]
    fresh = run_alpaca(*flags[:-3], tmp_path / "fresh", "--judge", judge)["judge"]
    assert again["win_rate"] == fresh["win_rate"] != first["win_rate"]


def test_default_data_is_the_builtin_heldout_set(tiny_dir, tmp_path):
    from asymllm.data import BUILTIN_HELDOUT

    items = load_instructions(None)
    with open(BUILTIN_HELDOUT) as f:
        records = [json.loads(line) for line in f]
    assert len(items) == len(records) and [i.reference for i in items] == [r["output"] for r in records]
    assert items[0].instruction == f"{records[0]['instruction']}\n\n{records[0]['input']}"  # joined as in training
    assert {i.group for i in items} == {r["task"] for r in records}
    summary = run_alpaca("--model", tiny_dir, "--limit", 2, "--max_new_tokens", 2, "--output_dir", tmp_path / "b")
    assert summary["data"] == "built-in held-out set" and summary["exact_match"]["n"] == 2


def test_bare_instructions_have_no_references(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text('{"instruction": "Say hi."}\n{"instruction": "Add.", "input": "2 3"}\n')
    items = load_instructions(str(path))
    assert [i.reference for i in items] == [None, None] and items[1].instruction == "Add.\n\n2 3"
    assert exact_match(["hi", "5"], [None, None], [None, None]) is None


# --- health figures and exact match ---------------------------------------------------------


def test_health_figures_on_crafted_outputs():
    loop = "the answer is five " * 10  # 40 words, 37 4-grams of which 4 distinct
    assert repetition_rate(loop) == pytest.approx(1 - 4 / 37)
    assert repetition_rate("one two three four five six") == 0.0
    assert repetition_rate("too short") == 0.0
    figures = health_figures(["abcd", "ab", loop], n_tokens=[4, 2, 40], stopped=[True, True, False])
    assert figures["n"] == 3
    assert figures["eos_share"] == pytest.approx(2 / 3) and figures["truncated_share"] == pytest.approx(1 / 3)
    assert figures["mean_length_chars"] == pytest.approx((4 + 2 + len(loop)) / 3)
    assert figures["mean_length_tokens"] == pytest.approx(46 / 3)
    assert figures["repetition_rate"] == pytest.approx((1 - 4 / 37) / 3)


def test_exact_match_overall_and_per_task():
    result = exact_match([" 5\n", "bird dog cat", "6", "x"], ["5", "bird dog cat ", "7", None], ["add", "reverse", "add", "open"])
    assert result["accuracy"] == pytest.approx(2 / 3) and result["n"] == 3 and result["n_correct"] == 2
    assert result["by_group"] == {"add": {"accuracy": 0.5, "n": 2}, "reverse": {"accuracy": 1.0, "n": 1}}


# --- judges ----------------------------------------------------------------------------------


def _pairs(n: int, rng: random.Random, model_len=None, ref_len=None):
    pairs = []
    for k in range(n):
        m = model_len(k) if model_len else rng.randint(5, 40)
        r = ref_len(k) if ref_len else rng.randint(5, 40)
        pairs.append({"key": f"k{k}", "instruction": f"instruction {k}", "output": "m" * m, "reference": "r" * r})
    return pairs


def _outputs_in_prompt(prompt: str) -> tuple[str, str]:
    match = re.search(r"## Output \(a\)\n(.*)\n\n## Output \(b\)\n(.*)\n\n## Verdict", prompt, re.S)
    return match.group(1), match.group(2)


def test_preference_convention_and_order():
    assert preference(0.0, -math.inf, model_first=True) == 2.0  # the model is (a) and (a) wins
    assert preference(0.0, -math.inf, model_first=False) == 1.0  # the reference is (a) and (a) wins
    assert preference(math.log(0.25), math.log(0.75), model_first=False) == pytest.approx(1.75)
    assert math.isnan(preference(-math.inf, -math.inf, True))
    firsts = [model_goes_first(0, f"k{k}") for k in range(400)]
    assert 150 < sum(firsts) < 250 and firsts == [model_goes_first(0, f"k{k}") for k in range(400)]


def tiny_gpt2(tokenizer):
    """A GPT-2 from a config: learned absolute position embeddings, unlike the tiny Llama's RoPE."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).float().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_judge_batched_equals_alone(tiny_dir, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = tiny_gpt2(tokenizer) if arch == "gpt2" else AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    judge = LocalJudge(model, tokenizer, arch)
    assert len(set(judge.label_ids)) == 2
    pairs = _pairs(5, random.Random(0))
    lengths = [len(tokenizer(judge_prompt(p["instruction"], p["output"], p["reference"]))["input_ids"]) for p in pairs]
    assert len(set(lengths)) > 1  # so the batch is left-padded: every shorter row is shifted right
    preferences = judge_pairs(judge, pairs, seed=0, batch_size=5, progress=False)
    assert all(1 <= p <= 2 for p in preferences.values()) and len(preferences) == 5
    for pair in pairs:  # each pair judged alone (no padding) gives its batched preference
        alone = judge_pairs(judge, [pair], seed=0, batch_size=1, progress=False)
        assert alone[pair["key"]] == pytest.approx(preferences[pair["key"]], abs=1e-4), pair["key"]


def test_local_judge_through_the_cli_and_rerun_reuses_judgments(tiny_dir, fixture_file, tmp_path):
    out = tmp_path / "run"
    flags = ("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 4, "--output_dir", out, "--judge", tiny_dir)
    judged = run_alpaca(*flags)["judge"]
    assert judged["n_total"] == 6 and 0 <= judged["win_rate"] <= 100 and judged["reference"] == "dataset references"
    annotations = json.loads((out / "annotations.json").read_text())
    assert [a["output_1"] for a in annotations] == [f["output"] for f in FIXTURE]
    again = run_alpaca(*flags)["judge"]  # all judged already: the judge is not loaded, figures identical
    assert again["win_rate"] == judged["win_rate"]


class _StubOpenAI(http.server.BaseHTTPRequestHandler):
    """/v1/models and /v1/completions. Deterministic logprobs from the prompt: the longer output
    is preferred, plus a position bias towards (a) so that a wrong order mapping would show."""

    requests: list = []
    with_logprobs = True

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply({"object": "list", "data": [{"id": "stub-judge", "object": "model"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(request)
        choices = []
        for index, prompt in enumerate(request["prompt"]):
            a, b = _outputs_in_prompt(prompt)
            logprobs = {"tokens": ["a"], "token_logprobs": [-0.1],
                        "top_logprobs": [{"a": stub_logprob(a, b, True), " b": stub_logprob(a, b, False), "x": -9.0}]}
            choices.append({"index": index, "text": "a", "logprobs": logprobs if self.with_logprobs else None})
        self._reply({"object": "text_completion", "model": request["model"], "choices": choices[::-1]})  # any order


def stub_logprob(a: str, b: str, for_a: bool) -> float:
    return (len(a) / 20 + 0.3) if for_a else len(b) / 20


@pytest.fixture
def stub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubOpenAI)
    _StubOpenAI.requests, _StubOpenAI.with_logprobs = [], True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, server.shutdown)  # never outlives a hung test
    watchdog.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_judge_against_a_stub_server(tiny_dir, fixture_file, tmp_path, stub_server):
    out = tmp_path / "run"
    judged = run_alpaca("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 6, "--output_dir", out,
                        "--judge", stub_server, "--judge_model", "stub-judge", "--judge_batch_size", 4)["judge"]
    sent = _StubOpenAI.requests
    assert [len(r["prompt"]) for r in sent] == [4, 2]
    assert all(r["model"] == "stub-judge" and r["max_tokens"] == 1 and r["logprobs"] >= 2 for r in sent)
    # expected preferences, computed here from the same rule and the documented order
    items = load_instructions(fixture_file)
    annotations = json.loads((out / "annotations.json").read_text())
    expected = []
    for item, annotation in zip(items, annotations):
        model, reference = annotation["output_2"], annotation["output_1"]
        first = model_goes_first(0, item.key)
        a, b = (model, reference) if first else (reference, model)
        la, lb = stub_logprob(a, b, True), stub_logprob(a, b, False)
        p_a = math.exp(la) / (math.exp(la) + math.exp(lb))
        expected.append(1 + (p_a if first else 1 - p_a))
    assert [a["preference"] for a in annotations] == pytest.approx(expected)
    assert judged["win_rate"] == pytest.approx(win_rate(expected)["win_rate"])
    assert judged["n_unscored"] == 0 and judged["judge"] == f"{stub_server} (stub-judge)"

    # a second run judged against the first run's outputs instead of the references
    other = run_alpaca("--model", tiny_dir, "--data", fixture_file, "--max_new_tokens", 3, "--output_dir", tmp_path / "short",
                       "--judge", stub_server, "--reference_outputs", out / "model_outputs.json")["judge"]
    versus = json.loads((tmp_path / "short" / "annotations.json").read_text())
    first_outputs = json.loads((out / "model_outputs.json").read_text())
    assert [a["output_1"] for a in versus] == [r["output"] for r in first_outputs]
    assert {a["generator_1"] for a in versus} == {"model"} and other["n_total"] == 6  # tiny_dir's folder name
    assert other["reference"].endswith("model_outputs.json")


def test_http_judge_without_logprobs_is_a_clear_error(stub_server):
    _StubOpenAI.with_logprobs = False
    judge = HTTPJudge(stub_server)  # the model name comes from /v1/models
    assert judge.model == "stub-judge"
    with pytest.raises(JudgeError, match="no logprobs"):
        judge(["## Output (a)\nx\n\n## Output (b)\ny\n\n## Verdict"])


def test_http_judge_unreachable_is_a_clear_error():
    with pytest.raises(JudgeError, match="cannot reach"):
        HTTPJudge("http://127.0.0.1:9/v1", model="m", retries=0)(["p"])


# --- win rates -------------------------------------------------------------------------------


def _alpaca_eval_metrics(monkeypatch):
    """alpaca_eval.metrics, or skip when alpaca_eval is not installed. alpaca_eval 0.6.6 imports
    pkg_resources at module level (gone from setuptools >= 81) for two version helpers the metrics
    never call; stand in for it with the same functions from packaging and importlib.metadata."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        monkeypatch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(
            parse_version=parse, get_distribution=lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))))
    return pytest.importorskip("alpaca_eval.metrics")


def test_win_rate_equals_alpaca_eval_get_winrate(monkeypatch):
    metrics = _alpaca_eval_metrics(monkeypatch)
    rng = random.Random(0)
    preferences = [1 + rng.random() for _ in range(60)] + [1.0, 2.0, 2.0, 1.5, 0, math.nan, 1.75, 1.25]
    ours, theirs = win_rate(preferences), metrics.get_winrate([{"preference": p} for p in preferences])
    for key, value in ours.items():
        assert float(theirs[key]) == pytest.approx(value), key


def test_length_controlled_win_rate_removes_a_length_bias():
    """A judge that only likes length: the raw win rate is high because the model writes longer
    outputs; predicted at equal lengths, the LC win rate is near 50%."""
    rng = random.Random(1)
    pairs = _pairs(200, rng, model_len=lambda k: rng.randint(40, 260), ref_len=lambda k: rng.randint(40, 120))

    def length_loving_judge(prompts):
        out = []
        for prompt in prompts:
            a, b = _outputs_in_prompt(prompt)
            out.append(((len(a) - len(b)) / 40, 0.0))
        return out

    preferences = judge_pairs(length_loving_judge, pairs, seed=0, progress=False)
    values = [preferences[p["key"]] for p in pairs]
    raw = win_rate(values)["win_rate"]
    lc = length_controlled_win_rate(values, [len(p["output"]) for p in pairs], [len(p["reference"]) for p in pairs])
    assert raw > 70  # 76.9 with this seed
    assert 45 < lc["length_controlled_win_rate"] < 55  # 50.3 and lc["length_coefficient"] < 0
    assert lc["lc_standard_error"] > 0

    # no length effect at all: the LC win rate is the raw one
    fair = [1.8] * 50 + [1.3] * 50
    lengths = [rng.randint(10, 100) for _ in fair]
    assert length_controlled_win_rate(fair, lengths, lengths)["length_controlled_win_rate"] == pytest.approx(win_rate(fair)["win_rate"], abs=0.1)
