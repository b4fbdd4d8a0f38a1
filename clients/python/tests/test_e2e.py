"""The Python client end to end, against a real local cluster it starts
itself (``cellbank up`` from ``CELLBANK_BIN``: a router, two pairs of
three-replica cells, on free ports in a temporary directory): accounts,
deposits and transfers; a retry with the same transfer id answered with the
original result and applied once; refusals with their structured details
decoded; a client that fails over from a dead endpoint; and a transfer
between users of different cells followed until it is CREDITED; a
plaintext connection to the TLS router refused with nothing applied. Every
call is mutual TLS: the ledger calls with the service certificate
``service-cli``, the routers' admin calls (readiness, the routing table)
with the operator certificate ``operator-admin``. The cluster's whole
process group is killed and its directory removed however the tests
end."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
import unittest

import grpc
from local_cluster import SERVICE_CLI, LocalCluster, free_port

from cellbank_client import (
    CellbankClient,
    CellbankError,
    Tls,
    decode_error,
    open_channel,
    pb,
    pb_grpc,
    result_name,
    settlement_name,
)

BINARY = os.environ.get("CELLBANK_BIN", "")

# Clusters to stop if this process is told to stop (the runner or cargo
# killing it): unittest's cleanups would not run then.
_LIVE = []


def _stop_all_and_exit(signum, _frame):
    for cluster in list(_LIVE):
        cluster.stop()
    os._exit(128 + signum)


def _stop_all_at_exit():
    for cluster in list(_LIVE):
        cluster.stop()


for _signal in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(_signal, _stop_all_and_exit)
atexit.register(_stop_all_at_exit)


def ok(test: unittest.TestCase, result, what: str):
    test.assertEqual(result.code, pb.RESULT_CODE_OK, f"{what}: {result_name(result.code)} {result.detail}")


@unittest.skipUnless(BINARY, "set CELLBANK_BIN to a built cellbank binary")
class EndToEnd(unittest.TestCase):
    cluster: LocalCluster
    client: CellbankClient
    #: The service identity every ledger call here uses.
    service: Tls

    @classmethod
    def setUpClass(cls):
        started = time.monotonic()
        cls.cluster = LocalCluster(BINARY, start_timeout=120.0)
        _LIVE.append(cls.cluster)
        cls.addClassCleanup(lambda: _LIVE.remove(cls.cluster))
        cls.addClassCleanup(cls.cluster.stop)
        cls.cluster.start()
        print(
            f"\ncluster ready in {time.monotonic() - started:.1f} s, router {cls.cluster.router}",
            file=sys.stderr,
        )
        cls.service = cls.cluster.tls(SERVICE_CLI)
        cls.client = CellbankClient(cls.cluster.router, tls=cls.service, deadline=30.0)
        cls.addClassCleanup(cls.client.close)

    def users(self, first: int, count: int = 40):
        """user -> pair for a range of user ids, from the routing table."""
        return self.cluster.pairs_of(range(first, first + count))

    def open_and_seed(self, user: int, amount: int):
        ok(self, self.client.open_account(user), f"open {user}")
        if amount:
            ok(self, self.client.deposit(f"py-seed-{user}", user, amount), f"seed {user}")

    def test_a_retry_with_the_same_transfer_id_gets_the_original_answer_and_applies_once(self):
        pairs = self.users(100)
        a = next(u for u in pairs if pairs[u] == 1)
        b = next(u for u in pairs if pairs[u] == 1 and u != a)
        ok(self, self.client.open_account(a), "open")
        again = self.client.open_account(a)
        self.assertEqual(again.code, pb.RESULT_CODE_ACCOUNT_ALREADY_EXISTS, result_name(again.code))
        self.open_and_seed(b, 0)

        first = self.client.deposit("py-deposit-1", a, 10_000)
        ok(self, first, "deposit")
        self.assertFalse(first.duplicate)
        repeat = self.client.deposit("py-deposit-1", a, 10_000)
        ok(self, repeat, "deposit again")
        self.assertTrue(repeat.duplicate)
        self.assertEqual(repeat.applied_index, first.applied_index)

        sent = self.client.transfer("py-order-42", a, b, 2_500)
        ok(self, sent, "transfer")
        self.assertFalse(sent.duplicate)
        self.assertEqual(sent.settlement, pb.SETTLEMENT_LOCAL, settlement_name(sent.settlement))
        retried = self.client.transfer(b"py-order-42", a, b, 2_500)  # bytes or str: the same id
        ok(self, retried, "retried transfer")
        self.assertTrue(retried.duplicate, "a retry is answered with the recorded result")
        self.assertEqual(retried.applied_index, sent.applied_index)
        self.assertEqual(retried.timestamp_ms, sent.timestamp_ms)

        # The same id with another amount is refused, naming the field.
        reused = self.client.transfer("py-order-42", a, b, 2_600)
        self.assertEqual(reused.code, pb.RESULT_CODE_ID_REUSED_WITH_DIFFERENT_FIELDS, result_name(reused.code))
        self.assertEqual(reused.field, "amount")

        self.assertEqual(self.client.balance(a), 7_500, "deposited once, debited once")
        self.assertEqual(self.client.balance(b), 2_500)
        record = self.client.get_transfer("py-order-42")
        self.assertEqual(
            (record.kind, record.from_user_id, record.to_user_id, record.amount, record.result),
            (pb.TRANSFER_KIND_TRANSFER, a, b, 2_500, pb.RESULT_CODE_OK),
        )
        history = [(r.kind, bytes(r.transfer_id)) for r in self.client.history(a)]
        self.assertEqual(history, [(pb.TRANSFER_KIND_DEPOSIT, b"py-deposit-1"), (pb.TRANSFER_KIND_TRANSFER, b"py-order-42")])

    def test_refusals_are_answers_or_errors_with_their_field_decoded(self):
        pairs = self.users(200)
        a, b, nobody = [u for u in pairs if pairs[u] == 2][:3]
        self.open_and_seed(a, 1_000)
        self.open_and_seed(b, 0)

        # A business refusal is a result code, not an error; nothing moves.
        poor = self.client.transfer("py-too-much", a, b, 1_001)
        self.assertEqual(poor.code, pb.RESULT_CODE_INSUFFICIENT_FUNDS, result_name(poor.code))
        unknown = self.client.transfer("py-to-nobody", a, nobody, 1)
        self.assertEqual(unknown.code, pb.RESULT_CODE_ACCOUNT_NOT_FOUND, result_name(unknown.code))

        # A malformed request is INVALID_ARGUMENT, answered at once (never
        # retried), with the field in google.rpc.BadRequest and ErrorInfo.
        for name, call, field in [
            ("zero amount", lambda: self.client.transfer("py-zero", a, b, 0), "amount"),
            ("empty transfer id", lambda: self.client.transfer("", a, b, 1), "transfer_id"),
            ("unknown currency", lambda: self.client.transfer("py-xyz", a, b, 1, currency="XYZ"), "currency"),
            ("same account", lambda: self.client.transfer("py-self", a, a, 1), "to_user_id"),
        ]:
            with self.subTest(name):
                started = time.monotonic()
                with self.assertRaises(CellbankError) as refused:
                    call()
                error = refused.exception
                self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT, str(error))
                self.assertEqual(error.field, field)
                self.assertEqual(error.details.field_violations[0].field, field, "BadRequest")
                self.assertEqual(
                    (error.details.reason, error.details.domain, error.details.metadata.get("field")),
                    ("INVALID_FIELD", "cellbank", field),
                    "ErrorInfo",
                )
                self.assertTrue(error.message.startswith(f"{field}:"), error.message)
                self.assertFalse(error.transport_failure)
                self.assertLess(time.monotonic() - started, self.client.deadline / 2, "not retried")

        # The helper reads a raw grpc error too (a caller of the stubs).
        with open_channel(self.cluster.router, tls=self.service) as channel:
            with self.assertRaises(grpc.RpcError) as raw:
                pb_grpc.LedgerStub(channel).Deposit(
                    pb.DepositRequest(transfer_id=b"py-raw", user_id=a, currency="CNY", amount=0), timeout=10
                )
        self.assertEqual(decode_error(raw.exception).field, "amount")

        # A read of what does not exist: NOT_FOUND, not retried.
        with self.assertRaises(CellbankError) as missing:
            self.client.get_transfer("py-never-sent")
        self.assertEqual(missing.exception.code, grpc.StatusCode.NOT_FOUND)

        self.assertEqual(self.client.balance(a), 1_000)
        self.assertEqual(self.client.balance(b), 0)

    def test_a_dead_endpoint_is_left_for_the_next_and_a_dead_cluster_is_an_error(self):
        pairs = self.users(300)
        a, b = list(pairs)[:2]
        self.open_and_seed(a, 500)
        self.open_and_seed(b, 0)
        dead = f"127.0.0.1:{free_port()}"  # nobody listens there
        with CellbankClient([dead, self.cluster.router], tls=self.service, deadline=30.0) as client:
            moved = client.transfer("py-via-second", a, b, 100)
            ok(self, moved, "transfer through the second endpoint")
            self.assertEqual(client.endpoint, self.cluster.router, "it stays on the live one")
        self.assertEqual(self.client.balance(a), 400)
        self.assertEqual(self.client.balance(b), 100)

        with CellbankClient(dead, tls=self.service, deadline=1.0) as client:
            started = time.monotonic()
            with self.assertRaises(CellbankError) as down:
                client.get_account(a)
            self.assertEqual(down.exception.code, grpc.StatusCode.UNAVAILABLE)
            self.assertTrue(down.exception.transport_failure)
            self.assertLess(time.monotonic() - started, 5.0, "retried until the deadline, not beyond")

    def test_a_plaintext_connection_to_the_tls_router_fails_and_applies_nothing(self):
        pairs = self.users(500)
        a, b = list(pairs)[:2]
        self.open_and_seed(a, 1_000)
        self.open_and_seed(b, 0)

        # The client's own retries end at its deadline with UNAVAILABLE: no
        # handshake, no call.
        with CellbankClient(self.cluster.router, insecure=True, deadline=2.0) as plain:
            started = time.monotonic()
            with self.assertRaises(CellbankError) as refused:
                plain.transfer("py-plaintext-1", a, b, 100)
            self.assertEqual(refused.exception.code, grpc.StatusCode.UNAVAILABLE, str(refused.exception))
            self.assertTrue(refused.exception.transport_failure)
            self.assertLess(time.monotonic() - started, 10.0, "retried until the deadline, not beyond")
        # A raw stub on a plaintext channel: the same.
        with open_channel(self.cluster.router, insecure=True) as channel:
            with self.assertRaises(grpc.RpcError) as raw:
                pb_grpc.LedgerStub(channel).Deposit(
                    pb.DepositRequest(transfer_id=b"py-plaintext-2", user_id=a, currency="CNY", amount=5), timeout=10
                )
        self.assertEqual(raw.exception.code(), grpc.StatusCode.UNAVAILABLE, raw.exception.details())

        # Nothing was applied: no record of either id, the balances as seeded.
        for transfer_id in ("py-plaintext-1", "py-plaintext-2"):
            with self.subTest(transfer_id):
                with self.assertRaises(CellbankError) as missing:
                    self.client.get_transfer(transfer_id)
                self.assertEqual(missing.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.client.balance(a), 1_000)
        self.assertEqual(self.client.balance(b), 0)

    def test_a_transfer_between_cells_is_credited(self):
        pairs = self.users(400)
        x = next(u for u in pairs if pairs[u] == 1)
        y = next(u for u in pairs if pairs[u] == 2)
        self.open_and_seed(x, 5_000)
        self.open_and_seed(y, 0)

        sent = self.client.transfer("py-cross-1", x, y, 700)
        ok(self, sent, "cross-cell transfer")
        self.assertEqual(sent.settlement, pb.SETTLEMENT_IN_TRANSIT, settlement_name(sent.settlement))
        self.assertEqual(self.client.balance(x), 4_300, "the sender is debited at once")

        again = self.client.transfer("py-cross-1", x, y, 700)
        ok(self, again, "retried cross-cell transfer")
        self.assertTrue(again.duplicate)

        record = self.client.wait_for_settlement("py-cross-1", timeout=60.0)
        self.assertEqual(record.settlement, pb.SETTLEMENT_CREDITED, settlement_name(record.settlement))
        self.assertGreaterEqual(record.credited_at_ms, record.timestamp_ms)
        self.assertEqual(self.client.balance(x), 4_300)
        self.assertEqual(self.client.balance(y), 700, "credited once")


if __name__ == "__main__":
    unittest.main()
