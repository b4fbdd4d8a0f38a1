"""A thin client of cellbank's public Ledger API (``proto/cellbank/v1/ledger.proto``).

It behaves as the Rust ``CellClient`` does (``client/src/cell.rs``): given
the routers' addresses (or one cell's replicas), it remembers which
endpoint answered last, moves to the leader a refusal names or else to the
next endpoint, and retries what :func:`cellbank_client.retry.retryable`
allows, with the waits of ``RetryPolicy.SERVICE``, until the call's
deadline (15 s unless set). Every ledger write carries its transfer id, so
every call is idempotent: a repeat, after a connection broke with the call
on it, finds the first outcome instead of applying twice.

Every connection is mutual TLS with the credentials given
(:class:`cellbank_client.tls.Tls`); plaintext, for a cluster started with
``insecure = true``, only when asked for with ``insecure=True``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from ._gen.cellbank.v1 import ledger_pb2 as pb
from ._gen.cellbank.v1 import ledger_pb2_grpc as pb_grpc
from .errors import CellbankError
from .retry import RetryPolicy, leader_hint, retryable
from .tls import Tls

TransferId = Union[str, bytes]

#: How long one call may take, retries included, unless set otherwise.
CALL_DEADLINE_DEFAULT = 15.0
#: How long one attempt may take (the Rust crate's ChannelSettings::SERVICE).
ATTEMPT_TIMEOUT_DEFAULT = 5.0
#: Largest client-facing message (a full SubmitTransfers batch fits).
MESSAGE_BYTES_MAX = 16 * 1024 * 1024

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    # Keepalive pings even while idle, so a dead peer is noticed before a
    # call needs it (as ChannelSettings::SERVICE).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect soon after a router or replica comes back (the default
    # backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


def _check_security(tls: Optional[Tls], insecure: bool) -> None:
    """Exactly one of the two: credentials, or plaintext asked for."""
    if tls is not None and not isinstance(tls, Tls):
        raise TypeError(f"tls: a cellbank_client.Tls, not {type(tls).__name__}")
    if tls is not None and insecure:
        raise ValueError("give either tls= or insecure=True, not both")
    if tls is None and not insecure:
        raise ValueError(
            "no TLS credentials: give tls=Tls.from_dir(certs_dir, identity) (`cellbank up` makes them in "
            "<data_dir>/certs), or insecure=True for a cluster started with `insecure = true`"
        )


def open_channel(
    target: str,
    *,
    tls: Optional[Tls] = None,
    insecure: bool = False,
    options: Optional[Sequence[Tuple[str, Any]]] = None,
) -> grpc.Channel:
    """A channel to one endpoint (``host:port``): mutual TLS with ``tls``
    (the server must prove ``<cluster>.cellbank``), or plaintext when
    ``insecure`` is set (a cluster started with ``insecure = true``); one
    of the two is required. ``options``: the channel arguments, the
    client's own settings (message limits, keepalive, reconnect backoff)
    unless given. For the generated stubs of any cellbank service, e.g.
    ``router_pb2_grpc.RouterAdminStub(open_channel(admin_plane(router), tls=operator))``.
    """
    _check_security(tls, insecure)
    settings = list(_CHANNEL_OPTIONS if options is None else options)
    if tls is None:
        return grpc.insecure_channel(target, options=settings)
    return grpc.secure_channel(target, tls.credentials(), options=settings + tls.channel_options())


def admin_plane(addr: str) -> str:
    """The admin plane's address of the process at ``addr`` (``host:port``):
    every cellbank process serves its client API on its port, its peers on
    the next port and its admin API (``RouterAdmin``, ``ReplicaAdmin``) on
    the one after."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65533:
        raise ValueError(f"{addr!r} is not host:port with room for the admin plane")
    return f"{host}:{int(port) + 2}"


def _id(transfer_id: TransferId) -> bytes:
    return transfer_id.encode("utf-8") if isinstance(transfer_id, str) else bytes(transfer_id)


