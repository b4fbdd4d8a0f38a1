"""Errors a caller can read without parsing text.

Every refusal of a cellbank server carries the standard ``google.rpc``
details beside its message (``grpc-status-details-bin``; see
``client/src/errors.rs``):

- INVALID_ARGUMENT: a ``BadRequest`` field violation naming the bad field,
  and an ``ErrorInfo`` with reason ``INVALID_FIELD``, domain ``cellbank``,
  metadata ``field``;
- UNAVAILABLE from a replica that does not lead: an ``ErrorInfo`` with
  reason ``NOT_LEADER`` and metadata ``leader_addr`` (also in the
  ``cellbank-leader-addr`` header).

:func:`decode_error` reads them from any failed gRPC call; the client's
methods raise :class:`CellbankError`, which has them decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .retry import LEADER_ADDR_METADATA_KEY, is_transport_failure

#: The ``ErrorInfo`` domain of every cellbank error.
DOMAIN = "cellbank"
#: ``ErrorInfo.reason`` of a request with a bad field.
REASON_INVALID_FIELD = "INVALID_FIELD"
#: ``ErrorInfo.reason`` of a replica that does not lead its cell.
REASON_NOT_LEADER = "NOT_LEADER"
#: ``ErrorInfo.reason`` of a replica whose input queue is full.
REASON_OVERLOADED = "OVERLOADED"
#: ``ErrorInfo.reason`` of a cell whose pair epoch is not the caller's;
#: metadata ``epoch`` is the cell's.
REASON_EPOCH_MISMATCH = "EPOCH_MISMATCH"

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """The structured details of one refusal (empty when it had none)."""

    #: ``ErrorInfo.reason`` (``INVALID_FIELD``, ``NOT_LEADER``), if any.
    reason: Optional[str] = None
    #: ``ErrorInfo.domain`` (``cellbank``), if any.
    domain: Optional[str] = None
    #: ``ErrorInfo.metadata`` (``field``, ``leader_addr``).
    metadata: Dict[str, str] = field(default_factory=dict)
    #: ``BadRequest.field_violations``, in order.
    field_violations: List[FieldViolation] = field(default_factory=list)
    #: ``RetryInfo.retry_delay`` in seconds: wait at least this long before
    #: retrying (no leader known yet, a full queue), if the server said.
    retry_delay: Optional[float] = None

    @property
    def field(self) -> Optional[str]:
        """The bad field: the first ``BadRequest`` violation's, else ``ErrorInfo``'s."""
        if self.field_violations:
            return self.field_violations[0].field
        return self.metadata.get("field")

    @property
    def leader_addr(self) -> Optional[str]:
        """The leader a follower's refusal names (``ErrorInfo`` metadata)."""
        return self.metadata.get("leader_addr") or None


def _trailing(call: object) -> list:
    try:
        return list(call.trailing_metadata() or ())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (not a grpc.Call)
        return []


def _status_proto(call: object) -> Optional[status_pb2.Status]:
    try:
        return rpc_status.from_call(call)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        pass  # code or message differ from the details', or not a call: read them as they are
    except Exception:  # noqa: BLE001 (undecodable details are no details)
        return None
    for key, value in _trailing(call):
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 (garbage is no details)
                return None
    return None


def decode_error(call: object) -> ErrorDetails:
    """The ``google.rpc`` details of a failed call (a ``grpc.RpcError``)."""
    status = _status_proto(call)
    if status is None:
        return ErrorDetails()
    reason = domain = None
    metadata: Dict[str, str] = {}
    violations: List[FieldViolation] = []
    retry_delay = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return ErrorDetails(
        reason=reason, domain=domain, metadata=metadata, field_violations=violations, retry_delay=retry_delay
    )


class CellbankError(Exception):
    """A call that failed: its gRPC code and message, and the details decoded.

    Business refusals (insufficient funds, an unknown account, ...) are not
    errors: they come back as a ``ResultCode`` in the answer. This is for
    what gRPC itself refused: a malformed request (INVALID_ARGUMENT, see
    :attr:`field`), a missing account or transfer on a read (NOT_FOUND), or
    a cluster that did not answer within the call's deadline.
    """

    def __init__(self, error: grpc.RpcError, *, transport_failure: Optional[bool] = None):
        self.cause = error
        self.code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        self.message: str = error.details() or ""  # type: ignore[attr-defined]
        self.details = decode_error(error)
        self.transport_failure = is_transport_failure(error) if transport_failure is None else transport_failure
        super().__init__(f"{self.code.name}: {self.message}")

    # What retry.py reads off a failure, so a CellbankError can be asked too.
    def trailing_metadata(self):
        return _trailing(self.cause)

    @property
    def field(self) -> Optional[str]:
        """The bad field of an INVALID_ARGUMENT (``amount``, ``transfer_id``...)."""
        return self.details.field

    @property
    def reason(self) -> Optional[str]:
        return self.details.reason

    @property
    def leader_addr(self) -> Optional[str]:
        """The leader a follower named: the details, else the header."""
        if self.details.leader_addr:
            return self.details.leader_addr
        for key, value in _trailing(self.cause):
            if key == LEADER_ADDR_METADATA_KEY and value:
                return value
        return None
