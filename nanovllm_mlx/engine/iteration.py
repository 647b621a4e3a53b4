"""LLMEngine.iterate's bookkeeping: whose outputs go where, and when a wait is a stall.

Each request being iterated has a buffer that every step appends its outputs to, so
iterators over disjoint requests can interleave (a generator paused while another steps
still gets its own outputs), and an abort from anywhere reaches the iterator waiting on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nanovllm_mlx.engine.output_processor import RequestOutput
from nanovllm_mlx.errors import EngineStalledError, InvalidRequestError


class Watchers:
    def __init__(self) -> None:
        self._buffers: dict[str, list[RequestOutput]] = {}

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.request_id in self._buffers:
                self._buffers[out.request_id].append(out)

    def iterate(
        self,
        request_ids: list[str],
        known: Callable[[str], bool],
        step: Callable[[], bool],
        abort: Callable[[str], object],
    ) -> Iterator[list[RequestOutput]]:
        """Yield the requests' outputs, step by step, until each has its request_finished
        output. step() runs one engine step and says whether it computed anything."""
        pending = list(dict.fromkeys(request_ids))
        for request_id in pending:
            if not known(request_id):
                raise InvalidRequestError(f"no unfinished request {request_id!r}")
            if request_id in self._buffers:
                raise InvalidRequestError(f"request {request_id!r} is already being iterated")
        mine = list(pending)
        for request_id in mine:
            self._buffers[request_id] = []
        try:
            while pending:
                if not self._any(pending) and not step() and not self._any(pending):
                    # Our requests are queued (else an abort output would be here), yet
                    # nothing could be scheduled: report it rather than spin.
                    raise EngineStalledError(
                        f"the engine cannot schedule {len(pending)} queued request(s)"
                    )
                outputs = [out for r in pending for out in self._buffers[r]]
                for request_id in pending:
                    self._buffers[request_id].clear()
                done = {out.request_id for out in outputs if out.request_finished}
                pending = [r for r in pending if r not in done]
                yield outputs
        finally:
            for request_id in mine:
                self._buffers.pop(request_id, None)
            for request_id in pending:
                abort(request_id)

    def _any(self, request_ids: list[str]) -> bool:
        return any(self._buffers[r] for r in request_ids)
