"""`RoutingCache`: routing states per model, trusted until the signal moves or the TTL runs out.

    cache = RoutingCache(RoutingSignal(signal_path_for(uri)), ttl_s=2.0)
    state = cache.get("fashion", fetch=lambda: read_from_store("fashion"))   # cached read
    cache.publish("fashion")          # a writer changed routing: every reader refetches

Staleness bound: with a shared signal (a local store), a change published before a `get` starts
is seen by that `get`, in any process on the host. Without one (remote stores), a change is
seen within `ttl_s`; `publish` returns False so the writer can wait out the TTL itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dlpipe.routing.ab import RoutingState
from dlpipe.routing.signal import RoutingSignal


class RoutingCache:
    """Thread-safe per-model cache of `RoutingState`; an unchanged registry costs one `pread`."""

    def __init__(self, signal: RoutingSignal, ttl_s: float = 2.0) -> None:
        self.signal = signal
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[int, float, RoutingState]] = {}
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """True when changes reach other processes through the signal file (not only the TTL)."""
        return self.signal.available

    def get(self, name: str, fetch: Callable[[], RoutingState]) -> RoutingState:
        """The cached state of `name`, or `fetch()`'s when the signal moved or the TTL ran out."""
        state = self._fresh(name)
        if state is not None:
            return state
        with self._lock:  # one refresh at a time; the others then find it cached
            state = self._fresh(name)
            if state is not None:
                return state
            # Read the generation and the clock BEFORE fetching, so an entry is never
            # fresher than the data in it.
            generation = self.signal.read()
            now = time.monotonic()
            state = fetch()
            self._entries[name] = (generation, now, state)
            return state

    def invalidate(self, name: str) -> None:
        """Forget `name` in this process only."""
        self._entries.pop(name, None)

    def publish(self, name: str) -> bool:
        """Routing of `name` changed in the store: refetch here, and everywhere via the signal.

        Returns False when there is no shared signal (other processes see it within the TTL).
        """
        self.invalidate(name)
        return self.signal.bump()

    def _fresh(self, name: str) -> RoutingState | None:
        cached = self._entries.get(name)
        if cached is None or cached[0] != self.signal.read():
            return None
        if time.monotonic() - cached[1] >= self.ttl_s:
            return None
        return cached[2]
