"""A plan on the device: the forks' block copies (and recurrent-state copies), grammar
masks, the prompt-logprobs pass, then the batch's forward and sampling, failures
narrowed down to their requests."""

from __future__ import annotations

from nanovllm_mlx.engine.core.plan import StepPlan, StepResult
from nanovllm_mlx.engine.runner import prompt_logprobs
from nanovllm_mlx.engine.runner.isolation import run_isolating
from nanovllm_mlx.engine.runner.protocol import Runner
from nanovllm_mlx.engine.sample import structured


def execute(runner: Runner, plan: StepPlan) -> StepResult:
    """Compute the plan's tokens. The sequences are not advanced here: the scheduler's
    update does that from the plan and this result."""
    if plan.copies:
        runner.copy_blocks(plan.copies)
    if plan.state_copies:
        runner.copy_states(plan.state_copies)
    structured.set_masks(plan.batch)
    # What the prompt-logprobs pass leaves of each chunk: maybe nothing (then the entry
    # samples nothing, and is left out of the forward).
    remaining, failed = prompt_logprobs.run(runner, plan.batch)
    computed = [item for item in remaining if item.num_new_tokens]
    if not computed:
        return StepResult([], None, failed)
    result = run_isolating(runner, computed, plan.look_ahead)
    result.failed += failed
    return result
