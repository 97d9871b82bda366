"""Who may call: API keys (constant-time compare), per-key rate limits and a limit on failed key
attempts per client address (`limits`, moving window).

With keys configured every route needs one except the probes in `OPEN_PATHS`; the middleware
asks `Guard.check` before anything else runs, so a new route cannot be forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from dlpipe.serving.errors import RateLimited, Unauthorized

OPEN_PATHS = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"})
"""Answered without a key: liveness and readiness probes (readiness then says only true/false)."""


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
        wait = self.reset_in(caller)
        raise RateLimited(
            f"rate limit {self.item} exceeded for this caller; retry in {wait:.1f} s",
            retry_after_s=wait,
        )

    def hit(self, caller: str) -> None:
        """Spend one unit of `caller`'s budget (never raises)."""
        if self.item is not None:
            self._limiter.hit(self.item, "dlpipe", caller)

    def exhausted(self, caller: str) -> bool:
        """True while `caller` has no budget left (spends nothing)."""
        return self.item is not None and not self._limiter.test(self.item, "dlpipe", caller)

    def reset_in(self, caller: str) -> float:
        """Seconds until `caller` has budget again."""
        if self.item is None:
            return 0.0
        stats = self._limiter.get_window_stats(self.item, "dlpipe", caller)
        return max(0.0, stats.reset_time - time.time())


METRICS_PATH = "/metrics"


class Guard:
    """Authentication and rate limits for one request, from its headers and client address.

    Args:
        keys: client keys (every route).
        rate: per-caller request budget (`limits` syntax).
        failure_limit: failed key attempts allowed per client address; beyond it further
            guesses get 429 while valid keys keep working (behind a proxy all clients may share
            one address: a scanner must not lock them out).
        metrics_keys: keys that may read /metrics and nothing else (Prometheus' scrape key).
    """

    def __init__(
        self,
        keys: list[str],
        rate: str | None = None,
        failure_limit: str | None = None,
        metrics_keys: list[str] | None = None,
    ) -> None:
        self.auth = ApiKeyAuth(keys)
        self.metrics_auth = ApiKeyAuth(metrics_keys or [])
        self.rate_limit = RateLimit(rate)
        self.failures = RateLimit(failure_limit)

    @property
    def enabled(self) -> bool:
        return self.auth.enabled or self.metrics_auth.enabled

    def check(
        self, path: str, authorization: str | None, x_api_key: str | None, client: str
    ) -> str | None:
        """The caller's key id (None when auth is off or the path is open).

        Raises:
            Unauthorized: no key or a wrong one (counted against the client address).
            RateLimited: too many failed attempts from this address, or the caller's own rate.
        """
        if path in OPEN_PATHS:
            return None
        caller = None
        if self.enabled:
            address = f"ip:{client}"
            try:
                caller = self._identify(path, authorization, x_api_key)
            except Unauthorized:
                if self.failures.exhausted(address):
                    raise RateLimited(
                        "too many failed API key attempts from this address; retry later",
                        retry_after_s=self.failures.reset_in(address),
                    ) from None
                self.failures.hit(address)
                raise
        self.rate_limit.check(caller or f"ip:{client}")
        return caller

    def _identify(self, path: str, authorization: str | None, x_api_key: str | None) -> str:
        if path == METRICS_PATH and self.metrics_auth.enabled:
            try:
                return f"metrics:{self.metrics_auth.identify(authorization, x_api_key)}"
            except Unauthorized:
                if not self.auth.enabled:
                    raise
        if not self.auth.enabled:
            raise Unauthorized("this route needs a client API key; none is configured")
        caller = self.auth.identify(authorization, x_api_key)
        assert caller is not None  # auth is enabled
        return caller

    def is_authenticated(self, authorization: str | None, x_api_key: str | None) -> bool:
        """True when auth is off or the headers carry a valid client key (never raises, counts
        nothing)."""
        if not self.enabled:
            return True
        try:
            return self.auth.enabled and self.auth.identify(authorization, x_api_key) is not None
        except Unauthorized:
            return False
