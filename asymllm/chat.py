"""`asymllm chat`: talk to a tuned model, in a terminal or one prompt at a time.

    asymllm chat --adapter outputs/A_rand_hB_zero-r16-s42/adapter     # base read from the adapter, through peft
    asymllm chat --model merged/                                      # a merged export, or any causal LM
    asymllm chat --adapter RUN/adapter --prompt "Reverse the word: stone"    # the reply alone on stdout
    echo "Reverse the word: stone" | asymllm chat --adapter RUN/adapter --prompt -    # the same prompt

In the terminal the conversation is kept across turns and each reply is printed as it is
generated; `/reset` forgets it, `/system TEXT` sets the system prompt (and resets), `/exit` or
Ctrl-D leaves, Ctrl-C stops a reply (at the prompt: leaves). The prompt is built with the
tokenizer's chat template exactly as `asymllm eval alpaca` builds it, and decoding is greedy
unless --do_sample, so a one-shot reply equals `model.generate`'s. A reply ends at the first of
the tokens that end a turn: every EOS of the model's generation_config (instruct models list
several: Gemma's <end_of_turn>, Phi-3's <|end|>), the tokenizer's EOS, and the token the chat
template closes an assistant turn with. `--prompt -` reads the prompt from standard input
without the one newline that ends it (what `echo` and a here-document add).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from transformers import TextStreamer

from .evaluation.generation import GenerationError, GenerationSettings, encode_prompt, prepare_tokenizer
from .evaluation.loading import EvalModelError, load_for_eval
from .quantization import add_quantization_flags, quantization_from_args
from .tokenizer import end_token_ids

logger = logging.getLogger("asymllm.chat")
HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit (or Ctrl-D)"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="asymllm chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="adapter folder (its base is read from adapter_config.json unless --model)")
    parser.add_argument("--model", help="base or merged model folder or hub name (default: the adapter's base, else built-in)")
    parser.add_argument("--prompt", help="answer this one prompt and exit (- reads it from standard input, without "
                                          "the one newline that ends it; other whitespace is kept)")
    parser.add_argument("--chat_template", help="chat template for a model without one saved beside its adapter: chatml, llama3, llama2, mistral, alpaca, tokenizer or a Jinja file (default: as training chooses; an adapter's own is always used)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="(%(default)s)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --do_sample (%(default)s)")
    parser.add_argument("--top_p", type=float, default=1.0, help="with --do_sample (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="with --do_sample (%(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    add_quantization_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="[asymllm chat] %(message)s", level=logging.INFO, stream=sys.stderr)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, batch_size=1)
    try:
        settings.validate()
        model, tokenizer, _ = load_for_eval(model=args.model, adapter=args.adapter, dtype=args.dtype,
                                         chat_template=args.chat_template, quantization=quantization_from_args(args))
        prepare_tokenizer(tokenizer)
    except (EvalModelError, GenerationError, OSError) as error:
        raise SystemExit(f"asymllm chat: error: {error}") from None
    torch.manual_seed(settings.seed)
    if args.prompt is not None:
        text = read_stdin_prompt(sys.stdin) if args.prompt == "-" else args.prompt
        print(reply(model, tokenizer, conversation(args.system, text), settings)["output"], flush=True)
        return
    terminal(model, tokenizer, settings, args.system)


def read_stdin_prompt(stream) -> str:
    """Standard input without the one newline (\\n or \\r\\n) that ends it: `echo TEXT |` asks TEXT."""
    text = stream.read()
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a reply (asymllm.tokenizer.end_token_ids): passed whole to generate,
    whose eos_token_id= would otherwise replace generation_config's list with one id."""
    return end_token_ids(tokenizer, getattr(model, "generation_config", None))


def conversation(system: str, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": user}]


def context_size(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def reply(model, tokenizer, messages: list[dict], settings: GenerationSettings, stream=None) -> dict:
    """The assistant's next turn: {output, n_tokens, stopped, full} (full: the context ran out).
    `stream`: a file the reply is written to as it is generated."""
    ids = encode_prompt(tokenizer, messages)
    room = (context_size(model) or len(ids) + settings.max_new_tokens) - len(ids)
    if room < 1:
        return {"output": "", "n_tokens": 0, "stopped": False, "full": True, "cut": True, "prompt_tokens": len(ids)}
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {"do_sample": False}
    streamer = _Printer(tokenizer, stream) if stream is not None else None
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    with torch.inference_mode():
        sequences = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                   max_new_tokens=min(settings.max_new_tokens, room), eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    result = decode(tokenizer, sequences[0, len(ids):].tolist(), stops)
    cut = not result["stopped"] and result["n_tokens"] >= min(settings.max_new_tokens, room)
    return {**result, "full": cut and room <= settings.max_new_tokens, "cut": cut, "prompt_tokens": len(ids)}


def decode(tokenizer, new_tokens: list[int], stops: list[int]) -> dict:
    """The reply up to the first stop token: {output, n_tokens (the stop not counted), stopped}."""
    end = next((i for i, token in enumerate(new_tokens) if token in stops), None)
    content = new_tokens if end is None else new_tokens[:end]
    return {"output": tokenizer.decode(content, skip_special_tokens=True).strip(), "n_tokens": len(content),
            "stopped": end is not None}


class _Printer(TextStreamer):
    """transformers' streamer, into a given file (stdout in a terminal), the prompt left out."""

    def __init__(self, tokenizer, stream):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def terminal(model, tokenizer, settings: GenerationSettings, system: str = "") -> None:
    out = sys.stdout
    messages = conversation(system, "")[:-1]
    limit = context_size(model)
    print(f"asymllm chat: {HELP}" + (f"; context {limit} tokens" if limit else ""), file=out, flush=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave quietly
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset" or text.startswith("/system"):
            system = text.removeprefix("/system").strip() if text.startswith("/system") else system
            messages = conversation(system, "")[:-1]
            print("(conversation reset" + (f"; system prompt: {system}" if text.startswith("/system") else "") + ")", file=out, flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", file=out, flush=True)
        try:
            answer = reply(model, tokenizer, messages, settings, stream=out)
        except KeyboardInterrupt:
            messages.pop()
            print("\n(reply stopped; the turn is forgotten)", file=out, flush=True)
            continue
        if answer["full"]:
            print(f"\n(the context is full: {answer['prompt_tokens']} prompt tokens of {limit}; /reset to start a new conversation)",
                  file=out, flush=True)
            if not answer["output"]:
                messages.pop()
                continue
        elif answer["cut"]:
            print(f"\n(reply cut at --max_new_tokens {settings.max_new_tokens})", file=out, flush=True)
        messages.append({"role": "assistant", "content": answer["output"]})