class CellbankClient:
    """A client of the routers (or of one cell's replicas).

    ``target``: ``"host:port"``, several separated by commas, or a list.
    ``tls``: the identity to call with (a service's, such as
    ``Tls.from_dir(certs_dir, "service-cli")``); or ``insecure=True`` for
    plaintext to a cluster started with ``insecure = true``. One of the two
    is required. Methods return the answer's message and raise
    :class:`CellbankError` when gRPC refused the call (after the retries
    the policy allows).
    """

    def __init__(
        self,
        target: Union[str, Sequence[str]],
        *,
        tls: Optional[Tls] = None,
        insecure: bool = False,
        deadline: float = CALL_DEADLINE_DEFAULT,
        attempt_timeout: float = ATTEMPT_TIMEOUT_DEFAULT,
        policy: RetryPolicy = RetryPolicy.SERVICE,  # type: ignore[attr-defined]
    ):
        endpoints = [e.strip() for e in target.split(",")] if isinstance(target, str) else [str(e) for e in target]
        endpoints = [e for e in endpoints if e]
        if not endpoints:
            raise ValueError("a client needs at least one endpoint")
        _check_security(tls, insecure)
        self.endpoints: List[str] = endpoints
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.policy = policy
        #: The credentials every connection uses (None: plaintext, asked for).
        self.tls: Optional[Tls] = tls
        self._lock = threading.Lock()
        self._current = 0
        self._channels: List[Optional[grpc.Channel]] = [None] * len(endpoints)
        self._stubs: List[Optional[pb_grpc.LedgerStub]] = [None] * len(endpoints)

    # -- plumbing -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Where the next call goes first: the endpoint that answered last."""
        with self._lock:
            return self.endpoints[self._current]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                if channel is not None:
                    channel.close()
            self._channels = [None] * len(self.endpoints)
            self._stubs = [None] * len(self.endpoints)

    def __enter__(self) -> "CellbankClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stub(self, index: int) -> pb_grpc.LedgerStub:
        with self._lock:
            stub = self._stubs[index]
            if stub is None:
                channel = open_channel(self.endpoints[index], tls=self.tls, insecure=self.tls is None)
                self._channels[index] = channel
                stub = self._stubs[index] = pb_grpc.LedgerStub(channel)
            return stub

    def _follow(self, failed: int, error: CellbankError) -> int:
        """After a failure at ``failed``: the named leader, else the next
        endpoint. Returns the endpoint tried next."""
        with self._lock:
            if self._current != failed:
                return self._current
            hinted = leader_hint(error)
            index = self.endpoints.index(hinted) if hinted in self.endpoints else None
            self._current = index if index is not None and index != failed else (failed + 1) % len(self.endpoints)
            return self._current

    def call(self, method: str, request, *, idempotent: bool = True, deadline: Optional[float] = None):
        """Calls ``Ledger/<method>`` (e.g. ``"Transfer"``) with retries; the
        answer's message. Every Ledger call is idempotent (writes by their
        transfer id, grabs once per user, reads)."""
        deadline = self.deadline if deadline is None else deadline
        started = time.monotonic()
        backoff = self.policy.backoff()
        while True:
            with self._lock:
                index = self._current
            stub = self._stub(index)
            left = deadline - (time.monotonic() - started)
            timeout = max(0.001, min(self.attempt_timeout, left))
            attempt_started = time.monotonic()
            try:
                return getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as rpc_error:
                # The attempt's own time limit (not the call's deadline, nor a
                # server's DEADLINE_EXCEEDED): the outcome is unknown, as
                # when a connection breaks.
                own_limit = (
                    rpc_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    and timeout < left
                    and time.monotonic() - attempt_started >= timeout * 0.99
                )
                error = CellbankError(rpc_error, transport_failure=True if own_limit else None)
                if not retryable(error, idempotent):
                    raise error from None
                following = self._follow(index, error)
                delay = backoff.after(error, following == index)
                if time.monotonic() - started + delay >= deadline:
                    raise error from None
                time.sleep(delay)

    # -- the Ledger API -----------------------------------------------------

    def open_account(self, user_id: int, currency: str = "CNY") -> pb.OpenAccountResponse:
        """Opens the account; ``code`` is OK, or ACCOUNT_ALREADY_EXISTS (nothing changed)."""
        return self.call("OpenAccount", pb.OpenAccountRequest(user_id=user_id, currency=currency))

    def deposit(self, transfer_id: TransferId, user_id: int, amount: int, currency: str = "CNY") -> pb.TransferResult:
        """Money in (by its transfer id, once)."""
        request = pb.DepositRequest(transfer_id=_id(transfer_id), user_id=user_id, currency=currency, amount=amount)
        return self.call("Deposit", request).result

    def withdraw(self, transfer_id: TransferId, user_id: int, amount: int, currency: str = "CNY") -> pb.TransferResult:
        """Money out (by its transfer id, once)."""
        request = pb.WithdrawRequest(transfer_id=_id(transfer_id), user_id=user_id, currency=currency, amount=amount)
        return self.call("Withdraw", request).result

    def transfer(
        self, transfer_id: TransferId, from_user_id: int, to_user_id: int, amount: int, currency: str = "CNY"
    ) -> pb.TransferResult:
        """Moves money between two users (by its transfer id, once: the same id
        again answers the recorded result with ``duplicate`` set). Between
        cells ``settlement`` is IN_TRANSIT; see :meth:`wait_for_settlement`."""
        request = pb.TransferRequest(
            transfer_id=_id(transfer_id),
            from_user_id=from_user_id,
            to_user_id=to_user_id,
            currency=currency,
            amount=amount,
        )
        return self.call("Transfer", request).result

    def submit_transfers(self, transfers: Iterable[pb.TransferRequest]) -> List[pb.TransferResult]:
        """Up to 8,189 transfers in one call; one result per item, in order."""
        return list(self.call("SubmitTransfers", pb.SubmitTransfersRequest(transfers=list(transfers))).results)

    def get_account(self, user_id: int, currency: str = "CNY") -> pb.GetAccountResponse:
        """A linearizable read of one account (NOT_FOUND: no such account)."""
        return self.call("GetAccount", pb.GetAccountRequest(user_id=user_id, currency=currency))

    def balance(self, user_id: int, currency: str = "CNY") -> int:
        return self.get_account(user_id, currency).balance

    def get_transfer(self, transfer_id: TransferId) -> pb.TransferRecord:
        """One transfer by its id, with its result and settlement (NOT_FOUND: none)."""
        return self.call("GetTransfer", pb.GetTransferRequest(transfer_id=_id(transfer_id))).transfer

    def list_transfers(
        self, user_id: int, currency: str = "CNY", page_size: int = 0, page_token: bytes = b""
    ) -> pb.ListTransfersResponse:
        """One page of an account's movements, oldest first."""
        request = pb.ListTransfersRequest(
            user_id=user_id, currency=currency, page_size=page_size, page_token=page_token
        )
        return self.call("ListTransfers", request)

    def history(self, user_id: int, currency: str = "CNY") -> Iterator[pb.TransferRecord]:
        """Every movement of an account, oldest first, page by page."""
        token = b""
        while True:
            page = self.list_transfers(user_id, currency, page_token=token)
            yield from page.transfers
            if not page.next_page_token:
                return
            token = page.next_page_token

    def send_envelope(
        self,
        transfer_id: TransferId,
        sender_user_id: int,
        total: int,
        shares: int,
        currency: str = "CNY",
        split: int = pb.ENVELOPE_SPLIT_RANDOM,
        expires_at_ms: int = 0,
    ) -> pb.SendEnvelopeResponse:
        """Sends a red envelope (by its transfer id, once)."""
        request = pb.SendEnvelopeRequest(
            transfer_id=_id(transfer_id),
            sender_user_id=sender_user_id,
            currency=currency,
            total=total,
            shares=shares,
            split=split,
            expires_at_ms=expires_at_ms,
        )
        return self.call("SendEnvelope", request)

    def grab_envelope(self, envelope_id: str, user_id: int) -> pb.GrabEnvelopeResponse:
        """The next share for this user (at most one per user: a repeat answers ALREADY_GRABBED)."""
        return self.call("GrabEnvelope", pb.GrabEnvelopeRequest(envelope_id=envelope_id, user_id=user_id))

    def get_envelope(self, envelope_id: str, page_size: int = 0, page_token: bytes = b"") -> pb.GetEnvelopeResponse:
        request = pb.GetEnvelopeRequest(envelope_id=envelope_id, page_size=page_size, page_token=page_token)
        return self.call("GetEnvelope", request)

    def wait_for_settlement(
        self, transfer_id: TransferId, timeout: float = 30.0, interval: float = 0.05
    ) -> pb.TransferRecord:
        """Follows a transfer until it is no longer IN_TRANSIT (CREDITED or
        REFUNDED; LOCAL at once); raises TimeoutError after ``timeout``."""
        until = time.monotonic() + timeout
        while True:
            record = self.get_transfer(transfer_id)
            if record.settlement != pb.SETTLEMENT_IN_TRANSIT:
                return record
            if time.monotonic() >= until:
                raise TimeoutError(f"transfer {transfer_id!r} still IN_TRANSIT after {timeout} s")
            time.sleep(interval)


def result_name(code: int) -> str:
    """``ResultCode`` as text (``OK``, ``INSUFFICIENT_FUNDS``...)."""
    return _name(pb.ResultCode, code)


def settlement_name(settlement: int) -> str:
    """``Settlement`` as text (``LOCAL``, ``IN_TRANSIT``, ``CREDITED``, ``REFUNDED``)."""
    return _name(pb.Settlement, settlement)


def _name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return f"UNKNOWN({value})"


__all__ = ["CellbankClient", "admin_plane", "open_channel", "result_name", "settlement_name"]
