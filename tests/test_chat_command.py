"""`asymllm chat` on a tiny model: the one-shot reply is exactly `model.generate`'s under
greedy decoding; the terminal keeps the conversation, /reset and /system work, Ctrl-D and
Ctrl-C leave without a traceback, a full context is said."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asymllm.chat import main
from asymllm.evaluation.generation import prepare_tokenizer
from asymllm.tiny import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [sys.executable, "-m", "asymllm.cli", "chat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("chat") / "model"))


def generate_directly(model_dir: str, messages: list[dict], max_new_tokens: int) -> str:
    """What transformers alone replies: the chat template, greedy generate, decoded to EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_one_shot_prints_exactly_the_greedy_reply(model_dir, capsys, monkeypatch):
    main(["--model", model_dir, "--prompt", "Reverse the word: stone", "--max_new_tokens", "12"])
    expected = generate_directly(model_dir, [{"role": "user", "content": "Reverse the word: stone"}], 12)
    assert expected and capsys.readouterr().out == expected + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Reverse the word: stone"))
    main(["--model", model_dir, "--prompt", "-", "--system", "Be brief.", "--max_new_tokens", "12"])
    expected = generate_directly(model_dir, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Reverse the word: stone"}], 12)
    assert capsys.readouterr().out == expected + "\n"


def test_a_prompt_piped_in_is_the_prompt_typed_on_the_command_line(model_dir, capsys, monkeypatch):
    """`echo TEXT | asymllm chat --prompt -` answers what `--prompt TEXT` does: the one newline that
    ends the piped text is not part of the prompt (newlines inside it are)."""
    for text in ("Reverse the word: stone", "Reverse the word:\nstone"):
        main(["--model", model_dir, "--prompt", text, "--max_new_tokens", "12"])
        typed = capsys.readouterr().out
        monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
        main(["--model", model_dir, "--prompt", "-", "--max_new_tokens", "12"])
        assert capsys.readouterr().out == typed, text


def greedy_ids(model_dir: str, messages: list[dict], max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_a_reply_stops_at_every_end_token_of_the_generation_config(tmp_path, capsys):
    """Instruct models list several end tokens in generation_config.json (Gemma's <end_of_turn>, Phi-3's
    <|end|> beside EOS): the reply ends at the first of any, not only at the tokenizer's EOS."""
    path = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "hi"}]
    full = greedy_ids(path, messages, 12)
    cut = next(i for i in range(2, len(full)) if full[i] not in full[:i] and full[i] != tokenizer.eos_token_id)
    config_file = os.path.join(path, "generation_config.json")
    config = json.load(open(config_file))
    config["eos_token_id"] = [tokenizer.eos_token_id, full[cut]]
    json.dump(config, open(config_file, "w"))
    main(["--model", path, "--prompt", "hi", "--max_new_tokens", "12"])
    assert capsys.readouterr().out == tokenizer.decode(full[:cut], skip_special_tokens=True).strip() + "\n"


def test_the_template_turn_end_stops_a_reply_too():
    """A template whose assistant turns end with a token other than EOS (here <|endoftext|>): that
    token stops a reply as well as EOS and every EOS of the generation config."""
    from transformers import GenerationConfig

    from asymllm.chat import stop_token_ids
    from asymllm.tiny import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|endoftext|>")
    model = tiny_causal_lm(vocab_size=len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=[7, tokenizer.eos_token_id])
    assert sorted(stop_token_ids(model, tokenizer)) == sorted({7, tokenizer.eos_token_id,
                                                               tokenizer.convert_tokens_to_ids("<|endoftext|>")})


def _terminal(model_dir: str, lines: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CHAT, "--model", model_dir, "--max_new_tokens", "8", *flags], input=lines, capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _replies(stdout: str) -> list[str]:
    return [chunk.split("\n(")[0].split("you> ")[0].strip() for chunk in stdout.split("assistant> ")[1:]]


def test_terminal_keeps_the_conversation_and_resets_it(model_dir):
    done = _terminal(model_dir, "hi\nhow are you\n/reset\nhi\n/system Be terse.\nhi\n/bogus\n/exit\n")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    first, second, after_reset, with_system = _replies(done.stdout)
    assert first == after_reset  # the same question with no history: the same greedy reply
    assert "(conversation reset)" in done.stdout and "(conversation reset; system prompt: Be terse.)" in done.stdout
    assert "(unknown command /bogus; commands:" in done.stdout
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": generate_directly(model_dir, [{"role": "user", "content": "hi"}], 8)},
               {"role": "user", "content": "how are you"}]
    assert second.replace("\n", " ").split() == generate_directly(model_dir, history, 8).replace("\n", " ").split()
    assert with_system.split() == generate_directly(model_dir, [{"role": "system", "content": "Be terse."},
                                                                {"role": "user", "content": "hi"}], 8).split()


