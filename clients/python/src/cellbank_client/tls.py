"""Mutual TLS to a cellbank cluster (as the Rust crate's ``client/src/tls.rs``).

Every gRPC connection of a cluster is mutual TLS (TLS 1.3): one CA per
cluster signs every certificate, a client proves who it is with its own
certificate, and every server proves the DNS name ``<cluster>.cellbank``
(``local.cellbank`` for the default cluster ``local``), which a client asks
for whatever address it dials. ``cellbank up`` makes the files on its first
start in ``<data_dir>/certs`` (``data/local/certs`` for ``./scripts/up.sh``):

- ``ca.pem``: the cluster CA's certificate, the only issuer trusted;
- ``<stem>.pem`` and ``<stem>.key``: one identity's certificate and
  private key (PKCS#8 PEM), e.g. ``service-cli`` (a service: the Ledger
  API) and ``operator-admin`` (an operator: the routers' admin API too).

::

    tls = Tls.from_dir("data/local/certs", "service-cli")
    client = CellbankClient("127.0.0.1:7000", tls=tls)

A cluster started with ``insecure = true`` serves plaintext; a client
reaches it only when it asks for that (``insecure=True``).
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import grpc

PathLike = Union[str, os.PathLike]
Pem = Union[bytes, str]

#: The cluster's name when its topology names none.
CLUSTER_DEFAULT = "local"
#: The default service identity ``cellbank up`` issues (the Ledger API).
SERVICE_CLI = "service-cli"
#: The default operator identity ``cellbank up`` issues (RouterAdmin, and the Ledger API).
OPERATOR_ADMIN = "operator-admin"
#: The CA's file in a certificate directory.
CA_FILE = "ca.pem"

# A cluster's name, as the Rust crate accepts it (tls.rs `valid_cluster`).
_CLUSTER = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Whole PEM blocks (a file cut short has no END line).
_CERTIFICATE_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")
_PRIVATE_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:[A-Z]+ )?PRIVATE KEY)-----[A-Za-z0-9+/=\s]+-----END \1-----")


class TlsError(Exception):
    """Credentials that cannot be used: a file missing or unreadable (the
    ``OSError`` is the ``__cause__``), or not the PEM it should be."""


def server_name(cluster: str) -> str:
    """The DNS name every server of ``cluster`` proves: ``<cluster>.cellbank``."""
    return f"{cluster}.cellbank"


def _check_cluster(cluster: str) -> None:
    if not isinstance(cluster, str) or not _CLUSTER.match(cluster):
        raise ValueError(f"{cluster!r} is not a cluster name (1 to 63 of a-z, 0-9 and '-', not at either end)")


def _as_bytes(pem: Pem) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else bytes(pem)


def _pem_problem(data: bytes, key: bool) -> Optional[str]:
    """Why ``data`` is not the PEM it should be (None when it is)."""
    if key:
        return None if _PRIVATE_KEY_BLOCK.search(data) else "no PRIVATE KEY block"
    return None if _CERTIFICATE_BLOCK.search(data) else "no CERTIFICATE block"


def _read(path: pathlib.Path, key: bool, hint: str = "") -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsError(f"reading {path}: {error.strerror or error}{hint}") from error
    problem = _pem_problem(data, key)
    if problem:
        raise TlsError(f"{path}: {problem}")
    return data


@dataclass(frozen=True)
class Tls:
    """One identity's credentials for a cluster: the CA to trust, the
    certificate chain to present (leaf first) and its private key, all PEM.

    Build it from files (:meth:`from_files`, :meth:`from_dir`) or from PEM
    held elsewhere (``Tls(ca_pem, cert_pem, key_pem, cluster=...)``).
    ``cluster`` names the server certificate a client accepts
    (``<cluster>.cellbank``), whatever address it dials. The key never
    appears in ``repr``.
    """

    #: The cluster CA's certificate(s), PEM.
    root_certificates: bytes = field(repr=False)
    #: This identity's certificate chain, PEM, leaf first.
    certificate_chain: bytes = field(repr=False)
    #: This identity's private key, PEM.
    private_key: bytes = field(repr=False)
    #: The cluster's name (``local`` unless its topology says otherwise).
    cluster: str = CLUSTER_DEFAULT
    #: Where the certificate was read from, if from a file (for messages).
    source: Optional[str] = None

    def __post_init__(self) -> None:
        _check_cluster(self.cluster)
        for name, key in (("root_certificates", False), ("certificate_chain", False), ("private_key", True)):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray, memoryview, str)):
                raise TypeError(f"Tls.{name}: PEM bytes or text, not {type(value).__name__}")
            data = _as_bytes(value)
            object.__setattr__(self, name, data)
            problem = _pem_problem(data, key)
            if problem:
                raise TlsError(f"Tls.{name}: {problem}")

    @classmethod
    def from_files(
        cls, ca_path: PathLike, cert_path: PathLike, key_path: PathLike, *, cluster: str = CLUSTER_DEFAULT
    ) -> "Tls":
        """Reads the CA's certificate, this identity's certificate and its
        key from three PEM files, now (a later change to them is not seen:
        make a new client). Raises :class:`TlsError` naming the file."""
        _check_cluster(cluster)
        ca, cert, key = (pathlib.Path(os.fspath(p)) for p in (ca_path, cert_path, key_path))
        return cls(_read(ca, False), _read(cert, False), _read(key, True), cluster=cluster, source=str(cert))

    @classmethod
    def from_dir(cls, directory: PathLike, identity: str, *, cluster: str = CLUSTER_DEFAULT) -> "Tls":
        """The files ``cellbank up`` (or ``cellbank certs init``) writes in
        ``directory`` for ``identity``, a file stem such as ``service-cli``
        or ``operator-admin``: ``ca.pem``, ``<identity>.pem``,
        ``<identity>.key``. Raises :class:`TlsError` naming the file."""
        _check_cluster(cluster)
        if not identity or identity in (".", "..") or "/" in identity or os.sep in identity:
            raise ValueError(f"{identity!r} is not an identity's file stem (such as {SERVICE_CLI!r})")
        folder = pathlib.Path(os.fspath(directory))
        hint = (
            " (`cellbank up` makes the certificates in <data_dir>/certs on its first start;"
            " `cellbank certs init` makes them for a topology)"
        )
        ca = _read(folder / CA_FILE, False, hint)
        cert = _read(folder / f"{identity}.pem", False, hint)
        key = _read(folder / f"{identity}.key", True, hint)
        return cls(ca, cert, key, cluster=cluster, source=str(folder / f"{identity}.pem"))

    @property
    def server_name(self) -> str:
        """The name the servers must prove: ``<cluster>.cellbank``."""
        return server_name(self.cluster)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials: trust only the cluster CA, present this
        identity's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> List[Tuple[str, str]]:
        """The channel options that make the server prove
        :attr:`server_name`, whatever address is dialed."""
        return [("grpc.ssl_target_name_override", self.server_name)]


__all__ = [
    "CA_FILE",
    "CLUSTER_DEFAULT",
    "OPERATOR_ADMIN",
    "SERVICE_CLI",
    "Tls",
    "TlsError",
    "server_name",
]
