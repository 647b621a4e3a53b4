"""Batched sampling in MLX: every row of the batch may carry different parameters."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from nanovllm_mlx.engine.sequence import Sequence


def _row_key(seed: int, position: int) -> mx.array:
    # Depends only on the request's seed and output position, so a seeded request draws
    # the same tokens whatever else is in the batch.
    state = np.random.SeedSequence([seed & (2**63 - 1), position]).generate_state(1)[0]
    return mx.random.key(int(state))


def _apply_repetition_penalty(logits: mx.array, seqs: list[Sequence]) -> mx.array:
    for i, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty == 1.0:
            continue
        ids = mx.array(sorted(set(seq.token_ids)), dtype=mx.int32)
        seen = logits[i, ids]
        logits[i, ids] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def sample(
    logits: mx.array, seqs: list[Sequence], output_offset: int = 0
) -> tuple[mx.array, mx.array | None]:
    """Next token of each row (and its log-probability when any row asks for it).

    output_offset: how many tokens each sequence has sampled that are not in its
    token_ids yet (1 for a step launched ahead), so seeded draws stay reproducible.

    Greedy rows take the argmax; the others draw from softmax(logits / T) restricted by
    top-k, top-p and min-p, with the Gumbel-max trick so that one argmax serves all rows.
    """
    params = [s.params for s in seqs]
    if all(p.greedy and not p.logprobs and p.repetition_penalty == 1.0 for p in params):
        return mx.argmax(logits, axis=-1), None  # the common case, in one op
    logits = logits.astype(mx.float32)
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = _apply_repetition_penalty(logits, seqs)
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logits, axis=-1)
    if all(p.greedy for p in params):
        return greedy, _chosen(logprobs, greedy)

    n, vocab = logits.shape
    temps = np.array([p.temperature or 1.0 for p in params], dtype=np.float32)
    scaled = logits / mx.array(temps)[:, None]
    noise = mx.random.gumbel(shape=(n, vocab))
    for i, (seq, p) in enumerate(zip(seqs, params)):
        if p.seed is not None and not p.greedy:
            noise[i] = mx.random.gumbel(
                shape=(vocab,), key=_row_key(p.seed, seq.num_output_tokens + output_offset)
            )

    if any(p.min_p > 0.0 for p in params):
        probs = mx.softmax(scaled, axis=-1)
        min_p = mx.array([p.min_p for p in params], dtype=mx.float32)[:, None]
        scaled = mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), -mx.inf, scaled)
    if any(p.top_k for p in params):
        # Partition, then sort only the k_max survivors: a full argsort of the vocabulary
        # costs ~5 ms a row on CPU.
        k_max = max(p.top_k for p in params)
        top = mx.sort(mx.partition(-scaled, k_max - 1, axis=-1)[:, :k_max], axis=-1)
        kth = np.array([max(p.top_k, 1) - 1 for p in params], dtype=np.int32)
        threshold = -mx.take_along_axis(top, mx.array(kth)[:, None], axis=-1)
        off = mx.array([p.top_k == 0 for p in params])[:, None]
        scaled = mx.where(off | (scaled >= threshold), scaled, -mx.inf)
    if any(p.top_p < 1.0 for p in params):
        order = mx.argsort(-scaled, axis=-1)
        ranked = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(ranked, axis=-1)
        top_p = mx.array([p.top_p for p in params], dtype=mx.float32)[:, None]
        # Exclusive cumsum: a token stays if the mass before it is below top_p, so the
        # most likely token always survives.
        ranked = mx.where(mx.cumsum(probs, axis=-1) - probs >= top_p, -mx.inf, ranked)
        pick = mx.argmax(ranked + noise, axis=-1)
        sampled = mx.take_along_axis(order, pick[:, None], axis=-1).squeeze(-1)
    else:
        sampled = mx.argmax(scaled + noise, axis=-1)
    is_greedy = mx.array([p.greedy for p in params])
    tokens = mx.where(is_greedy, greedy, sampled)
    return tokens, _chosen(logprobs, tokens)


def _chosen(logprobs: mx.array | None, tokens: mx.array) -> mx.array | None:
    if logprobs is None:
        return None
    return mx.take_along_axis(logprobs, tokens[:, None], axis=-1).squeeze(-1)
