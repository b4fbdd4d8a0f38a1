//! End-to-end harness: real `cellbank cell` processes on loopback, killed
//! with real signals, talked to over real gRPC.

#![allow(dead_code)]

pub mod cluster;
pub mod ledger_checks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellbank_client::CellClient;
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::{DigestRequest, DigestResponse, ReplicaStatus, StatusRequest};
use tonic::transport::Channel;

pub fn free_port() -> u16 {
    cellbank::supervisor::free_port()
}

/// The cluster name of every test cluster.
pub const CLUSTER: &str = "local";

/// The certificate directory of this test binary: one CA issues every
/// certificate of every cluster and cell its tests start (kept between runs
/// in cargo's temporary directory for tests; what is missing is issued),
/// and the tests call as its operator. Installed as the process's
/// credentials on the first call.
pub fn test_certs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("certs");
        cellbank::certs::ensure(&dir, CLUSTER, &cellbank::certs::client_identities(CLUSTER))
            .expect("test certificates");
        let operator = &cellbank::certs::client_identities(CLUSTER)[1];
        let credentials = cellbank_client::tls::Credentials::load(cellbank::certs::paths(&dir, operator))
            .expect("operator credentials");
        cellbank_client::tls::use_credentials(Some(credentials));
        dir
    })
}

/// The credentials of `path` (`router/1`, `service/payments`, ...) from
/// the test CA, issued if missing: for calls as another identity than the
/// tests' operator.
pub fn credentials_of(path: &str) -> std::sync::Arc<cellbank_client::tls::Credentials> {
    let identity = cellbank_client::tls::Identity::parse(&format!("cellbank://{CLUSTER}/{path}")).expect("identity");
    issue(std::slice::from_ref(&identity));
    cellbank_client::tls::Credentials::load(cellbank::certs::paths(test_certs(), &identity)).expect("credentials")
}

/// Issues `identities` in the test certificate directory if missing.
pub fn issue(identities: &[cellbank_client::tls::Identity]) {
    cellbank::certs::ensure(test_certs(), CLUSTER, identities).expect("issue test certificates");
}

pub struct Replica {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    /// Environment of the next start (fault points from the first instant).
    pub env: Vec<(String, String)>,
}

pub struct Cell {
    pub dir: tempfile::TempDir,
    pub replicas: BTreeMap<u64, Replica>,
    pub founders: BTreeMap<u64, String>,
}

impl Cell {
    /// Starts `n` founding replicas. `extra_args` go to every `cellbank cell`.
    pub fn start(n: u64, extra_args: &[&str]) -> Cell {
        Cell::start_in(tempfile::tempdir().expect("tempdir"), n, extra_args)
    }

    /// As `start`, with the replicas' data under `dir`.
    pub fn start_in(dir: tempfile::TempDir, n: u64, extra_args: &[&str]) -> Cell {
        let founders: BTreeMap<u64, String> = (1..=n).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let mut cell = Cell { dir, replicas: BTreeMap::new(), founders: founders.clone() };
        for (id, addr) in founders {
            let data_dir = cell.dir.path().join(format!("replica-{id}"));
            let extra = extra_args.iter().map(|s| s.to_string()).collect();
            cell.replicas.insert(id, Replica { id, addr, data_dir, child: None, extra_args: extra, env: Vec::new() });
            cell.spawn(id, true);
        }
        cell
    }

