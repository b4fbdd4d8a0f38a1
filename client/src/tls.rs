//! Mutual TLS between every process of a cluster, and the identities its
//! certificates carry.
//!
//! One CA per cluster signs every certificate. A certificate names its
//! holder in a URI subject-alternative name ([`Identity`]):
//! `cellbank://<cluster>/cell/3/replica/2`, `cellbank://<cluster>/router/1`,
//! `cellbank://<cluster>/service/<name>`, `cellbank://<cluster>/operator/<name>`.
//! Certificates of processes that serve (replicas, routers) also carry the
//! DNS name `<cluster>.cellbank`, which every client asks for: a server
//! certificate of another cluster, or one no CA of this cluster signed, is
//! refused in the handshake. TLS 1.3 only, both ways.
//!
//! [`Credentials`] holds a process's CA, certificate and key, loaded from
//! PEM files and reloaded when a file changes (checked at most once a
//! second, on the next handshake): a renewed certificate is used by the
//! next connection, no restart. A file that fails to load keeps the last
//! good set and says why in the log.
//!
//! Servers accept through [`incoming`], which finishes each handshake off
//! the accept loop (bounded by [`HANDSHAKE_TIMEOUT`]), reads the caller's
//! identity once per connection, and hands tonic a connection whose
//! [`PeerInfo`] every request of it carries. Clients connect through
//! [`connector`]; [`crate::ChannelSettings`] uses the credentials
//! installed for the process ([`use_credentials`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::throttle::Throttle;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes under way at once per listener; more wait to be accepted.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
/// How often the certificate files are looked at for a change.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Who holds a certificate: the URI in its subject-alternative name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A replica of a cell's Raft group.
    Replica { cluster: String, cell: u64, replica: u64 },
    /// A router (a member of the routing table's group).
    Router { cluster: String, router: u64 },
    /// An internal service calling the ledger API, under a policy.
    Service { cluster: String, name: String },
    /// A person running admin commands.
    Operator { cluster: String, name: String },
}

/// What an identity is, without its numbers or name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Replica,
    Router,
    Service,
    Operator,
}

/// Why a text is not an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a cellbank identity (cellbank://<cluster>/<kind>/...)")]
    Scheme(String),
    #[error("{0:?}: a cluster or name is 1 to 63 of a-z, 0-9 and '-' (names may also use A-Z, '.' and '_')")]
    Name(String),
    #[error("{0:?}: expected cell/<n>/replica/<m>, router/<n>, service/<name> or operator/<name>")]
    Shape(String),
}

fn valid_cluster(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

fn valid_name(text: &str) -> bool {
    (1..=63).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl Identity {
    /// Reads `cellbank://<cluster>/<kind>/...`.
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri.strip_prefix("cellbank://").ok_or_else(|| IdentityError::Scheme(uri.into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let cluster = parts[0];
        if !valid_cluster(cluster) {
            return Err(IdentityError::Name(uri.into()));
        }
        let cluster = cluster.to_string();
        let number =
            |text: &str| text.parse::<u64>().ok().filter(|n| *n > 0 && text.bytes().all(|b| b.is_ascii_digit()));
        let shape = || IdentityError::Shape(uri.into());
        match parts[1..] {
            ["cell", cell, "replica", replica] => Ok(Identity::Replica {
                cluster,
                cell: number(cell).ok_or_else(shape)?,
                replica: number(replica).ok_or_else(shape)?,
            }),
            ["router", router] => Ok(Identity::Router { cluster, router: number(router).ok_or_else(shape)? }),
            ["service", name] | ["operator", name] if !valid_name(name) => Err(IdentityError::Name(uri.into())),
            ["service", name] => Ok(Identity::Service { cluster, name: name.into() }),
            ["operator", name] => Ok(Identity::Operator { cluster, name: name.into() }),
            _ => Err(shape()),
        }
    }

    pub fn cluster(&self) -> &str {
        match self {
            Identity::Replica { cluster, .. }
            | Identity::Router { cluster, .. }
            | Identity::Service { cluster, .. }
            | Identity::Operator { cluster, .. } => cluster,
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Identity::Replica { .. } => Role::Replica,
            Identity::Router { .. } => Role::Router,
            Identity::Service { .. } => Role::Service,
            Identity::Operator { .. } => Role::Operator,
        }
    }

    /// The identity without its scheme and cluster: `cell/3/replica/2`.
    pub fn path(&self) -> String {
        match self {
            Identity::Replica { cell, replica, .. } => format!("cell/{cell}/replica/{replica}"),
            Identity::Router { router, .. } => format!("router/{router}"),
            Identity::Service { name, .. } => format!("service/{name}"),
            Identity::Operator { name, .. } => format!("operator/{name}"),
        }
    }

    /// True for the processes of the cluster (replicas and routers), whose
    /// certificates also serve.
    pub fn is_process(&self) -> bool {
        matches!(self.role(), Role::Replica | Role::Router)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cellbank://{}/{}", self.cluster(), self.path())
    }
}

/// The DNS name every serving certificate of `cluster` carries and every
/// client of it asks for.
pub fn server_dns_name(cluster: &str) -> String {
    format!("{cluster}.cellbank")
}

/// Where a process's CA, certificate and key are (PEM files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA's certificate: the only issuer trusted.
    pub ca: PathBuf,
    /// This process's certificate (its chain, leaf first).
    pub cert: PathBuf,
    /// This process's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl TlsPaths {
    /// The files `certs init` writes for `name` in `dir`: `ca.pem`,
    /// `<name>.pem`, `<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsPaths {
        TlsPaths { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }
}

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("{path}: the certificate names no cellbank identity: {why}")]
    NoIdentity { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("{path}: the certificate is {found}, but this process is {expected}")]
    WrongIdentity { path: PathBuf, found: Identity, expected: String },
    #[error(
        "no TLS credentials: give this process its CA, certificate and key ([tls] in its config; \
         `cellbank certs init` makes them), or set `insecure = true` to run without TLS (never in production)"
    )]
    Missing,
}

