"""A pairwise judge in alpaca_eval's weighted manner: a model's output against a reference.

    judge = make_judge("path/or/name")                           # any local transformers causal LM
    judge = make_judge("http://127.0.0.1:8000/v1", model="m")   # an OpenAI-compatible server (vLLM)
    preferences = judge_pairs(judge, pairs, seed=0, log=...)     # 1 = reference wins, 2 = model wins

For each instruction the two outputs go into JUDGE_TEMPLATE as "Output (a)" and "Output
(b)", in an order drawn from a seed and the instruction's key (stable across reruns and
--limit; about half the model outputs come first, which cancels the judge's position bias
on average). The prompt ends with "The better output is Output (", so the judge's next
token is the verdict; its log-probabilities of "a" and "b", normalised over the two, give
P(a better). Mapped back through the order, the preference is 1 + P(model's output better).

- Local judge: one forward per batch (left padding, position ids counted from each row's
  first real token), the last position's logits at the token ids of "a" and "b" as they
  tokenise after the prompt's "(".
- HTTP judge: POST {base}/completions with the raw prompt, max_tokens 1, temperature 0 and
  logprobs (top-k, k = HTTP_TOP_LOGPROBS, OpenAI's maximum): the top tokens whose text,
  stripped and lower-cased, is "a" or "b" are summed for each label. A label outside the
  top k counts as probability 0; neither in it gives no preference (NaN, dropped from the
  win rate and counted as unscored). A server that returns no logprobs is an error.
  `OPENAI_API_KEY`, when set, is sent as the bearer token.

Outputs longer than `max_chars` characters are cut (with a marker) before judging; a local
prompt that still exceeds the judge's context keeps its end (the verdict question).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request

import torch

logger = logging.getLogger(__name__)

LABELS = ("a", "b")
HTTP_TOP_LOGPROBS = 5
DEFAULT_MAX_CHARS = 4000

JUDGE_TEMPLATE = """You compare two responses to the same instruction and decide which one is better: more helpful, more accurate, and better at doing what the instruction asks. Length alone is no merit.

## Instruction
{instruction}

## Output (a)
{output_a}

## Output (b)
{output_b}

