"""A Python client of cellbank's public Ledger API.

    from cellbank_client import CellbankClient, Tls, pb

    # Mutual TLS: the cluster CA, and a service's certificate and key
    # (`cellbank up` writes them in <data_dir>/certs).
    tls = Tls.from_dir("data/local/certs", "service-cli")
    with CellbankClient("127.0.0.1:7000", tls=tls) as client:
        client.open_account(1)
        result = client.transfer("order-42", from_user_id=1, to_user_id=3, amount=2500)
        assert result.code == pb.RESULT_CODE_OK

``pb`` is the generated ``cellbank.v1`` module (messages and enums);
``errors`` decodes the structured details of a refusal; ``retry`` is the
retry policy shared with the Rust client crate; ``tls`` holds the
credentials (:class:`Tls`), and :func:`open_channel` makes a channel with
them for the generated stubs of any service (``RouterAdmin``, at
:func:`admin_plane` of a router's address, with an
operator's certificate, say).
"""

try:
    from ._gen.cellbank.v1 import ledger_pb2 as pb
except ModuleNotFoundError as missing:  # pragma: no cover
    raise ImportError(
        "cellbank_client: its generated code is missing; run clients/python/generate.py before installing it"
    ) from missing

from . import errors, retry, tls
from ._gen.cellbank.v1 import ledger_pb2_grpc as pb_grpc
from .client import CellbankClient, admin_plane, open_channel, result_name, settlement_name
from .errors import CellbankError, ErrorDetails, FieldViolation, decode_error
from .retry import Backoff, RetryPolicy, retryable
from .tls import Tls, TlsError

__all__ = [
    "Backoff",
    "CellbankClient",
    "CellbankError",
    "ErrorDetails",
    "FieldViolation",
    "RetryPolicy",
    "Tls",
    "TlsError",
    "decode_error",
    "errors",
    "admin_plane",
    "open_channel",
    "pb",
    "pb_grpc",
    "result_name",
    "retry",
    "retryable",
    "settlement_name",
    "tls",
]
