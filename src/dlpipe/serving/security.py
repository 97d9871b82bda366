"""API keys (constant-time compare) and per-key rate limits (`limits`, moving window)."""

from __future__ import annotations

import hashlib
import hmac
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from dlpipe.serving.errors import RateLimited, Unauthorized


class ApiKeyAuth:
    """Checks `Authorization: Bearer <key>` or `X-API-Key: <key>` against the configured keys."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None, x_api_key: str | None) -> str | None:
        """A short id of the caller's key (for rate limits and logs); None when auth is off."""
        if not self._keys:
            return None
        presented = x_api_key
        if presented is None and authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Authorization header must be 'Bearer <api key>'")
            presented = token.strip()
        if not presented:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        candidate = presented.encode()
        # Compare against every key so the time taken does not reveal which one nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Unauthorized("invalid API key")
        return hashlib.sha256(candidate).hexdigest()[:12]


class RateLimit:
    """Per-caller request budget; `check(key)` raises `RateLimited` with the seconds to wait."""

    def __init__(self, rate: str | None) -> None:
        self.item: RateLimitItem | None = parse(rate) if rate else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def check(self, caller: str) -> None:
        if self.item is None:
            return
        if self._limiter.hit(self.item, "dlpipe", caller):
            return
        stats = self._limiter.get_window_stats(self.item, "dlpipe", caller)
        wait = max(0.0, stats.reset_time - time.time())
        raise RateLimited(
            f"rate limit {self.item} exceeded for this caller; retry in {wait:.1f} s",
            retry_after_s=wait,
        )