## Verdict
Which output is better, Output (a) or Output (b)? Answer with one letter.
The better output is Output ("""


class JudgeError(RuntimeError):
    """The judge cannot be loaded, reached, or read; the message says what to change."""


def judge_prompt(instruction: str, output_a: str, output_b: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    return JUDGE_TEMPLATE.format(instruction=_cut(instruction, max_chars), output_a=_cut(output_a, max_chars),
                                 output_b=_cut(output_b, max_chars))


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + " [...cut]"


def model_goes_first(seed: int, key: str) -> bool:
    """The order of one comparison: a fair coin from the seed and the instruction's key."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] % 2 == 1


def preference(logprob_a: float, logprob_b: float, model_first: bool) -> float:
    """alpaca_eval's preference (1 reference wins .. 2 model wins) from the two labels' logprobs."""
    if math.isinf(logprob_a) and math.isinf(logprob_b):
        return math.nan
    top = max(logprob_a, logprob_b)
    p_a = math.exp(logprob_a - top) / (math.exp(logprob_a - top) + math.exp(logprob_b - top))
    return 1 + (p_a if model_first else 1 - p_a)


# --- judges: prompts -> [(logprob of "a", logprob of "b")] --------------------------------


class LocalJudge:
    """A transformers causal LM, scored by its next-token logits."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
        tokenizer.padding_side = "left"
        self.label_ids = [self._label_id(label) for label in LABELS]
        self.max_length = self._context_length()

    def _label_id(self, label: str) -> int:
        """The token the judge would write for `label` right after the template's final "(".
        Tokenising the tail with the label and without it, the label is what is new."""
        tail = JUDGE_TEMPLATE.rsplit("\n", 1)[-1]
        without = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        with_label = self.tokenizer(tail + label, add_special_tokens=False)["input_ids"]
        if with_label[:len(without)] == without and len(with_label) == len(without) + 1:
            return with_label[-1]
        alone = self.tokenizer(label, add_special_tokens=False)["input_ids"]  # "(" and the label merged
        if len(alone) == 1:
            return alone[0]
        raise JudgeError(f"judge {self.name}: the label {label!r} is not a single token in its vocabulary")

    def _context_length(self) -> int:
        limits = (getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length)
        return min((n for n in limits if isinstance(n, int) and 0 < n < 10**7), default=10**7)  # tokenizers say 1e30 for "unset"

    def __call__(self, prompts: list[str]) -> list[tuple[float, float]]:
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        too_long = sum(len(ids) > self.max_length for ids in encoded)
        if too_long:
            logger.warning("judge %s: %d prompts longer than its context (%d tokens) keep only their end",
                           self.name, too_long, self.max_length)
            encoded = [ids[-self.max_length:] for ids in encoded]
        padded = self.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = padded["attention_mask"].to(device)
        with torch.inference_mode():
            logits = self.model(input_ids=padded["input_ids"].to(device), attention_mask=mask,
                                position_ids=left_padded_positions(mask)).logits[:, -1, :]  # (batch, vocab)
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:, self.label_ids]  # (batch, 2)
        return [(float(a), float(b)) for a, b in logprobs.tolist()]


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's positions counted from its first real token. Without them a model with
    absolute position embeddings (GPT-2) sees a left-padded prompt shifted right, and a pair
    judged in a batch scores differently from the same pair alone (RoPE models do not care:
    only relative positions enter their attention). Pads get 0; they are masked anyway."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HTTPJudge:
    """An OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp server, ...)."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 120.0, retries: int = 3):
        self.base_url, self.timeout, self.retries = base_url.rstrip("/"), timeout, retries
        self.model = model or self._only_served_model()
        self.name = f"{self.model} @ {self.base_url}"

    def _request(self, path: str, payload: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        data = None if payload is None else json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors="replace")[:500]
                if error.code < 500 or attempt == self.retries:
                    raise JudgeError(f"judge {url}: HTTP {error.code}: {body}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise JudgeError(f"judge {url}: cannot reach it ({getattr(error, 'reason', error)}); is the server up?") from None
            except json.JSONDecodeError:
                raise JudgeError(f"judge {url}: the answer is not JSON; is this an OpenAI-compatible /v1 URL?") from None
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def _only_served_model(self) -> str:
        served = [m.get("id") for m in self._request("/models").get("data", [])]
        if len(served) != 1:
            raise JudgeError(f"judge {self.base_url}: serves {served or 'no models'}; name one with --judge_model")
        return served[0]

    def __call__(self, prompts: list[str]) -> list[tuple[float, float]]:
        answer = self._request("/completions", {
            "model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "logprobs": HTTP_TOP_LOGPROBS,
        })
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise JudgeError(f"judge {self.name}: {len(prompts)} prompts sent, {len(choices)} completions returned")
        return [self._label_logprobs(choice) for choice in choices]

    def _label_logprobs(self, choice: dict) -> tuple[float, float]:
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if not top:
            raise JudgeError(
                f"judge {self.name}: the completion carries no logprobs (choices[].logprobs.top_logprobs is missing); "
                f"the judge needs a server that returns them for /v1/completions (vLLM does; some APIs do not)"
            )
        if isinstance(top, list):  # [{token, logprob}, ...], as chat-style logprobs come
            top = {entry.get("token", ""): entry.get("logprob") for entry in top if isinstance(entry, dict)}
        found = {label: [] for label in LABELS}
        for token, logprob in top.items():
            label = token.strip().lower()
            if label in found and logprob is not None:
                found[label].append(float(logprob))
        return tuple(_logsumexp(found[label]) for label in LABELS)


def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def check_judge_spec(spec: str) -> None:
    """Fail before generating, not after, on a judge that is clearly a missing local folder."""
    if not spec.startswith(("http://", "https://")) and spec.startswith(("/", "./", "../", "~")) \
            and not os.path.isdir(os.path.expanduser(spec)):
        raise JudgeError(f"--judge {spec}: no such folder (a judge is none, a model path or name, or http://host:port/v1)")


def make_judge(spec: str, model: str | None = None, dtype: str = "auto"):
    """`spec`: http(s)://host:port/v1 (with `model`, the served model's name), or a local model path/name."""
    if spec.startswith(("http://", "https://")):
        return HTTPJudge(spec, model)
    if model:
        raise JudgeError(f"--judge_model {model!r} is for an HTTP judge; a local judge is named by --judge itself")
    from .loading import load_for_eval

    try:
        network, tokenizer, description = load_for_eval(spec, None, dtype)
    except OSError as error:
        raise JudgeError(f"--judge {spec}: cannot load it as a local model ({str(error).splitlines()[0]})") from None
    return LocalJudge(network, tokenizer, name=spec)


# --- judging a run -------------------------------------------------------------------------


def judge_pairs(judge, pairs: list[dict], seed: int, batch_size: int = 8, max_chars: int = DEFAULT_MAX_CHARS,
                log=None, progress: bool = True) -> dict[str, float]:
    """key -> preference for `pairs` [{key, instruction, output, reference, order_key (optional)}].
    The order of each pair is drawn from `seed` and its order_key (default: key): give every
    run the instruction's key, and runs judged against the same reference see the same orders.
    Judgments already in `log` (a ResumeLog) are reused, new ones appended batch by batch."""
    from tqdm.auto import tqdm

    done = {} if log is None else {k: r["preference"] for k, r in log.done.items()}
    todo = [pair for pair in pairs if pair["key"] not in done]
    with tqdm(total=len(todo), desc="judging", unit="pair", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            firsts = [model_goes_first(seed, pair.get("order_key", pair["key"])) for pair in batch]
            prompts = [
                judge_prompt(pair["instruction"], *((pair["output"], pair["reference"]) if first else (pair["reference"], pair["output"])), max_chars)
                for pair, first in zip(batch, firsts)
            ]
            records = []
            for pair, first, (lp_a, lp_b) in zip(batch, firsts, judge(prompts)):
                value = preference(lp_a, lp_b, first)
                done[pair["key"]] = value
                records.append({"key": pair["key"], "model_first": first, "logprob_a": lp_a, "logprob_b": lp_b,
                                "preference": value})
            if log is not None:
                log.append(records)
            bar.update(len(batch))
    return {pair["key"]: done[pair["key"]] for pair in pairs}
