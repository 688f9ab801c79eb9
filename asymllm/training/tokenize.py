"""Conversations into token ids with response-only labels, through the tokenizer's chat template.

    from asymllm.training.tokenize import tokenize_examples
    # first: asymllm.tokenizer.ensure_pad_token(tokenizer), ensure_chat_template(tokenizer)
    dataset, report = tokenize_examples(examples, tokenizer, max_length=512)  # truncation_mode="keep_end" too
    # dataset columns: input_ids, labels (-100 where no loss); report.summary() for the log

Which tokens carry loss (`labels != -100`): for every assistant turn, its content and the
template's tokens up to and including the EOS that ends the turn (`<|im_end|>` for ChatML),
so the model learns to stop (docs/design.md, trap 8). Nothing else: not the system or user turns, not the
`<|im_start|>assistant\\n` header, not the newline ChatML writes after `<|im_end|>` (never
generated: decoding stops at EOS).

How the spans are found: the conversation is rendered once whole and, for each assistant
turn i, twice more: `messages[:i]` with the generation prompt (where the response starts)
and `messages[:i+1]` (where it ends). Both must be text prefixes of the whole rendering, and
their token ids prefixes of the whole sequence's ids. When a template tokenises differently
in context (docs/design.md, trap 9; e.g. a generation prompt ending in a space that merges into the
response's first token), the span is taken from character offsets instead, and the report
counts those examples. A template that is not prefix-stable as text, or that does not end
assistant turns with the tokenizer's EOS token, is a `DataError` naming the example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..data import DataError, Example
from ..tokenizer import turn_end_token_id

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' loss) skips

# TRL's SFTConfig.truncation_mode values: keep the first max_length tokens, or the last.
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class TokenizeReport:
    """What tokenize_examples did; `summary()` is the one line for the training log."""

    n_examples: int = 0  # kept
    n_truncated: int = 0  # kept, but cut at max_length
    truncation_mode: str = "keep_start"
    n_offset_fallback: int = 0  # spans found by character offsets (template tokenises differently in context)
    n_tokens: int = 0
    n_loss_tokens: int = 0
    max_tokens: int = 0  # longest kept sequence, after truncation
    max_length: int | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> example sources

    @property
    def n_skipped(self) -> int:
        return sum(len(sources) for sources in self.skipped.values())

    @property
    def mean_tokens(self) -> float:
        return self.n_tokens / self.n_examples if self.n_examples else 0.0

    def summary(self) -> str:
        loss_share = self.n_loss_tokens / self.n_tokens if self.n_tokens else 0.0
        line = (
            f"tokenized {self.n_examples} examples: {self.n_tokens} tokens (mean {self.mean_tokens:.1f}, "
            f"max {self.max_tokens}), {self.n_loss_tokens} with loss ({loss_share:.1%}); "
            f"{self.n_truncated} truncated at max_length={self.max_length}"
            f"{' (keep_end)' if self.truncation_mode == 'keep_end' else ''}; {self.n_skipped} skipped"
        )
        line += "".join(f"; {reason}: {_sample(sources)}" for reason, sources in self.skipped.items())
        if self.n_offset_fallback:
            line += (
                f"; {self.n_offset_fallback} masked by character offsets "
                f"(the template tokenises differently in context)"
            )
        return line


def _sample(sources: list[str], shown: int = 3) -> str:
    more = f", ... ({len(sources)} in all)" if len(sources) > shown else ""
    return ", ".join(sources[:shown]) + more


def tokenize_examples(examples: list[Example], tokenizer, max_length: int | None, truncation_mode: str = "keep_start",
                      train_on_inputs: bool = False):
    """Token ids and labels of each example; returns (datasets.Dataset, TokenizeReport).

    `train_on_inputs` (axolotl's flag): every token carries loss, the system and user turns and
    the template's markers too; the responses are still located and checked to end a turn.

    Sequences longer than max_length keep their first max_length tokens ("keep_start") or
    their last ("keep_end", TRL's `slice(-max_length, None)`: the start of the prompt goes,
    the final response and its EOS stay); labels are cut with their tokens, so the mask stays
    aligned. An example left with no loss-bearing token is skipped and counted in the report
    (it would train nothing).
    """
    import datasets

    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"--truncation_mode {truncation_mode}: must be one of {', '.join(TRUNCATION_MODES)}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so no response could teach the model to stop")
    report = TokenizeReport(max_length=max_length, truncation_mode=truncation_mode)
    columns = {"input_ids": [], "labels": []}
    ends = {tokenizer.eos_token_id, turn_end_token_id(tokenizer)} - {None}
    for example in examples:
        ids, labels, used_offsets = encode_example(example, tokenizer, ends)
        if train_on_inputs:
            labels = list(ids)
        report.n_offset_fallback += used_offsets
        if max_length is not None and len(ids) > max_length:
            kept = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[kept], labels[kept]
            if all(label == IGNORE_INDEX for label in labels):
                report.skipped.setdefault(_cut_reason(max_length, truncation_mode), []).append(example.source)
                continue
            report.n_truncated += 1
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        report.n_examples += 1
        report.n_tokens += len(ids)
        report.n_loss_tokens += sum(label != IGNORE_INDEX for label in labels)
        report.max_tokens = max(report.max_tokens, len(ids))
    if not report.n_examples:
        raise DataError(f"no example left to train on: {report.summary()}")
    if report.n_skipped or report.n_truncated or report.n_offset_fallback:  # the caller logs the summary too
        logger.warning(report.summary())
    return datasets.Dataset.from_dict(columns), report


def _cut_reason(max_length: int, truncation_mode: str) -> str:
    if truncation_mode == "keep_start":
        return f"every response token beyond max_length={max_length}"
    return f"every response token before the last max_length={max_length} tokens (--truncation_mode keep_end)"


def encode_example(example: Example, tokenizer, ends: set[int] | None = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, whether character offsets were needed) of one conversation. `ends`: the
    tokens that end an assistant turn (default: EOS, and the template's turn-end token)."""
    ends = ends or {tokenizer.eos_token_id, turn_end_token_id(tokenizer)} - {None}
    text = _render(tokenizer, example.messages, example.source)
    ids = _encode(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    used_offsets = False
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, example.messages[:i], example.source, add_generation_prompt=True)
        end_text = _render(tokenizer, example.messages[: i + 1], example.source)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise DataError(
                f"{example.source}: the chat template renders turn {i} differently inside the whole conversation, "
                f"so the response cannot be located; use a template whose rendering of a conversation's start "
                f"does not depend on what follows"
            )
        span = _token_span(ids, _encode(tokenizer, start_text), _encode(tokenizer, end_text))
        if span is None:  # docs/design.md, trap 9: the boundary tokens merge differently in context
            span = _offset_span(tokenizer, text, len(start_text), len(end_text), example.source)
            used_offsets = True
        start, end = _through_last_end(ids, span, tokenizer, ends, example.source, i)
        labels[start:end] = ids[start:end]
    return ids, labels, used_offsets


def _render(tokenizer, messages: list[dict], source: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises its own types (e.g. "roles must alternate")
        raise DataError(f"{source}: the chat template cannot render this conversation: {error}") from error


def _encode(tokenizer, text: str) -> list[int]:
    # The template writes any BOS itself; tokenizing with special tokens would add a second.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_span(ids: list[int], start_ids: list[int], end_ids: list[int]) -> tuple[int, int] | None:
    """The turn's token range, if both renderings tokenise to exact prefixes of the whole."""
    if ids[: len(start_ids)] == start_ids and ids[: len(end_ids)] == end_ids:
        return len(start_ids), len(end_ids)
    return None


def _offset_span(tokenizer, text: str, char_start: int, char_end: int, source: str) -> tuple[int, int]:
    """Tokens of the whole sequence that overlap characters [char_start, char_end).

    A token straddling char_start (prompt text merged into the response's first token) is
    included: it is the token the model has to produce at that position.
    """
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError as error:  # slow (Python) tokenizers have no offsets
        raise DataError(
            f"{source}: the chat template tokenises differently in context and this tokenizer has no character "
            f"offsets to locate the response; load the fast tokenizer (use_fast=True)"
        ) from error
    inside = [j for j, (lo, hi) in enumerate(offsets) if hi > char_start and lo < char_end]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)  # empty: the EOS check names the problem


def _through_last_end(ids: list[int], span: tuple[int, int], tokenizer, ends: set[int], source: str,
                      turn: int) -> tuple[int, int]:
    """The span cut after its last end token (EOS, or the turn-end token such as Llama 3's <|eot_id|>
    when EOS is another token): the template's text after it (ChatML's newline) is never generated."""
    start, end = span
    for j in range(end - 1, start - 1, -1):
        if ids[j] in ends:
            return start, j + 1
    shown = ", ".join(repr(tokenizer.convert_ids_to_tokens(t)) for t in sorted(ends))
    raise DataError(
        f"{source}: assistant turn {turn} does not end with a token that ends a reply ({shown}) under this chat "
        f"template, so the tuned model would never learn to stop; choose a template whose turns end in one of "
        f"the tokenizer's tokens (--chat_template; alpaca ends replies with EOS), or set tokenizer.eos_token"
    )
