"""The retry policy of the Rust client crate (``client/src/retry.rs``), in Python.

Which failures may be tried again, how long to wait before the next
attempt, and the hints a refusal carries (where the leader is, which epoch
the cell is at).

The waits use full jitter: the n-th wait is drawn uniformly from zero to
``min(delay_max, delay_min * 2**n)``, so the clients a failover turned away
together do not come back together. A refusal that names the leader is
followed at once a few times (``free_redirects``), then after waits too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import grpc

#: gRPC metadata key carrying the leader's client address on an UNAVAILABLE answer.
LEADER_ADDR_METADATA_KEY = "cellbank-leader-addr"
#: gRPC metadata key carrying a slice's routing epoch (a cell's refusal names its own).
EPOCH_METADATA_KEY = "cellbank-epoch"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of one caller's retries (seconds)."""

    #: The first wait's upper bound.
    delay_min: float
    #: No wait is longer.
    delay_max: float
    #: Refusals naming the leader that are followed at once, without a wait.
    free_redirects: int

    def backoff(self, seed: Optional[int] = None) -> "Backoff":
        """The waits of one call (from ``seed`` when given, for tests)."""
        return Backoff(self, seed)


# The same named bounds as the Rust crate.
RetryPolicy.ROUTER = RetryPolicy(delay_min=0.005, delay_max=0.100, free_redirects=2)  # type: ignore[attr-defined]
#: An application calling a cell or a router: what CellbankClient uses.
RetryPolicy.SERVICE = RetryPolicy(delay_min=0.010, delay_max=0.500, free_redirects=2)  # type: ignore[attr-defined]
RetryPolicy.COURIER = RetryPolicy(delay_min=0.050, delay_max=5.0, free_redirects=0)  # type: ignore[attr-defined]
RetryPolicy.OPERATOR = RetryPolicy(delay_min=0.050, delay_max=1.0, free_redirects=3)  # type: ignore[attr-defined]


class Backoff:
    """The waits between the attempts of one call."""

    def __init__(self, policy: RetryPolicy, seed: Optional[int] = None):
        self.policy = policy
        self._seed = seed
        self._rng: Optional[random.Random] = None  # made at the first wait: most calls never retry
        self.attempt = 0
        self.redirects_left = policy.free_redirects

    def cap(self) -> float:
        """The upper bound of the next wait, in seconds."""
        return min(self.policy.delay_min * (1 << min(self.attempt, 20)), self.policy.delay_max)

    def next_delay(self, hinted: bool) -> float:
        """How long to wait before the next attempt. ``hinted``: the failure
        named the leader, which is then tried at once while free redirects
        remain."""
        if hinted and self.redirects_left > 0:
            self.redirects_left -= 1
            return 0.0
        cap = self.cap()
        self.attempt += 1
        if self._rng is None:
            self._rng = random.Random(self._seed)
        # Whole microseconds, as the Rust crate draws them.
        return self._rng.randint(0, round(cap * 1_000_000)) / 1_000_000

    def after(self, error: object, same_server: bool) -> float:
        """How long to wait after ``error`` before the next attempt: at once
        for a named leader (while free redirects remain), else the jittered
        wait. When the next attempt asks the same server, never less than
        its ``RetryInfo`` asks (capped at the policy's longest wait); another
        server is not held back by this one's advice. As the Rust crate's
        ``Backoff::after``."""
        delay = self.next_delay(leader_hint(error) is not None)
        details = getattr(error, "details", None)
        asked = getattr(details, "retry_delay", None)
        if asked is not None and same_server:
            delay = max(delay, min(asked, self.policy.delay_max))
        return delay


def _metadata(error: object) -> dict:
    """The trailing metadata of a failed call, as a dict (empty when none)."""
    try:
        pairs = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (not a grpc.Call)
        return {}
    return {key: value for key, value in pairs}


def _code(error: object) -> grpc.StatusCode:
    code = error.code  # type: ignore[attr-defined]
    return code() if callable(code) else code


def is_transport_failure(error: object) -> bool:
    """True for a failure of the connection itself (refused, reset, broken,
    the attempt's own time limit): the call may or may not have reached the
    server.

    A :class:`cellbank_client.CellbankError` knows it (``transport_failure``);
    for a raw ``grpc.RpcError``, CANCELLED is one, and so is an UNAVAILABLE
    or UNKNOWN that came with no trailers: a status the server sent arrives
    in trailers (a cellbank server's always hold at least ``date``), while
    grpc-python makes up the status of a connection that failed, with
    none. This is grpc-python's counterpart of the Rust crate's test (a
    tonic status with an error source). When in doubt it says "transport",
    which only makes a non-idempotent call less eager to retry.
    """
    known = getattr(error, "transport_failure", None)
    if known is not None:
        return bool(known)
    code = _code(error)
    if code == grpc.StatusCode.CANCELLED:
        return True
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return not _metadata(error)
    return False


def retryable(error: object, idempotent: bool) -> bool:
    """Whether a failed call may be sent again.

    A server's UNAVAILABLE (not the leader, no quorum, an epoch moving) and
    RESOURCE_EXHAUSTED (a queue full) mean nothing was applied: always. A
    transport failure leaves the outcome unknown: only for an ``idempotent``
    call (every ledger write carries its transfer id, so a repeat finds the
    first outcome). Anything else is the answer.
    """
    if is_transport_failure(error):
        return idempotent
    return _code(error) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def leader_hint(error: object) -> Optional[str]:
    """The leader's address (``host:port``) a refusal names, if any."""
    value = _metadata(error).get(LEADER_ADDR_METADATA_KEY)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value or None


def epoch_hint(error: object) -> Optional[int]:
    """The epoch a cell's refusal names (its pair's routing epoch), if any."""
    value = _metadata(error).get(EPOCH_METADATA_KEY)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None
