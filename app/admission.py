"""Memory admission: the bytes that requests in progress hold, against CONV_MAX_INFLIGHT_BYTES.

Each request is bounded on its own (body, elements, MACs), but nothing bounded how many of them
hold memory at once: 32 clients sending 59 MB bodies together took a server to 4.2 GB, and more of
them would take any host down. A request reserves its body's declared length before reading it (or
what has arrived, for a body without Content-Length), then, once decoded, the bytes its tensors,
outputs and gradients take, each times the copies it makes of them (BODY_COPIES, PROBLEM_COPIES); past
the limit it is answered 503 + Retry-After at once, as a full queue is. One request is always admitted
when no other holds memory, however large (its own limits bound it), so a limit below one request's
size slows the server down but never locks a request out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import Unavailable

# What a request holds is counted as its main buffers times these, calibrated on one 59 MB base64 /forward
# that raised the server's peak RSS by 258 MB: while its body is read and parsed, the bytes, the parsed
# document and the decoded tensors (3 copies); once decoded, its tensors and results, then their encoded
# response (2 copies of Problem.memory_bytes).
BODY_COPIES = 3
PROBLEM_COPIES = 2


class MemoryBudget:
    """Bytes held by requests in progress in this process (single event loop: no lock needed)."""

    def __init__(self, limit_bytes: int, retry_after_s: int = 1) -> None:
        self.limit_bytes = limit_bytes
        self.retry_after_s = retry_after_s
        self.held_bytes = 0
        self.holders = 0

    @contextmanager
    def hold(self) -> Iterator[Hold]:
        """A reservation of 0 bytes that the request grows with `Hold.resize`, released on exit, or when
        the computation given to `Hold.keep_until` ends if that is later (a 504 does not stop a running conv)."""
        hold = Hold(self)
        self.holders += 1
        try:
            yield hold
        finally:
            if hold.running is None or hold.running.done():
                self._release(hold)
            else:
                hold.running.add_done_callback(lambda _: self._release(hold))

    def _release(self, hold: Hold) -> None:
        self.holders -= 1
        self.held_bytes -= hold.nbytes


class Hold:
    """One request's share of a MemoryBudget."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.nbytes = 0  # held in the budget
        self.running: asyncio.Future | None = None  # a computation that outlives the request (keep_until)

    def keep_until(self, running: asyncio.Future) -> None:
        """The request is leaving while its memory is still in use: a conv still running (deadline, client gone),
        or a response still being sent (a client that reads slowly holds it). Its bytes stay held until `running` ends."""
        self.running = running

    def until_sent(self) -> asyncio.Future:
        """A future for the response to resolve once sent (`PartsResponse(sent=...)`); held until then."""
        sent = asyncio.get_running_loop().create_future()
        self.keep_until(sent)
        return sent

    def body(self, nbytes: int) -> None:
        """The body's bytes so far: `BODY_COPIES` times them."""
        self.resize(BODY_COPIES * nbytes)

    def check_body(self, declared: int) -> None:
        """503 now if a body of `declared` bytes could not be held beside what others hold, but hold nothing
        yet: bytes are held as they arrive. Reserving the declared length up front let eleven connections that
        declared 64 MB and sent nothing hold the whole 2 GiB budget, and refuse every request, for the 30 s of
        the body timeout."""
        self._refuse_past_limit(BODY_COPIES * declared)

    def problem(self, memory_bytes: int) -> None:
        """The decoded problem (`Problem.memory_bytes`): `PROBLEM_COPIES` times it, in place of the body."""
        self.resize(PROBLEM_COPIES * memory_bytes)

    def resize(self, nbytes: int) -> None:
        """Hold `nbytes` from now on; 503 if that would pass the limit while other requests hold memory."""
        if nbytes > self.nbytes:
            self._refuse_past_limit(nbytes)
        budget = self.budget
        budget.held_bytes = budget.held_bytes - self.nbytes + nbytes
        self.nbytes = nbytes

    def _refuse_past_limit(self, nbytes: int) -> None:
        budget = self.budget
        others = budget.held_bytes - self.nbytes
        if others > 0 and others + nbytes > budget.limit_bytes:
            raise Unavailable(
                f"the server is holding {others / 2**20:,.0f} MiB for requests in progress and this one needs "
                f"{nbytes / 2**20:,.1f} MiB; together they would pass the limit of {budget.limit_bytes / 2**20:,.0f} MiB "
                "(CONV_MAX_INFLIGHT_BYTES); retry later",
                budget.retry_after_s,
            )
