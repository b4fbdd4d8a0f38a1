"""The TLS credentials, without a cluster: reading a certificate directory
and its errors, the choice between TLS and plaintext, and (when the
``openssl`` command is there to make a CA) a mutual-TLS call to an
in-process gRPC server that proves ``local.cellbank`` on a loopback
address, as a cluster's routers do."""

from __future__ import annotations

import pathlib
import secrets
import shutil
import subprocess
import tempfile
import unittest
from concurrent import futures

import grpc

from cellbank_client import CellbankClient, CellbankError, Tls, TlsError, open_channel, pb, pb_grpc
from cellbank_client.tls import OPERATOR_ADMIN, SERVICE_CLI, server_name

# Well-formed PEM blocks (their contents are never parsed here).
CA = b"-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n"
CERT = b"-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\na2V5\n-----END PRIVATE KEY-----\n"


class TlsFiles(unittest.TestCase):
    def setUp(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="cellbank-py-tls-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        (self.dir / "ca.pem").write_bytes(CA)
        (self.dir / f"{SERVICE_CLI}.pem").write_bytes(CERT)
        (self.dir / f"{SERVICE_CLI}.key").write_bytes(KEY)

    def test_a_directory_gives_the_ca_and_one_identitys_certificate_and_key(self):
        tls = Tls.from_dir(self.dir, SERVICE_CLI)
        self.assertEqual((tls.root_certificates, tls.certificate_chain, tls.private_key), (CA, CERT, KEY))
        self.assertEqual(tls.cluster, "local")
        self.assertEqual(tls.server_name, "local.cellbank")
        self.assertEqual(tls.channel_options(), [("grpc.ssl_target_name_override", "local.cellbank")])
        self.assertEqual(tls.source, str(self.dir / "service-cli.pem"))
        self.assertIsInstance(tls.credentials(), grpc.ChannelCredentials)
        self.assertNotIn("PRIVATE KEY", repr(tls), "the key stays out of repr")

        other = Tls.from_files(
            str(self.dir / "ca.pem"), self.dir / "service-cli.pem", self.dir / "service-cli.key", cluster="prod-eu-1"
        )
        self.assertEqual(other.server_name, "prod-eu-1.cellbank")
        self.assertEqual(server_name("prod-eu-1"), "prod-eu-1.cellbank")
        self.assertEqual(Tls(CA.decode(), CERT.decode(), KEY.decode()), Tls(CA, CERT, KEY), "PEM as text or bytes")

    def test_a_missing_file_is_an_error_naming_it(self):
        with self.assertRaises(TlsError) as missing:
            Tls.from_dir(self.dir, OPERATOR_ADMIN)  # only service-cli's files are there
        self.assertIn(str(self.dir / "operator-admin.pem"), str(missing.exception))
        self.assertIn("cellbank up", str(missing.exception), "it says where the files come from")
        self.assertIsInstance(missing.exception.__cause__, FileNotFoundError)

        (self.dir / "service-cli.key").unlink()
        with self.assertRaises(TlsError) as no_key:
            Tls.from_dir(self.dir, SERVICE_CLI)
        self.assertIn(str(self.dir / "service-cli.key"), str(no_key.exception))

        with self.assertRaises(TlsError) as no_ca:
            Tls.from_files(self.dir / "nowhere.pem", self.dir / "service-cli.pem", self.dir / "service-cli.key")
        self.assertIn("nowhere.pem", str(no_ca.exception))

    def test_a_file_without_its_pem_block_is_an_error(self):
        (self.dir / "service-cli.key").write_bytes(CERT)  # a certificate where the key should be
        with self.assertRaises(TlsError) as wrong:
            Tls.from_dir(self.dir, SERVICE_CLI)
        self.assertIn("service-cli.key: no PRIVATE KEY block", str(wrong.exception))

        (self.dir / "ca.pem").write_bytes(CA[: len(CA) // 2])  # cut short while written
        with self.assertRaises(TlsError) as cut:
            Tls.from_dir(self.dir, SERVICE_CLI)
        self.assertIn("ca.pem: no CERTIFICATE block", str(cut.exception))

        with self.assertRaises(TlsError):
            Tls(CA, CERT, b"not a key")

    def test_bad_names_are_refused(self):
        for cluster in ("", "Local", "-local", "local-", "a.b", "x" * 64):
            with self.subTest(cluster=cluster), self.assertRaises(ValueError):
                Tls.from_dir(self.dir, SERVICE_CLI, cluster=cluster)
        for stem in ("", "..", "../service-cli"):
            with self.subTest(stem=stem), self.assertRaises(ValueError):
                Tls.from_dir(self.dir, stem)

    def test_plaintext_only_when_asked_for(self):
        tls = Tls.from_dir(self.dir, SERVICE_CLI)
        with self.assertRaises(ValueError) as neither:
            CellbankClient("127.0.0.1:7000")
        self.assertIn("insecure=True", str(neither.exception))
        with self.assertRaises(ValueError):
            CellbankClient("127.0.0.1:7000", tls=tls, insecure=True)
        with self.assertRaises(ValueError):
            open_channel("127.0.0.1:7000")
        with self.assertRaises(TypeError):
            CellbankClient("127.0.0.1:7000", tls=str(self.dir))  # type: ignore[arg-type]
        # Neither connects before a call.
        with CellbankClient("127.0.0.1:7000", tls=tls) as client:
            self.assertIs(client.tls, tls)
        with CellbankClient("127.0.0.1:7000", insecure=True) as client:
            self.assertIsNone(client.tls)


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(dir: pathlib.Path, ca: str, stem: str, san: str) -> None:
    """``<stem>.pem`` and ``<stem>.key`` (PKCS#8, ECDSA P-256) signed by ``ca``."""
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{stem}.key", cwd=dir)
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", f"/CN={stem}", "-out", f"{stem}.csr", cwd=dir)
    (dir / f"{stem}.ext").write_text(
        f"subjectAltName = {san}\nbasicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth, clientAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial",
        str(secrets.randbits(63) + 1), "-days", "2", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem", cwd=dir,
    )  # fmt: skip


def _make_ca(dir: pathlib.Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=dir)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
        "-addext", "basicConstraints = critical, CA:TRUE", "-addext", "keyUsage = critical, keyCertSign, cRLSign",
        "-out", f"{name}.pem", cwd=dir,
    )  # fmt: skip


class _Ledger(pb_grpc.LedgerServicer):
    """Answers GetAccount, and remembers the certificate each caller proved."""

    def __init__(self):
        self.callers = []

    def GetAccount(self, request, context):
        self.callers.append(dict(context.auth_context()))
        return pb.GetAccountResponse(user_id=request.user_id, currency=request.currency, balance=42)


@unittest.skipUnless(shutil.which("openssl"), "the openssl command makes the test CA")
class MutualTls(unittest.TestCase):
    """A call over mutual TLS to a server proving ``local.cellbank`` on
    127.0.0.1, and the connections that must fail."""

    @classmethod
    def setUpClass(cls):
        cls.dir = pathlib.Path(tempfile.mkdtemp(prefix="cellbank-py-mtls-"))
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        _make_ca(cls.dir, "ca")
        _issue(cls.dir, "ca", "router-1", "DNS:local.cellbank, URI:cellbank://local/router/1")
        _issue(cls.dir, "ca", SERVICE_CLI, "URI:cellbank://local/service/cli")
        # Another cluster's CA, for a client that must not trust this server.
        other = cls.dir / "other"
        other.mkdir()
        _make_ca(other, "ca")
        _issue(other, "ca", SERVICE_CLI, "URI:cellbank://other/service/cli")

        cls.ledger = _Ledger()
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_LedgerServicer_to_server(cls.ledger, cls.server)
        read = lambda name: (cls.dir / name).read_bytes()  # noqa: E731
        credentials = grpc.ssl_server_credentials(
            [(read("router-1.key"), read("router-1.pem"))], root_certificates=read("ca.pem"), require_client_auth=True
        )
        cls.target = f"127.0.0.1:{cls.server.add_secure_port('127.0.0.1:0', credentials)}"
        cls.server.start()
        cls.addClassCleanup(cls.server.stop, None)

    def setUp(self):
        self.ledger.callers.clear()

    def test_a_client_with_the_cluster_ca_and_a_certificate_is_answered(self):
        tls = Tls.from_dir(self.dir, SERVICE_CLI)
        with CellbankClient(self.target, tls=tls, deadline=10.0) as client:
            self.assertEqual(client.balance(7), 42)
        [caller] = self.ledger.callers
        self.assertEqual(caller.get("transport_security_type"), [b"ssl"])
        proved = b"".join(caller.get("x509_pem_cert", []))
        self.assertEqual(proved.strip(), tls.certificate_chain.strip(), "the server saw the client's certificate")

        # The same over a channel for the generated stubs.
        with open_channel(self.target, tls=tls) as channel:
            answer = pb_grpc.LedgerStub(channel).GetAccount(pb.GetAccountRequest(user_id=8, currency="CNY"), timeout=10)
        self.assertEqual(answer.balance, 42)

    def refused(self, **security) -> CellbankError:
        with CellbankClient(self.target, deadline=1.0, **security) as client:
            with self.assertRaises(CellbankError) as refused:
                client.get_account(7)
        return refused.exception

    def test_plaintext_to_a_tls_server_is_unavailable_and_reaches_nothing(self):
        error = self.refused(insecure=True)
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE, str(error))
        self.assertTrue(error.transport_failure)
        self.assertEqual(self.ledger.callers, [])

    def test_a_server_proving_another_clusters_name_is_refused(self):
        # The same CA, but the client asks for other.cellbank.
        error = self.refused(tls=Tls.from_dir(self.dir, SERVICE_CLI, cluster="other"))
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE, str(error))
        self.assertEqual(self.ledger.callers, [])

    def test_another_clusters_ca_and_certificate_are_refused(self):
        error = self.refused(tls=Tls.from_dir(self.dir / "other", SERVICE_CLI))
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE, str(error))
        self.assertEqual(self.ledger.callers, [])


if __name__ == "__main__":
    unittest.main()