/// The credentials of a server process whose identity is `expected`
/// (`cell/3/replica/2`, `router/1`), from its config's `tls` and
/// `insecure`: loaded and checked when given; `None` (plaintext, logged as
/// a warning) only when `insecure` is set; an error otherwise.
/// The cluster name a configuration has when it names none.
pub const DEFAULT_CLUSTER: &str = "local";

/// For serde defaults.
pub fn default_cluster() -> String {
    DEFAULT_CLUSTER.into()
}

pub fn server_credentials(
    tls: Option<&TlsPaths>,
    insecure: bool,
    cluster: &str,
    expected: &str,
) -> Result<Option<Arc<Credentials>>, TlsError> {
    match tls {
        Some(paths) => {
            let credentials = Credentials::load(paths.clone())?;
            let found = credentials.identity();
            if found.path() != expected || found.cluster() != cluster {
                let expected = format!("cellbank://{cluster}/{expected}");
                return Err(TlsError::WrongIdentity { path: paths.cert.clone(), found, expected });
            }
            if insecure {
                tracing::warn!("insecure = true is ignored: TLS credentials are given and used");
            }
            Ok(Some(credentials))
        }
        None if insecure => {
            tracing::warn!(
                process = expected,
                "INSECURE: no TLS; any process that reaches this one's port can call every service as anyone"
            );
            Ok(None)
        }
        None => Err(TlsError::Missing),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })
}

fn certs_of(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.into(), what: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

fn key_of(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Pem { path: path.into(), what: e.to_string() })?
        .ok_or_else(|| TlsError::Pem { path: path.into(), what: "no PRIVATE KEY block".into() })
}

/// The identity a certificate (DER) names in its URI subject-alternative
/// name; exactly one `cellbank://` URI is allowed.
pub fn identity_of(cert: &[u8]) -> Result<Identity, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("not a certificate: {e}"))?;
    let san = parsed.subject_alternative_name().map_err(|e| format!("bad subject-alternative name: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("cellbank://") => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|e| e.to_string()),
        [] => Err("no cellbank:// URI in its subject-alternative names".into()),
        _ => Err("more than one cellbank:// URI in its subject-alternative names".into()),
    }
}

/// The ring provider: it builds with a C compiler alone (no cmake), and
/// TLS 1.3 with X25519 and ECDSA P-256 is what the cluster uses. (rustls
/// marks it deprecated for lacking post-quantum key exchange.)
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded set: what handshakes use until the files change.
struct Loaded {
    identity: Identity,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    stamps: Vec<Option<SystemTime>>,
}

