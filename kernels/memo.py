"""A memo for answers keyed by call shapes: a handful of keys in use, but no bound on what callers send.

A model calls conv2d with the same few layer shapes on every step, and the service sees the same
request shapes again and again, so a plain dict would do, except that nothing stops a caller from
varying the key forever. This one empties itself when it is full instead of evicting entry by entry:
the working set comes back within a few calls, and there is no bookkeeping on the hot path.
"""

from __future__ import annotations

from typing import Any


class BoundedMemo(dict):
    """dict plus `remember`, which stores a value after clearing everything once `size` entries are held."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: Any, value: Any) -> Any:
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
