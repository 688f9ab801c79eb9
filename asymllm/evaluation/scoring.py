"""Log-likelihoods of short continuations (MMLU's " A".." D") after contexts that share a
prefix, exactly as lm-evaluation-harness computes them, but with the prefix run once.

lm-eval's rule (HFLM._encode_pair and _loglikelihood_tokens, 0.4.x): trailing whitespace of
the context moves to the continuation; `whole = tok(context + continuation)`, `ctx =
tok(context)`, `cont = whole[len(ctx):]`; the model reads `(ctx + cont)[-(max_length+1):][:-1]`
and the score is the sum of log-softmax over `cont` at its positions. When every `cont` is
one token, all of them are read from one forward over `ctx`, at its last position.

Two paths give those numbers:
- cached: the prefix's keys and values are computed once (batch 1) and repeated under a batch
  of right-padded suffixes, `ctx[len(prefix):]`; logits only at each row's last position.
  Taken when `ctx` starts with `tok(prefix)`, every `cont` is one token and nothing is
  truncated. The prefix should end *before* a separator such as "\\n\\n": many BPEs encode
  "\\n\\n" at the end of a string as one token but as "\\n", "\\n" before a word, so a prefix
  cut after it would not be a prefix of `ctx` (all those questions would take the full path).
- full: lm-eval's own forward over the whole context, for every other question.

    for i, loglikelihoods, path in score_continuations(model, tokenizer, prefix, contexts, [" A", " B", " C", " D"]):
        ...   # yielded batch by batch, in length order, not input order
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers 4: caches without layer objects
    DynamicLayer = None

logger = logging.getLogger(__name__)

TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
FORWARD_COST = 32  # a forward's fixed cost in tokens, roughly, for cutting batches (see batches())


@dataclass
class Encoded:
    context: list[int]              # lm-eval's context_enc
    continuations: list[list[int]]  # lm-eval's continuation_enc, one per continuation
    clean_split: bool               # tok(context + c) == tok(context) + cont for every c

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuations)


def encode(tokenizer, contexts: list[str], continuations: list[str]) -> list[Encoded]:
    """lm-eval's encoding of every (context, continuation) pair; tokenizer defaults for special tokens."""
    moved = [(c.rstrip(), [c[len(c.rstrip()):] + cont for cont in continuations]) for c in contexts]
    context_ids = tokenizer([c for c, _ in moved])["input_ids"]
    whole_ids = tokenizer([c + cont for c, conts in moved for cont in conts])["input_ids"]
    out, k = [], len(continuations)
    for i, ctx in enumerate(context_ids):
        wholes = whole_ids[i * k:(i + 1) * k]
        conts = [w[len(ctx):] for w in wholes]
        if not all(conts):
            raise ValueError(f"a continuation encodes to no tokens after its context (context ends {contexts[i][-40:]!r})")
        out.append(Encoded(ctx, conts, all(w[:len(ctx)] == ctx for w in wholes)))
    return out


def model_max_length(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: the config's n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def score_continuations(model, tokenizer, prefix: str, contexts: list[str], continuations: list[str],
                        batch_size: int = 8, max_length: int | None = None, use_cache: bool = True,
                        ) -> Iterator[tuple[int, list[float], str]]:
    """Yield (index into contexts, one log-likelihood per continuation, "cached" | "full")."""
    if not contexts:
        return
    max_length = max_length or model_max_length(model, tokenizer)
    encoded = encode(tokenizer, contexts, continuations)
    unclean = sum(not e.clean_split for e in encoded)
    if unclean:
        logger.warning("%d contexts change their own tokens when a continuation is appended; scored as lm-eval does "
                       "(context tokens, then the continuation's share of the joint encoding)", unclean)
    prefix_ids = tokenizer(prefix)["input_ids"] if use_cache and prefix else []
    cached = [i for i, e in enumerate(encoded) if prefix_ids and _fits_cache(e, prefix_ids, max_length)]
    full = sorted(set(range(len(encoded))) - set(cached))
    if cached:
        yield from _score_cached(model, prefix_ids, [(i, encoded[i]) for i in cached], batch_size)
    if full:
        yield from _score_full(model, [(i, encoded[i]) for i in full], batch_size, max_length)


def _fits_cache(e: Encoded, prefix_ids: list[int], max_length: int) -> bool:
    n = len(prefix_ids)
    return e.single_token and n < len(e.context) <= max_length and e.context[:n] == prefix_ids