    /// Starts a replica that will join through a conf change (no founders).
    pub fn add_joiner(&mut self, id: u64, extra_args: &[&str]) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let data_dir = self.dir.path().join(format!("replica-{id}"));
        let extra = extra_args.iter().map(|s| s.to_string()).collect();
        self.replicas
            .insert(id, Replica { id, addr: addr.clone(), data_dir, child: None, extra_args: extra, env: Vec::new() });
        self.spawn(id, false);
        addr
    }

    pub fn spawn(&mut self, id: u64, founder: bool) {
        let peers: Vec<String> = self.founders.iter().map(|(id, addr)| format!("{id}={addr}")).collect();
        let replica = self.replicas.get_mut(&id).expect("known replica");
        assert!(replica.child.is_none(), "replica {id} already running");
        std::fs::create_dir_all(&replica.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(replica.data_dir.join("replica.log"))
            .expect("log file");
        issue(&[cellbank_client::tls::Identity::Replica { cluster: CLUSTER.into(), cell: 1, replica: id }]);
        let mut command = Command::new(env!("CARGO_BIN_EXE_cellbank"));
        command
            .args(["cell", "--cell-id", "1", "--replica-id", &id.to_string(), "--listen", &replica.addr])
            .arg("--data-dir")
            .arg(&replica.data_dir)
            .arg("--tls-dir")
            .arg(test_certs())
            .args(&replica.extra_args)
            .env("RUST_LOG", "info,raft=info")
            .envs(replica.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if founder {
            command.arg("--peer").arg(peers.join(","));
        }
        replica.child = Some(command.spawn().expect("spawn cellbank cell"));
    }

    /// Restarts a stopped replica with its data.
    pub fn restart(&mut self, id: u64) {
        let founder = self.founders.contains_key(&id);
        self.spawn(id, founder);
    }

    /// Waits up to `timeout` for a replica to end by itself (an injected
    /// crash), reaping it; false if it still runs.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> bool {
        let replica = self.replicas.get_mut(&id).expect("known replica");
        let started = Instant::now();
        while started.elapsed() < timeout {
            let child = replica.child.as_mut().expect("replica started");
            if child.try_wait().expect("poll the replica").is_some() {
                replica.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, id: u64) {
        let replica = self.replicas.get_mut(&id).expect("known replica");
        let mut child = replica.child.take().expect("replica running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.replicas.values().map(|r| r.addr.clone()).collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.replicas.values().filter(|r| r.child.is_some()).map(|r| r.id).collect()
    }

    pub fn client(&self) -> CellClient {
        CellClient::new(self.endpoints())
    }

    pub async fn admin(&self, id: u64) -> Option<ReplicaAdminClient<Channel>> {
        let addr = &self.replicas[&id].addr;
        let addr = cellbank_client::planes::Plane::Admin.of(addr);
        cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.ok().map(cellbank_client::channel::admin)
    }

    pub async fn status(&self, id: u64) -> Option<ReplicaStatus> {
        let mut admin = self.admin(id).await?;
        admin.status(StatusRequest {}).await.ok().map(|r| r.into_inner())
    }

    pub async fn digest(&self, id: u64) -> Option<DigestResponse> {
        let mut admin = self.admin(id).await?;
        admin.digest(DigestRequest {}).await.ok().map(|r| r.into_inner())
    }

    /// The leader among running replicas, once one is reported, with its term.
    pub async fn wait_for_leader(&self, timeout: Duration, newer_than_term: u64) -> Option<(u64, u64, Duration)> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            for id in self.running() {
                if let Some(status) = self.status(id).await {
                    if cellbank_client::is_leader(&status) && status.term > newer_than_term {
                        return Some((id, status.term, started.elapsed()));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits until every running replica has applied the same index, then
    /// returns their digests.
    pub async fn converged_digests(&self, timeout: Duration) -> BTreeMap<u64, DigestResponse> {
        let started = Instant::now();
        loop {
            let mut digests = BTreeMap::new();
            for id in self.running() {
                if let Some(digest) = self.digest(id).await {
                    digests.insert(id, digest);
                }
            }
            let applied: Vec<u64> = digests.values().map(|d| d.applied_index).collect();
            let all_same = digests.len() == self.running().len() && applied.windows(2).all(|w| w[0] == w[1]);
            if all_same {
                return digests;
            }
            assert!(started.elapsed() < timeout, "replicas did not converge: applied {applied:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for replica in self.replicas.values() {
            let log = std::fs::read_to_string(replica.data_dir.join("replica.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- replica {} ---\n", replica.id));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        for replica in self.replicas.values_mut() {
            if let Some(mut child) = replica.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// One call through a leader-following client that must succeed.
pub async fn call<T, F, Fut>(client: &CellClient, f: F) -> T
where
    F: Fn(cellbank_proto::v1::ledger_client::LedgerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    client.ledger(f).await.expect("a call through the routers")
}

/// Opens an account for each user and deposits `amount` (id `seed-<user>`).
pub async fn open_and_seed(client: &CellClient, users: &[u64], currency: &str, amount: u64) {
    use cellbank_proto::v1::{DepositRequest, OpenAccountRequest, ResultCode};
    for &user in users {
        let opened = call(client, |mut c| async move {
            c.open_account(OpenAccountRequest { user_id: user, currency: currency.into() }).await
        })
        .await;
        assert!(opened.code == ResultCode::Ok as i32 || opened.code == ResultCode::AccountAlreadyExists as i32);
        let seeded = call(client, |mut c| async move {
            c.deposit(DepositRequest {
                transfer_id_text: String::new(),
                transfer_id: format!("seed-{user}").into_bytes(),
                user_id: user,
                currency: currency.into(),
                amount,
            })
            .await
        })
        .await;
        assert_eq!(seeded.result.unwrap().code, ResultCode::Ok as i32);
    }
}

/// The sum of a metric's samples on a Prometheus endpoint over the lines
/// that name `name` and contain `label`; `None` when no line does (a
/// misspelt name must not read as zero).
pub async fn metric(addr: &str, name: &str, label: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
        socket.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        socket.read_to_string(&mut body).await.unwrap();
        body
    };
    let body = tokio::time::timeout(Duration::from_secs(5), read).await.expect("the metrics endpoint answers");
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() as u64)
}