fn stamps(paths: &TlsPaths) -> Vec<Option<SystemTime>> {
    [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

fn load(paths: &TlsPaths) -> Result<Loaded, TlsError> {
    let stamps = stamps(paths);
    let mut roots = RootCertStore::empty();
    for ca in certs_of(&paths.ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem { path: paths.ca.clone(), what: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let chain = certs_of(&paths.cert)?;
    let key = key_of(&paths.key)?;
    let identity = identity_of(&chain[0]).map_err(|why| TlsError::NoIdentity { path: paths.cert.clone(), why })?;
    let versions = &[&rustls::version::TLS13];
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = ServerName::try_from(server_dns_name(identity.cluster()))
        .map_err(|e| TlsError::Verifier(format!("cluster name: {e}")))?;
    Ok(Loaded { identity, server: Arc::new(server), client: Arc::new(client), server_name, stamps })
}

/// A process's TLS credentials, reloaded when their files change.
pub struct Credentials {
    paths: TlsPaths,
    loaded: RwLock<Arc<Loaded>>,
    checked: Mutex<Instant>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("paths", &self.paths).field("identity", &self.identity()).finish()
    }
}

impl Credentials {
    /// Loads the files now; an error names the file and what is wrong.
    pub fn load(paths: TlsPaths) -> Result<Arc<Credentials>, TlsError> {
        let loaded = load(&paths)?;
        Ok(Arc::new(Credentials { paths, loaded: RwLock::new(Arc::new(loaded)), checked: Mutex::new(Instant::now()) }))
    }

    /// The identity of the certificate in use.
    pub fn identity(&self) -> Identity {
        self.loaded.read().expect("credentials lock").identity.clone()
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// The set to use now: reloaded first when a file changed since the
    /// last look (at most one look a second).
    fn current(&self) -> Arc<Loaded> {
        let due = {
            let mut checked = self.checked.lock().expect("credentials lock");
            let due = checked.elapsed() >= RELOAD_CHECK_EVERY;
            if due {
                *checked = Instant::now();
            }
            due
        };
        let loaded = self.loaded.read().expect("credentials lock").clone();
        if !due || stamps(&self.paths) == loaded.stamps {
            return loaded;
        }
        match load(&self.paths) {
            Ok(fresh) => {
                if fresh.identity != loaded.identity {
                    tracing::warn!(old = %loaded.identity, new = %fresh.identity, "the reloaded certificate names another identity");
                }
                tracing::info!(identity = %fresh.identity, cert = %self.paths.cert.display(), "certificates reloaded");
                let fresh = Arc::new(fresh);
                *self.loaded.write().expect("credentials lock") = fresh.clone();
                fresh
            }
            Err(error) => {
                tracing::warn!(%error, "certificate files changed but do not load; keeping the last good set");
                loaded
            }
        }
    }

    /// Forces the next handshake to look at the files (tests of reload).
    pub fn check_now(&self) {
        *self.checked.lock().expect("credentials lock") = Instant::now() - RELOAD_CHECK_EVERY;
    }
}

static PROCESS_CREDENTIALS: RwLock<Option<Arc<Credentials>>> = RwLock::new(None);

/// Installs the credentials every channel of this process connects with
/// (`None`: plaintext, which only an explicitly insecure process uses).
pub fn use_credentials(credentials: Option<Arc<Credentials>>) {
    *PROCESS_CREDENTIALS.write().expect("credentials lock") = credentials;
}

/// The credentials installed for this process.
pub fn process_credentials() -> Option<Arc<Credentials>> {
    PROCESS_CREDENTIALS.read().expect("credentials lock").clone()
}

/// What a server knows of the caller of a request: the address it called
/// from and, over TLS, the identity its certificate proved.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    pub identity: Option<Arc<Identity>>,
}

/// One accepted connection, plaintext or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection with what is known of its caller.
pub struct ServerConn {
    io: Conn,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }
}

/// What the accept loop reports of a connection it refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The TLS handshake failed (no certificate, another CA, a protocol
    /// error) or took longer than [`HANDSHAKE_TIMEOUT`].
    Failed(String),
    /// The certificate is the cluster CA's but names no identity of this
    /// cluster.
    NoIdentity(String),
    /// The address failed lately: the connection waits this long before
    /// its handshake starts (or, with too many waiting, is closed).
    Throttled(Duration),
    /// The identity has no business on this listener's plane
    /// ([`crate::planes`]).
    WrongPlane(String),
}

/// Decides, once per connection after its handshake, whether the proven
/// identity may hold a connection to this listener.
pub type ConnectionFilter = Arc<dyn Fn(&Identity) -> Result<(), String> + Send + Sync>;

/// Called for every refused connection (metrics and the audit trail).
pub type HandshakeObserver = Arc<dyn Fn(IpAddr, &HandshakeRefusal) + Send + Sync>;

/// Connections from barred addresses waiting for their bar to end, at
/// most, per listener; more are closed at once.
pub const DELAYED_CONNECTIONS_MAX: usize = 64;

/// Failed handshakes from one address that hold nothing back yet: a
/// client started with a wrong setting retries a few times, and the other
/// clients on its host must not wait for it.
pub const HANDSHAKE_FAILURES_FREE: u32 = 8;

/// The throttle of failed handshakes: past [`HANDSHAKE_FAILURES_FREE`]
/// failures, an address's next connections wait 100 ms, doubling to 5 s.
pub fn handshake_throttle() -> Throttle<IpAddr> {
    Throttle::new(Duration::from_millis(100), Duration::from_secs(5), Duration::from_secs(300))
        .with_free(HANDSHAKE_FAILURES_FREE)
}

/// The connections of `listener`, each past its TLS handshake when
/// `credentials` are given (plaintext otherwise) and its proven identity
/// let in by `admit` (the listener's plane). Failed handshakes are
/// reported to `observer` and throttled per address: after a failure, an
/// address's new connections wait until its bar ends before their
/// handshake starts (a time that doubles with each failure, see
/// [`Throttle`]), and past [`DELAYED_CONNECTIONS_MAX`] waiting they are
/// closed unanswered. Connections already open are not touched, so a
/// cluster's own processes sharing an address with a failing caller keep
/// their connections. The stream ends when the server drops it.
pub fn incoming(
    listener: TcpListener,
    credentials: Option<Arc<Credentials>>,
    throttle: Arc<Throttle<IpAddr>>,
    observer: HandshakeObserver,
    admit: ConnectionFilter,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<ServerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
    let delayed = Arc::new(tokio::sync::Semaphore::new(DELAYED_CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, addr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(credentials) = credentials.clone() else {
                let conn = ServerConn { io: Conn::Plain(stream), info: PeerInfo { addr: Some(addr), identity: None } };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let wait = throttle.barred(&addr.ip());
            let delay_permit = match wait {
                None => None,
                Some(left) => {
                    observer(addr.ip(), &HandshakeRefusal::Throttled(left));
                    match delayed.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        // Too many waiting already: closed unanswered.
                        Err(_) => continue,
                    }
                }
            };
            let (tx, throttle, observer, handshakes, admit) =
                (tx.clone(), throttle.clone(), observer.clone(), handshakes.clone(), admit.clone());
            tokio::spawn(async move {
                if let Some(left) = wait {
                    tokio::time::sleep(left).await;
                }
                drop(delay_permit);
                let Ok(_permit) = handshakes.acquire_owned().await else { return };
                match handshake(stream, addr, &credentials, &admit).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(refusal) => {
                        throttle.failed(addr.ip());
                        observer(addr.ip(), &refusal);
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    credentials: &Credentials,
    admit: &ConnectionFilter,
) -> Result<ServerConn, HandshakeRefusal> {
    let loaded = credentials.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(loaded.server.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return Err(HandshakeRefusal::Failed(error.to_string())),
        Err(_) => return Err(HandshakeRefusal::Failed(format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))),
    };
    let leaf = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first());
    let identity = match leaf.map(|cert| identity_of(cert)) {
        Some(Ok(identity)) if identity.cluster() == loaded.identity.cluster() => identity,
        Some(Ok(identity)) => return Err(HandshakeRefusal::NoIdentity(format!("{identity} is of another cluster"))),
        Some(Err(why)) => return Err(HandshakeRefusal::NoIdentity(why)),
        None => return Err(HandshakeRefusal::Failed("no client certificate".into())),
    };
    admit(&identity).map_err(HandshakeRefusal::WrongPlane)?;
    Ok(ServerConn {
        io: Conn::Tls(Box::new(tls)),
        info: PeerInfo { addr: Some(addr), identity: Some(Arc::new(identity)) },
    })
}

/// Which server a client accepts, checked after each handshake against
/// the identity its certificate proves (every server's certificate also
/// names the cluster, which the handshake checks): a client that knows
/// what it dials does not talk to another process of the cluster that
/// answers at that address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any process of the cluster (a client given a list of addresses that
    /// may be routers or replicas).
    Any,
    Router,
    /// A replica, of one cell when given.
    Replica(Option<u64>),
}

impl Expect {
    pub fn check(self, identity: &Identity) -> Result<(), String> {
        let fits = match (self, identity) {
            (Expect::Any, identity) => identity.is_process(),
            (Expect::Router, Identity::Router { .. }) => true,
            (Expect::Replica(None), Identity::Replica { .. }) => true,
            (Expect::Replica(Some(cell)), Identity::Replica { cell: theirs, .. }) => cell == *theirs,
            _ => false,
        };
        if fits {
            return Ok(());
        }
        let wanted = match self {
            Expect::Any => "a process of the cluster".to_string(),
            Expect::Router => "a router".to_string(),
            Expect::Replica(None) => "a replica".to_string(),
            Expect::Replica(Some(cell)) => format!("a replica of cell {cell}"),
        };
        Err(format!("the server is {identity}, not {wanted}"))
    }
}

/// A TLS connection of a client, as hyper wants it.
pub type ClientConn = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

/// The connector of a channel that dials `http://host:port` and speaks TLS
/// with `credentials` (the certificate presented, the CA trusted, the
/// cluster's server name asked for), from `local` when given, and keeps
/// the connection only to a server `expect` accepts.
pub fn connector(
    credentials: Arc<Credentials>,
    local: Option<IpAddr>,
    expect: Expect,
) -> impl tower::Service<
    http::Uri,
    Response = ClientConn,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = std::io::Result<ClientConn>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| {
        let credentials = credentials.clone();
        async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(80);
            let stream = match local {
                Some(ip) => {
                    let remote = tokio::net::lookup_host((host, port))
                        .await?
                        .next()
                        .ok_or_else(|| std::io::Error::other(format!("{uri}: no address")))?;
                    let socket = if remote.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(remote).await?
                }
                None => TcpStream::connect((host, port)).await?,
            };
            stream.set_nodelay(true)?;
            let loaded = credentials.current();
            let tls = tokio_rustls::TlsConnector::from(loaded.client.clone())
                .connect(loaded.server_name.clone(), stream)
                .await?;
            let server = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).map(|c| identity_of(c));
            match server {
                Some(Ok(identity)) => expect.check(&identity).map_err(std::io::Error::other)?,
                Some(Err(why)) => return Err(std::io::Error::other(format!("the server's certificate: {why}"))),
                None => return Err(std::io::Error::other("the server presented no certificate")),
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_accepts_only_the_server_it_expects() {
        let router = Identity::parse("cellbank://local/router/1").unwrap();
        let replica = Identity::parse("cellbank://local/cell/3/replica/2").unwrap();
        let service = Identity::parse("cellbank://local/service/payments").unwrap();
        assert!(Expect::Router.check(&router).is_ok());
        assert!(Expect::Router.check(&replica).unwrap_err().contains("not a router"));
        assert!(Expect::Replica(Some(3)).check(&replica).is_ok());
        assert!(Expect::Replica(Some(4)).check(&replica).unwrap_err().contains("not a replica of cell 4"));
        assert!(Expect::Replica(None).check(&router).is_err());
        assert!(Expect::Any.check(&router).is_ok() && Expect::Any.check(&replica).is_ok());
        // A service's or an operator's certificate never serves.
        assert!(Expect::Any.check(&service).is_err());
    }

    #[test]
    fn identities_read_back_what_they_print_and_refuse_anything_else() {
        for text in [
            "cellbank://local/cell/3/replica/2",
            "cellbank://prod-eu1/router/1",
            "cellbank://local/service/payments.v2",
            "cellbank://local/operator/alice",
        ] {
            assert_eq!(Identity::parse(text).unwrap().to_string(), text);
        }
        let id = Identity::parse("cellbank://local/cell/3/replica/2").unwrap();
        assert_eq!(id, Identity::Replica { cluster: "local".into(), cell: 3, replica: 2 });
        assert_eq!(id.role(), Role::Replica);
        for bad in [
            "https://local/router/1",
            "cellbank://Local/router/1",
            "cellbank:///router/1",
            "cellbank://local/router/0",
            "cellbank://local/router/+1",
            "cellbank://local/router/1/",
            "cellbank://local/cell/1",
            "cellbank://local/cell/1/replica/x",
            "cellbank://local/service/",
            "cellbank://local/service/a/b",
            "cellbank://local/operator/bad name",
            "cellbank://local/wizard/1",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