@torch.inference_mode()
def _score_cached(model, prefix_ids, items, batch_size):
    # Prefix once: batch 1, logits for one position only (the lm_head over a 49k vocabulary
    # is a fifth of a small model's cost per token).
    prefix = torch.tensor([prefix_ids], device=_device(model))
    output = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
    prefix_cache = output.cache if getattr(output, "cache", None) is not None else output.past_key_values
    n = len(prefix_ids)
    items = sorted(items, key=lambda item: -len(item[1].context))  # longest first
    for start, end in batches([len(e.context) - n for _, e in items], batch_size):
        chunk = items[start:end]
        cache = _repeated(prefix_cache, len(chunk))
        rows = [e.context[n:] for _, e in chunk]  # suffixes, (b, <= L) before padding
        logprobs = _logprobs_at(model, rows, [[len(r) - 1] for r in rows], cache)
        for (i, e), row in zip(chunk, logprobs):
            yield i, [float(row[0, c[0]]) for c in e.continuations], "cached"


@torch.inference_mode()
def _score_full(model, items, batch_size, max_length):
    # One forward per distinct model input: with one-token continuations that is one per
    # context (input = ctx for all); otherwise one per (context, continuation), as lm-eval.
    requests = []  # (model input, item index, [(continuation index, continuation tokens)])
    for i, e in items:
        by_input: dict[tuple, list] = {}
        for j, cont in enumerate(e.continuations):
            model_input = tuple((e.context + cont)[-(max_length + 1):][:-1])
            by_input.setdefault(model_input, []).append((j, cont))
        requests += [(list(model_input), i, reads) for model_input, reads in by_input.items()]
    requests.sort(key=lambda r: -len(r[0]))  # longest first
    pending = {i: {} for i, _ in items}  # item -> {continuation index: log-likelihood}
    wanted = {i: len(e.continuations) for i, e in items}
    for start, end in batches([len(r[0]) for r in requests], batch_size):
        chunk = requests[start:end]
        width = [max(len(c) for _, c in reads) for _, _, reads in chunk]
        positions = [list(range(len(inp) - w, len(inp))) for (inp, _, _), w in zip(chunk, width)]
        logprobs = _logprobs_at(model, [inp for inp, _, _ in chunk], positions)
        for (_, i, reads), row, w in zip(chunk, logprobs, width):
            for j, cont in reads:
                picked = row[w - len(cont):, :].gather(1, torch.tensor(cont, device=row.device)[:, None])
                pending[i][j] = float(picked.sum())
            if len(pending[i]) == wanted[i]:
                scores = pending.pop(i)
                yield i, [scores[j] for j in range(wanted[i])], "full"


def batches(lengths: list[int], batch_size: int, forward_cost: int = FORWARD_COST) -> list[tuple[int, int]]:
    """Cut rows sorted longest first into [start, end) batches of at most `batch_size` rows that
    minimise padded tokens + `forward_cost` per forward (a forward's fixed cost, in tokens).

    Fixed chunks of `batch_size` pad every row to its batch's longest: on 5-shot MMLU (10
    questions per subject) that computed 55% more suffix tokens than there are; this cut, 5%.
    """
    best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)  # best[j]: cost of rows [0, j)
    for end in range(1, len(lengths) + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + lengths[start] * (end - start) + forward_cost  # lengths[start]: the batch's longest
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], len(lengths)
    while end:
        out.append((cut[end], end))
        end = cut[end]
    return out[::-1]


def _logprobs_at(model, rows: list[list[int]], positions: list[list[int]], cache=None) -> list[torch.Tensor]:
    """Right-pad `rows` into one batch, run it (after `cache` if given) and return, per row,
    float32 log-softmax at its `positions`: (len(positions[r]), vocab). Real tokens never
    see the padding: it lies after them and attention is causal."""
    device = _device(model)
    ids = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row, device=device)
    keep = sorted({p for row_positions in positions for p in row_positions})
    column = {p: k for k, p in enumerate(keep)}
    kwargs = {_cache_argument(model): cache, "use_cache": True} if cache is not None else {"use_cache": False}
    logits = model(input_ids=ids, logits_to_keep=torch.tensor(keep, device=device), **kwargs).logits  # (b, len(keep), V)
    return [torch.log_softmax(logits[r, [column[p] for p in row_positions]].float(), dim=-1)
            for r, row_positions in enumerate(positions)]


def _repeated(cache, batch: int):
    """The prefix cache for a batch, without touching the prefix's own: the forward appends to it.
    transformers 5 caches hold per-layer `keys`/`values`: broadcast views then, no copy (the
    layer's concatenation with the suffix makes the one copy needed); else deepcopy and repeat."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is not None and layers and all(type(layer).update is DynamicLayer.update for layer in layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]
        for layer in out.layers:
            layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])        # (b, kv heads, prefix, head dim)
            layer.values = layer.values.expand(batch, *layer.values.shape[1:])
        return out
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(batch)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_argument(model) -> str:
    """transformers 5.2x names the forward's cache `cache`; earlier versions `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
