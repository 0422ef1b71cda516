"""What a caller of the engine holds: the streamed pieces (Delta) and the request handle.

The handle knows nothing of the scheduler (pages, cached tokens, decoder state live in the engine's Sequence): the
engine hands it every piece through `deliver`, and the handle builds its results from them. The output filter (e.g.
the PII filter) sits here, on the stream, so the scheduler only ever sees the model's own text.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .sampler import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """One streamed piece of a request: new text (may be empty while bytes or a possible stop string are pending),
    the token(s) of this step with their log-probabilities, and finish_reason on the last piece."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


class Request:
    """Handle of a submitted request: iterate it (once) for Deltas, `result()` to wait, `cancel()` to stop it.

    After it finishes: output_ids (stop token included), text (stop token and stop string excluded; filtered when
    the engine has an output filter), logprobs and top_logprobs per output token (when asked), finish_reason
    ("stop", "length", "cancelled" or "error"), stop_reason (the stop token id or stop string that ended it).
    """

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], None],
                 on_event: Callable[[Delta], None] | None = None, output_filter=None):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: BaseException | None = None
        self.cached_tokens = 0  # prompt tokens found in the prefix cache (set when its prompt is first planned)
        self._cancel, self._on_event = cancel, on_event
        # one filter per request (feed(text) -> text, flush() -> text): redacts what is streamed and `text` alike
        self._filter = output_filter() if output_filter is not None else None
        self._events: queue.Queue[Delta] = queue.Queue()
        self._done = threading.Event()
        # The engine thread and a cancelling caller may deliver at once; reentrant because a failing on_event
        # cancels, which delivers the last piece from inside deliver.
        self._lock = threading.RLock()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self):
        while True:
            delta = self._events.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Request:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed: {self.error}") from self.error
        return self

    def cancel(self):
        """Stop now: the request leaves the batch and its cache pages are free for the next step."""
        self._cancel()

    def deliver(self, delta: Delta, stop_reason: int | str | None = None, error: BaseException | None = None):
        """Take the engine's next piece: filter its text, add it to the results, queue it for iteration and pass
        it to on_event. Pieces after the last one (a step's output racing a cancel) are dropped."""
        with self._lock:
            if self.finished:
                return
            final = delta.finish_reason is not None
            if self._filter is not None:
                delta.text = self._filter.feed(delta.text) + (self._filter.flush() if final else "")
            self.text += delta.text
            self.output_ids += delta.token_ids
            self.logprobs += delta.logprobs or []
            self.top_logprobs += delta.top_logprobs or []
            if final:
                self.stop_reason, self.error, self.finish_reason = stop_reason, error, delta.finish_reason
            self._events.put(delta)
            if self._on_event is not None:
                try:
                    self._on_event(delta)
                except Exception:
                    log.exception("on_event callback of %s failed; cancelling it", self.id)
                    self.cancel()
            if final:
                self._done.set()
