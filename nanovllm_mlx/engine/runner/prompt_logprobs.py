"""Prompt logprobs (what `echo` with `logprobs` reports): each prompt token's logprob given
the tokens before it, and the top-N there.

They need the logits of every prompt position, while the shared step computes logits only
for the rows that sample. So the prompt of a request that asks for them, all of it but its
last token, is computed by a dedicated pass before the step: the model over those tokens
alone, writing their K/V into the sequence's own blocks as the step would and keeping all
the logits. The last prompt token then runs in the step as any other, and samples. Keeping
this out of the model runner leaves its step (and the compiled decode path) as it is; the
price is one forward per such request per step, which scoring harnesses do not mind.

No prefix-cache hit may skip those tokens (their logprobs would be missing), so such a
sequence allocates no cached blocks until its pass is done (Sequence.prompt_logprobs_pending).
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx

from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.runner.protocol import Runner
from nanovllm_mlx.engine.sample.logprobs import log_softmax, top_n

# Logits rows per forward of the pass: 256 x 50k float32 is ~51 MB, where a 4,096-token
# chunk would be ~820 MB.
MAX_ROWS = 256


def run(
    runner: Runner, batch: list[ScheduledSeq]
) -> tuple[list[ScheduledSeq], list[tuple[ScheduledSeq, str]]]:
    """Run the pass for the entries whose sequences still need prompt logprobs; return
    the entries as the step should run them (what is left of their chunks, possibly
    nothing) and the entries the pass failed, with why."""
    remaining: list[ScheduledSeq] = []
    failed: list[tuple[ScheduledSeq, str]] = []
    for item in batch:
        seq = item.seq
        if not seq.prompt_logprobs_pending:
            remaining.append(item)
            continue
        start = item.start
        stop = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        try:
            for at in range(start, stop, MAX_ROWS):
                _forward(runner, seq, at, min(MAX_ROWS, stop - at))
        except Exception as e:
            failed.append((item, f"the engine failed on this request's prompt logprobs: {e!r}"))
            continue
        if stop == seq.num_prompt_tokens - 1:
            seq.prompt_logprobs_pending = False
        remaining.append(ScheduledSeq(seq, item.num_new_tokens - (stop - start), start=stop))
    return remaining, failed


def _forward(runner: Runner, seq: Sequence, start: int, count: int) -> None:
    """Compute tokens [start, start + count) of seq (their K/V into its blocks) and the
    logprobs of the prompt tokens they predict. The sequence's progress is the
    scheduler's to advance, once the step is done."""
    logprobs = log_softmax(runner.all_logits(ScheduledSeq(seq, count, start=start)))
    targets = mx.array(seq.token_ids[start + 1 : start + count + 1], dtype=mx.int32)
    chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1).squeeze(-1)
    n = seq.params.prompt_logprobs or 0
    ids, values = top_n(logprobs, n) if n else (None, None)
    mx.eval(chosen, ids, values)
    chosen_list = cast(list[float], chosen.tolist())
    ids_list = [] if ids is None else cast(list[list[int]], ids.tolist())
    values_list = [] if values is None else cast(list[list[float]], values.tolist())
    assert seq.prompt_logprobs is not None
    for j, token in enumerate(seq.token_ids[start + 1 : start + count + 1]):
        entry = {token: chosen_list[j]}
        if n:
            entry |= {t: v for t, v in zip(ids_list[j], values_list[j]) if t != token}
        seq.prompt_logprobs[start + 1 + j] = entry
