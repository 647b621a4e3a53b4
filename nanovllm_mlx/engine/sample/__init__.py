"""Choosing tokens from logits: batched sampling, the logits processors, logprobs, and
structured output's grammars."""