def _default_sigint() -> None:
    """In the chat process, Ctrl-C as a terminal gives it: a shell that starts the test run in the
    background (`cmd &`) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_d_and_ctrl_c_leave_without_a_traceback(model_dir):
    done = _terminal(model_dir, "hi\n")  # stdin ends: Ctrl-D
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stdout.rstrip().endswith("you>")
    proc = subprocess.Popen([*CHAT, "--model", model_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, preexec_fn=_default_sigint)
    seen, deadline = b"", time.monotonic() + 120
    while b"you> " not in seen and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 1024)
    proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


def never_ending_model(directory) -> str:
    """A tiny model that can never end a reply: its generation_config suppresses EOS
    (transformers' `suppress_tokens`), so a reply runs until --max_new_tokens."""
    path = save_tiny_model(directory, max_positions=8192)
    config_file = os.path.join(path, "generation_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["suppress_tokens"] = [config["eos_token_id"]]
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(tmp_path):
    """Ctrl-C while a reply streams: the reply stops, its turn is forgotten, the prompt comes
    back, and /exit still leaves cleanly. The model cannot emit EOS and may write 8000
    tokens, so the signal always arrives mid-reply."""
    endless = never_ending_model(tmp_path / "endless")
    proc = subprocess.Popen([*CHAT, "--model", endless, "--max_new_tokens", "8000"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, preexec_fn=_default_sigint)

    def read_until(done, seen: bytes = b"") -> bytes:
        deadline = time.monotonic() + 120
        while not done(seen) and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 4096)
        return seen

    read_until(lambda seen: b"you> " in seen)
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    streamed = read_until(lambda seen: len(seen.partition(b"assistant> ")[2]) > 0)  # the reply has started streaming
    proc.send_signal(signal.SIGINT)
    after = read_until(lambda seen: seen.rstrip().endswith(b"you>"), streamed)
    proc.stdin.write(b"/exit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert b"(reply stopped; the turn is forgotten)" in after and after.rstrip().endswith(b"you>"), after[-500:]
    assert b"(reply cut" not in after
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


def test_a_full_context_is_said_and_the_turn_dropped(tmp_path):
    small = save_tiny_model(str(tmp_path / "small"), max_positions=48)
    done = _terminal(small, "word " * 60 + "\nhi\n")
    assert done.returncode == 0, done.stderr
    assert "(the context is full: " in done.stdout and " prompt tokens of 48; /reset to start a new conversation)" in done.stdout


def test_a_missing_adapter_folder_is_a_clear_error(tmp_path):
    done = subprocess.run([*CHAT, "--adapter", str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().endswith(f"asymllm chat: error: --adapter {tmp_path / 'nope'}: no such folder")



LAST_WORD = [("fast window king fox", "fox"), ("lion lamp queen cat", "cat"), ("cloud tiger blue river", "river"),
             ("rock house game dark", "dark")]  # the first four of the built-in held-out set's "last word" task


@pytest.mark.slow
def test_the_built_in_default_trained_briefly_answers_a_built_in_task(tmp_path, capsys):
    """40 steps of the built-in default (SmolLM2-135M, A_rand_hB_zero r=16) at lr 3e-3, then `asymllm
    chat --adapter ... --prompt` on held-out questions as a user asks them; the base model alone
    answers none of them with the bare word."""
    from asymllm.training.train import main as train

    train(["--output_dir", str(tmp_path / "run"), "--max_steps", "40", "--learning_rate", "3e-3", "--save_strategy", "no",
           "--max_length", "128"])

    def ask(*flags) -> list[str]:
        capsys.readouterr()
        replies = []
        for words, _ in LAST_WORD:
            main([*flags, "--prompt", f"What is the last word?\n\n{words}", "--max_new_tokens", "12"])
            replies.append(capsys.readouterr().out.strip())
        return replies

    tuned, base = ask("--adapter", str(tmp_path / "run" / "adapter")), ask()
    print("tuned:", tuned, "base:", base)
    answers = [answer for _, answer in LAST_WORD]
    assert sum(r == a for r, a in zip(tuned, answers)) >= 3, tuned
    assert not any(r == a for r, a in zip(base, answers)), base
