"""A real local cellbank cluster for the end-to-end tests.

``cellbank up`` (the binary named by ``CELLBANK_BIN``) runs one router and
two pairs of three-replica cells (cell 1 active with cell 3 its synchronous
standby, cell 2 with cell 4), on free loopback ports, in a temporary
directory: the shape of the README's local cluster and of the Rust
end-to-end tests. ``up`` and every process it starts share one process
group, which :meth:`LocalCluster.stop` kills whatever happened.

Every connection is mutual TLS: on its first start ``up`` makes the
cluster CA and the certificates in ``<data_dir>/certs``, among them the
service ``service-cli`` (the Ledger API) and the operator
``operator-admin`` (the routers' admin API, which the readiness wait
calls). :meth:`LocalCluster.tls` reads one identity's.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import grpc

from cellbank_client import Tls, TlsError, admin_plane, open_channel
from cellbank_client._gen.cellbank.router.v1 import router_pb2, router_pb2_grpc
from cellbank_client.tls import OPERATOR_ADMIN, SERVICE_CLI

__all__ = ["CLUSTER", "ClusterFailed", "LocalCluster", "OPERATOR_ADMIN", "SERVICE_CLI", "free_port", "slice_of"]

#: The cluster's name, in its topology and in the name its servers prove.
CLUSTER = "local"

_GIVEN_PORTS: set = set()


def free_port() -> int:
    """A loopback port nobody listens on, nor on the two after it (a
    process's peer and admin planes), below the kernel's ephemeral range (as
    cellbank's own supervisor picks them: an outgoing connection can take
    an ephemeral port between being chosen and being bound)."""
    for _ in range(10_000):
        port = random.randint(20_000, 31_997)
        ports = range(port, port + 3)
        if any(p in _GIVEN_PORTS for p in ports):
            continue
        if all(_bindable(p) for p in ports):
            _GIVEN_PORTS.update(ports)
            return port
    raise RuntimeError("no free loopback ports between 20000 and 32000")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slice_of(user_id: int, slice_count: int) -> int:
    """A user's slice: router/src/table.rs `slice_of` (a SplitMix64 finalizer)."""
    mask = (1 << 64) - 1
    x = (user_id + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x % max(slice_count, 1)


class ClusterFailed(RuntimeError):
    pass


class LocalCluster:
    PAIRS = 2
    REPLICAS = 3
    SLICES = 64

    def __init__(self, binary: str, start_timeout: float = 120.0):
        self.binary = binary
        self.start_timeout = start_timeout
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="cellbank-py-e2e-"))
        self.process: Optional[subprocess.Popen] = None
        self.router = ""
        self._log = None
        self._tls: Dict[str, Tls] = {}

    # -- lifecycle ----------------------------------------------------------

    def _topology(self) -> str:
        lines = [
            f'data_dir = "{self.dir / "data"}"',
            f"slice_count = {self.SLICES}",
            f'cluster = "{CLUSTER}"',
            "",
        ]
        self.router = f"127.0.0.1:{free_port()}"
        lines += ["[[routers]]", "id = 1", f'listen = "{self.router}"', ""]
        for cell in range(1, 2 * self.PAIRS + 1):
            replicas = ", ".join(
                f'{{ id = {r}, listen = "127.0.0.1:{free_port()}" }}' for r in range(1, self.REPLICAS + 1)
            )
            lines += ["[[cells]]", f"id = {cell}", f"replicas = [{replicas}]", ""]
        for pair in range(1, self.PAIRS + 1):
            lines += ["[[pairs]]", f"id = {pair}", f"active = {pair}", f"standby = {pair + self.PAIRS}", ""]
        return "\n".join(lines)

    def start(self) -> None:
        """Starts ``cellbank up`` and waits until the routing table is
        bootstrapped and every pair is SYNC. A port taken between being
        chosen and being bound (another test's cluster) is tried again."""
        for attempt in range(3):
            topology = self.dir / f"topology-{attempt}.toml"
            topology.write_text(self._topology())
            shutil.rmtree(self.dir / "data", ignore_errors=True)
            self._tls.clear()  # a new data directory, new certificates
            self._log = open(self.dir / "up.log", "ab")
            self.process = subprocess.Popen(
                [self.binary, "up", "--topology", str(topology), "--data-dir", str(self.dir / "data")],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, with every process it starts
            )
            try:
                self._wait_ready()
                return
            except ClusterFailed:
                taken = self._port_taken()
                self._kill()
                if not taken or attempt == 2:
                    raise

    def stop(self) -> None:
        """Stops every process of the cluster and removes its directory."""
        try:
            self._kill()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            # SIGTERM to the group: `up` stops its processes; then SIGKILL
            # for whatever is left (and for all of it if `up` hangs).
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    # -- certificates -----------------------------------------------------------

    @property
    def certs_dir(self) -> pathlib.Path:
        """Where ``up`` writes the CA and the certificates: ``<data_dir>/certs``."""
        return self.dir / "data" / "certs"

    def tls(self, identity: str = SERVICE_CLI) -> Tls:
        """One identity's credentials (``service-cli``, ``operator-admin``),
        read once the cluster has made them; :class:`TlsError` before."""
        tls = self._tls.get(identity)
        if tls is None:
            tls = self._tls[identity] = Tls.from_dir(self.certs_dir, identity, cluster=CLUSTER)
        return tls

    # -- readiness and the routing table -------------------------------------

    def status(self, timeout: float = 3.0) -> Optional[router_pb2.ClusterStatus]:
        """The coordinator's view (RouterAdmin.Status, as the operator), or
        None while it cannot answer (or its certificates are not made yet)."""
        try:
            operator = self.tls(OPERATOR_ADMIN)
        except TlsError:
            return None
        with open_channel(admin_plane(self.router), tls=operator) as channel:
            stub = router_pb2_grpc.RouterAdminStub(channel)
            try:
                return stub.Status(router_pb2.ClusterStatusRequest(), timeout=timeout)
            except grpc.RpcError:
                # Read again next time: files caught while being written.
                self._tls.pop(OPERATOR_ADMIN, None)
                return None

    def _wait_ready(self) -> None:
        started = time.monotonic()
        seen = "nothing yet"
        while time.monotonic() - started < self.start_timeout:
            if self.process is not None and self.process.poll() is not None:
                raise ClusterFailed(f"cellbank up exited ({self.process.returncode}):\n{self.diagnostics()}")
            if " exited (" in self.up_log():  # up's status line names a process that stopped
                raise ClusterFailed(f"a process of the cluster exited:\n{self.diagnostics()}")
            status = self.status()
            if status is not None:
                modes = {p.pair.pair_id: p.pair.mode for p in status.pairs}
                seen = ", ".join(
                    f"pair {pair} {router_pb2.PairMode.Name(mode)}" for pair, mode in sorted(modes.items())
                )
                if len(modes) == self.PAIRS and all(m == router_pb2.PAIR_MODE_SYNC for m in modes.values()):
                    self.ready_after = time.monotonic() - started
                    return
            time.sleep(0.2)
        raise ClusterFailed(f"not ready after {self.start_timeout} s ({seen}):\n{self.diagnostics()}")

    def pairs_of(self, users) -> Dict[int, int]:
        """user -> pair, from the routing table (as the routers route)."""
        status = self.status()
        if status is None:
            raise ClusterFailed("the router does not answer RouterAdmin.Status")
        table = status.table
        return {user: table.slice_pair[slice_of(user, table.slice_count)] for user in users}

    # -- diagnostics -----------------------------------------------------------

    def _port_taken(self) -> bool:
        """Whether the start failed on a port that something else took."""
        if "is taken" in self.up_log():
            return True
        data = self.dir / "data"
        logs = data.rglob("process.log") if data.exists() else []
        return any("in use" in log.read_text(errors="replace").lower() for log in logs)

    def up_log(self) -> str:
        path = self.dir / "up.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self, lines: int = 30) -> str:
        """The tails of up's output and of every process's log."""
        out: List[str] = []

        def tail(name: str, text: str) -> None:
            text = text.replace("\r", "\n")
            out.append(f"--- {name} ---")
            out.extend([line for line in text.splitlines() if line.strip()][-lines:])

        tail("cellbank up", self.up_log())
        data = self.dir / "data"
        if data.exists():
            for log in sorted(data.rglob("process.log")):
                tail(str(log.relative_to(data)), log.read_text(errors="replace"))
        return "\n".join(out)
