"""The retry policy and the error decoding, without a cluster: the same
bounds and rules as the Rust crate's own tests (client/src/retry.rs)."""

from __future__ import annotations

import unittest

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from cellbank_client import CellbankError, RetryPolicy, decode_error, retryable
from cellbank_client.retry import epoch_hint, is_transport_failure, leader_hint

# What a cellbank server's refusal always carries in its trailers.
SERVER_TRAILERS = (("content-length", "0"), ("date", "Fri, 04 Dec 2026 22:45:17 GMT"))


class FakeError(grpc.RpcError, grpc.Call):
    """A failed call as grpc-python raises it."""

    def __init__(self, code, details="refused", trailers=SERVER_TRAILERS):
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def debug_error_string(self):
        return f"{self._code.name}:{self._details}"

    # grpc.Call's other abstract methods.
    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def details_bin(code, message, *details) -> bytes:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status.SerializeToString()


class RetryRule(unittest.TestCase):
    def test_refusals_that_applied_nothing_are_retried_and_unknown_outcomes_only_when_idempotent(self):
        code = grpc.StatusCode
        for idempotent in (False, True):
            self.assertTrue(retryable(FakeError(code.UNAVAILABLE, "not the leader"), idempotent))
            self.assertTrue(retryable(FakeError(code.RESOURCE_EXHAUSTED, "queue full"), idempotent))
            for refused in (code.INVALID_ARGUMENT, code.FAILED_PRECONDITION, code.NOT_FOUND, code.DEADLINE_EXCEEDED):
                self.assertFalse(retryable(FakeError(refused), idempotent), refused)
            self.assertFalse(retryable(FakeError(code.UNKNOWN, "a server's own unknown error"), idempotent))
        # The connection broke with the call on it, or never connected:
        # grpc-python made the status up, with no trailers.
        for broken in (
            FakeError(code.CANCELLED, "connection reset", trailers=()),
            FakeError(code.UNAVAILABLE, "failed to connect to all addresses", trailers=()),
            FakeError(code.UNKNOWN, "Stream removed", trailers=()),
        ):
            self.assertTrue(is_transport_failure(broken), broken.details())
            self.assertTrue(retryable(broken, True))
            self.assertFalse(retryable(broken, False))
        # A CellbankError carries the verdict (the client marks an attempt
        # that ran out of its own time as a transport failure).
        timed_out = CellbankError(FakeError(code.DEADLINE_EXCEEDED, trailers=()), transport_failure=True)
        self.assertTrue(retryable(timed_out, True))
        self.assertFalse(retryable(timed_out, False))

    def test_hints_are_read_from_the_refusal(self):
        hinted = FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-leader-addr", "127.0.0.1:7102")])
        self.assertEqual(leader_hint(hinted), "127.0.0.1:7102")
        self.assertIsNone(leader_hint(FakeError(grpc.StatusCode.UNAVAILABLE, "no leader")))
        self.assertIsNone(leader_hint(FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-leader-addr", "")])))
        self.assertEqual(epoch_hint(FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-epoch", "7")])), 7)
        self.assertIsNone(epoch_hint(FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-epoch", "seven")])))
        self.assertIsNone(epoch_hint(FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-epoch", "-1")])))


class Waits(unittest.TestCase):
    def test_waits_stay_under_a_doubling_cap_and_are_spread(self):
        policy = RetryPolicy.SERVICE
        backoff = policy.backoff(seed=7)
        caps = []
        for _ in range(12):
            cap = backoff.cap()
            delay = backoff.next_delay(False)
            self.assertLessEqual(delay, cap)
            caps.append(cap)
        self.assertAlmostEqual(caps[0], 0.010)
        self.assertAlmostEqual(caps[1], 0.020)
        self.assertAlmostEqual(caps[5], 0.320)
        self.assertTrue(all(abs(c - 0.5) < 1e-9 for c in caps[6:]), caps)
        # Full jitter: 1,000 clients' first waits cover the whole range.
        firsts = [policy.backoff(seed=seed).next_delay(False) for seed in range(1000)]
        below = sum(1 for d in firsts if d < 0.005)
        self.assertTrue(350 <= below <= 650, f"{below} of 1000 below half the cap")
        self.assertTrue(all(d <= 0.010 for d in firsts))
        self.assertGreater(len(set(firsts)), 900)

    def test_a_named_leader_is_followed_at_once_a_few_times_then_after_waits(self):
        backoff = RetryPolicy.SERVICE.backoff(seed=1)
        self.assertEqual(backoff.next_delay(True), 0.0)
        self.assertEqual(backoff.next_delay(True), 0.0)
        self.assertAlmostEqual(backoff.cap(), 0.010, msg="free redirects do not grow the cap")
        backoff.next_delay(True)
        self.assertAlmostEqual(backoff.cap(), 0.020, msg="the third hint waits")

    def test_the_named_policies_are_the_rust_crates(self):
        self.assertEqual(
            (RetryPolicy.ROUTER, RetryPolicy.SERVICE, RetryPolicy.COURIER, RetryPolicy.OPERATOR),
            (
                RetryPolicy(0.005, 0.100, 2),
                RetryPolicy(0.010, 0.500, 2),
                RetryPolicy(0.050, 5.0, 0),
                RetryPolicy(0.050, 1.0, 3),
            ),
        )

    def test_a_servers_retry_info_is_a_floor_under_the_jittered_wait(self):
        # What a replica that knows no leader answers (client/src/errors.rs).
        info = error_details_pb2.ErrorInfo(reason="NOT_LEADER", domain="cellbank")
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(100)
        blob = details_bin(grpc.StatusCode.UNAVAILABLE, "no leader yet", info, retry)
        electing = CellbankError(
            FakeError(grpc.StatusCode.UNAVAILABLE, "no leader yet", trailers=[("grpc-status-details-bin", blob)])
        )
        self.assertAlmostEqual(electing.details.retry_delay, 0.100)
        for seed in range(50):
            self.assertGreaterEqual(RetryPolicy.SERVICE.backoff(seed=seed).after(electing, True), 0.100)
            # Another endpoint is not held back by this one's advice.
            self.assertLessEqual(RetryPolicy.SERVICE.backoff(seed=seed).after(electing, False), 0.010)
        # Capped at the policy's longest wait.
        self.assertLessEqual(RetryPolicy.ROUTER.backoff(seed=1).after(electing, True), RetryPolicy.ROUTER.delay_max)
        # No RetryInfo, no floor.
        plain = CellbankError(FakeError(grpc.StatusCode.UNAVAILABLE))
        self.assertIsNone(plain.details.retry_delay)
        self.assertLessEqual(RetryPolicy.SERVICE.backoff(seed=2).after(plain, True), 0.010)


class Details(unittest.TestCase):
    def test_a_bad_field_is_named_by_bad_request_and_error_info(self):
        info = error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="cellbank", metadata={"field": "amount"})
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="amount", description="must be at least 1")
            ]
        )
        message = "amount: must be at least 1"
        blob = details_bin(grpc.StatusCode.INVALID_ARGUMENT, message, info, bad)
        error = FakeError(grpc.StatusCode.INVALID_ARGUMENT, message, trailers=[("grpc-status-details-bin", blob)])
        details = decode_error(error)
        self.assertEqual((details.reason, details.domain, details.field), ("INVALID_FIELD", "cellbank", "amount"))
        self.assertEqual(details.field_violations[0].description, "must be at least 1")
        wrapped = CellbankError(error)
        self.assertEqual(
            (wrapped.code, wrapped.field, wrapped.reason), (grpc.StatusCode.INVALID_ARGUMENT, "amount", "INVALID_FIELD")
        )
        self.assertFalse(wrapped.transport_failure)

    def test_error_info_alone_names_the_field_and_a_follower_its_leader(self):
        info = error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="cellbank", metadata={"field": "currency"})
        blob = details_bin(grpc.StatusCode.INVALID_ARGUMENT, "currency: unknown", info)
        self.assertEqual(
            decode_error(
                FakeError(
                    grpc.StatusCode.INVALID_ARGUMENT, "currency: unknown", trailers=[("grpc-status-details-bin", blob)]
                )
            ).field,
            "currency",
        )
        leader = error_details_pb2.ErrorInfo(
            reason="NOT_LEADER", domain="cellbank", metadata={"leader_addr": "127.0.0.1:7102"}
        )
        blob = details_bin(grpc.StatusCode.UNAVAILABLE, "not the leader", leader)
        refusal = CellbankError(
            FakeError(grpc.StatusCode.UNAVAILABLE, "not the leader", trailers=[("grpc-status-details-bin", blob)])
        )
        self.assertEqual((refusal.reason, refusal.leader_addr), ("NOT_LEADER", "127.0.0.1:7102"))
        # Only the header (an older server).
        header = CellbankError(
            FakeError(grpc.StatusCode.UNAVAILABLE, trailers=[("cellbank-leader-addr", "127.0.0.1:7103")])
        )
        self.assertEqual(header.leader_addr, "127.0.0.1:7103")
        # No details at all, or garbage: nothing, and no exception.
        self.assertEqual(decode_error(FakeError(grpc.StatusCode.NOT_FOUND)).field, None)
        garbage = FakeError(grpc.StatusCode.INVALID_ARGUMENT, trailers=[("grpc-status-details-bin", b"\xff\x00")])
        self.assertIsNone(decode_error(garbage).reason)


if __name__ == "__main__":
    unittest.main()
