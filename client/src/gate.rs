//! Who may call what: the authorization layer in front of every gRPC
//! server of the project.
//!
//! A [`Policy`] is a list of rules, each a method path or a service prefix
//! (`/cellbank.cell.v1.ReplicaAdmin/Configure`, `/cellbank.cell.v1.Standby/`)
//! and the callers it admits ([`Allow`]); the longest matching path decides
//! and a path no rule names is refused (deny by default). The caller is the
//! identity its TLS certificate proved ([`crate::tls::PeerInfo`]); a request
//! let in carries it in its [`Refuser`], so handlers narrow further (the standby
//! admits only its source cell's replicas, the routers' audit log records
//! who) and never trust a name the request itself gives; a handler that
//! refuses a caller does so through the request's [`Refuser`], so its
//! refusals are counted, audited and throttled as the gate's are.
//!
//! A refusal is PERMISSION_DENIED naming the rule, reported to the
//! server's observer (metrics, the audit trail) and throttled per identity
//! ([`Throttle`]): while barred, the identity's calls are refused with
//! RESOURCE_EXHAUSTED before any handler runs. A server started insecure
//! (no TLS) lets every call in with no caller: that mode is for a laptop,
//! and the process says so when it starts.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::BoxBody;

use crate::planes::Plane;
use crate::throttle::Throttle;
use crate::tls::{Identity, PeerInfo, Role};

/// The callers a rule admits: a set of roles, or the members of the
/// server's own Raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow(u8);

impl Allow {
    pub const REPLICAS: Allow = Allow(1);
    pub const ROUTERS: Allow = Allow(2);
    pub const SERVICES: Allow = Allow(4);
    pub const OPERATORS: Allow = Allow(8);
    /// The other members of this server's Raft group (the replicas of the
    /// same cell; for a router, the other routers).
    pub const GROUP: Allow = Allow(16);
    /// Any identity of the cluster (health checks, reflection).
    pub const ANYONE: Allow = Allow(1 | 2 | 4 | 8);

    pub const fn or(self, other: Allow) -> Allow {
        Allow(self.0 | other.0)
    }

    fn admits_role(self, role: Role) -> bool {
        let bit = match role {
            Role::Replica => 1,
            Role::Router => 2,
            Role::Service => 4,
            Role::Operator => 8,
        };
        self.0 & bit != 0
    }

    /// Words for a refusal: "routers or operators".
    pub fn describe(self) -> String {
        let names = [
            (Allow::REPLICAS, "replicas"),
            (Allow::ROUTERS, "routers"),
            (Allow::SERVICES, "services"),
            (Allow::OPERATORS, "operators"),
            (Allow::GROUP, "members of this Raft group"),
        ];
        let words: Vec<&str> = names.iter().filter(|(a, _)| self.0 & a.0 != 0).map(|(_, n)| *n).collect();
        if words.is_empty() {
            "no one".into()
        } else {
            words.join(" or ")
        }
    }
}

/// The rules every server of the project starts from: health on every
/// plane, reflection on the client plane, both open to any identity the
/// plane's listener lets in.
pub const OPEN_RULES: [(Plane, &str, Allow); 5] = [
    (Plane::Client, "/grpc.health.v1.Health/", Allow::ANYONE),
    (Plane::Peer, "/grpc.health.v1.Health/", Allow::ANYONE),
    (Plane::Admin, "/grpc.health.v1.Health/", Allow::ANYONE),
    (Plane::Client, "/grpc.reflection.v1.ServerReflection/", Allow::ANYONE),
    (Plane::Client, "/grpc.reflection.v1alpha.ServerReflection/", Allow::ANYONE),
];

/// Which Raft group a server is a member of ([`Allow::GROUP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    Cell(u64),
    Routers,
}

impl Member {
    fn admits(self, identity: &Identity) -> bool {
        match (self, identity) {
            (Member::Cell(cell), Identity::Replica { cell: theirs, .. }) => cell == *theirs,
            (Member::Routers, Identity::Router { .. }) => true,
            _ => false,
        }
    }
}

/// The rules of one server, and the plane ([`Plane`]) of the listener
/// they are checked on.
#[derive(Clone, Debug)]
pub struct Policy {
    pub member: Member,
    plane: Plane,
    rules: Vec<(Plane, &'static str, Allow)>,
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: tonic::Code,
    pub message: String,
    /// The rule that refused it (its path), when one matched.
    pub rule: Option<&'static str>,
}

fn matches(rule: &str, path: &str) -> bool {
    path == rule || (rule.ends_with('/') && path.starts_with(rule))
}

impl Policy {
    /// `rules`: (the plane serving it, path or `/package.Service/` prefix,
    /// who may call it). The policy checks calls on the client plane until
    /// [`Policy::on`] names another.
    pub fn new(member: Member, rules: &[(Plane, &'static str, Allow)]) -> Policy {
        Policy { member, plane: Plane::Client, rules: rules.to_vec() }
    }

    /// The same rules, checked on `plane`'s listener.
    pub fn on(&self, plane: Plane) -> Policy {
        Policy { plane, ..self.clone() }
    }

    pub fn plane(&self) -> Plane {
        self.plane
    }

    /// The rule for `path` on this plane: the longest rule path it starts
    /// with.
    pub fn rule(&self, path: &str) -> Option<(&'static str, Allow)> {
        self.rules
            .iter()
            .filter(|(plane, rule, _)| *plane == self.plane && matches(rule, path))
            .max_by_key(|(_, rule, _)| rule.len())
            .map(|(_, rule, allow)| (*rule, *allow))
    }

    /// Whether `identity` may call `path`.
    pub fn check(&self, path: &str, identity: &Identity) -> Result<(), Refusal> {
        let Some((rule, allow)) = self.rule(path) else {
            let elsewhere = self.rules.iter().find(|(_, rule, allow)| matches(rule, path) && *allow != Allow::ANYONE);
            if let Some((plane, rule, _)) = elsewhere {
                return Err(Refusal {
                    code: tonic::Code::PermissionDenied,
                    message: format!(
                        "{identity} may not call {path} on the {} plane: it is served on the {plane} plane (the process's port + {})",
                        self.plane,
                        plane.offset()
                    ),
                    rule: Some(rule),
                });
            }
            return Err(Refusal {
                code: tonic::Code::PermissionDenied,
                message: format!("{identity} may not call {path}: no rule admits anyone to it"),
                rule: None,
            });
        };
        if self.admits(allow, identity) {
            return Ok(());
        }
        Err(Refusal {
            code: tonic::Code::PermissionDenied,
            message: format!("{identity} may not call {path}: rule {rule} admits {}", allow.describe()),
            rule: Some(rule),
        })
    }

    fn admits(&self, allow: Allow, identity: &Identity) -> bool {
        allow.admits_role(identity.role()) || (allow.0 & Allow::GROUP.0 != 0 && self.member.admits(identity))
    }

    /// Whether `identity` may open a connection to this plane's listener:
    /// some rule of the plane other than those open to anyone (health,
    /// reflection) admits it. Checked once per connection, after its TLS
    /// handshake, so a caller with no business on a plane cannot even hold
    /// a connection to it.
    pub fn admits_connection(&self, identity: &Identity) -> Result<(), String> {
        let admitted = self
            .rules
            .iter()
            .filter(|(plane, _, allow)| *plane == self.plane && *allow != Allow::ANYONE)
            .any(|(_, _, allow)| self.admits(*allow, identity));
        if admitted {
            return Ok(());
        }
        let mut who = Allow(0);
        for (plane, _, allow) in &self.rules {
            if *plane == self.plane && *allow != Allow::ANYONE {
                who = who.or(*allow);
            }
        }
        Err(format!("{identity} may not connect to the {} plane, which admits {}", self.plane, who.describe()))
    }
}

/// The caller a request was let in with (absent on an insecure server):
/// the identity the gate proved, and the handler's way to refuse it for a
/// check the policy cannot make (a standby's source cell, a courier batch's
/// sender), reported and throttled as the gate's own refusals are
/// (counted, written to the audit trail with the rule `handler`, the
/// identity barred for a while). One request extension for both.
#[derive(Clone)]
pub struct Refuser {
    shared: Arc<GateShared>,
    addr: Option<SocketAddr>,
    identity: Arc<Identity>,
}

impl Refuser {
    /// Reports the refusal of a call to `path` and gives back `status`,
    /// the answer to send.
    pub fn refuse(&self, path: &str, status: tonic::Status) -> tonic::Status {
        let refusal = Refusal { code: status.code(), message: status.message().to_string(), rule: Some("handler") };
        let barred_for = self.shared.throttle.failed(self.identity.clone());
        (self.shared.observer)(&Denied {
            addr: self.addr,
            identity: Some(&self.identity),
            path,
            refusal: &refusal,
            barred_for,
        });
        status
    }
}

/// The caller of `request`, as the gate proved it.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request.extensions().get::<Refuser>().map(|refuser| refuser.identity.as_ref())
}

/// The [`Refuser`] of `request` (none on an insecure server).
pub fn refuser<T>(request: &tonic::Request<T>) -> Option<Refuser> {
    request.extensions().get::<Refuser>().cloned()
}

/// A refused call as the observer sees it.
#[derive(Clone, Debug)]
pub struct Denied<'a> {
    pub addr: Option<SocketAddr>,
    pub identity: Option<&'a Identity>,
    pub path: &'a str,
    pub refusal: &'a Refusal,
    /// How long the identity is now barred.
    pub barred_for: Duration,
}

/// Told of every refused call (metrics, the audit trail).
pub type DeniedObserver = Arc<dyn Fn(&Denied<'_>) + Send + Sync>;

tokio::task_local! {
    /// The path of the call this task serves (set by the gate).
    static CALL_PATH: http::Uri;
}

/// Calls `f` with the method name of the call this task serves (the last
/// segment of its gRPC path; `none` outside a call the gate let in).
pub fn with_call_method<R>(f: impl FnOnce(&str) -> R) -> R {
    // A `Uri` clone is a reference count, not a copy.
    let uri = CALL_PATH.try_with(http::Uri::clone).ok();
    f(uri.as_ref().and_then(|uri| uri.path().rsplit('/').next()).unwrap_or("none"))
}

/// The gRPC path of the call this task serves (`None` outside one).
pub fn call_path() -> Option<http::Uri> {
    CALL_PATH.try_with(http::Uri::clone).ok()
}

/// Runs `future` as part of serving the call at `path` (work a call hands
/// to another task, such as a batch carrying many calls' items).
pub async fn as_call<F: std::future::Future>(path: http::Uri, future: F) -> F::Output {
    CALL_PATH.scope(path, future).await
}

/// Told of every call the gate let in, once its answer's head is out:
/// the path, the gRPC code of the answer (`None` when the head carries
/// none: a unary success, or a stream that started) and the time taken.
pub type CallObserver = Arc<dyn Fn(&str, Option<tonic::Code>, Duration) + Send + Sync>;

/// The layer that puts a [`Policy`] in front of a server's services.
#[derive(Clone)]
pub struct GateLayer {
    inner: Arc<GateShared>,
}

#[derive(Clone)]
struct GateShared {
    policy: Policy,
    /// No TLS: every call is let in, with no caller.
    insecure: bool,
    throttle: Arc<Throttle<Arc<Identity>>>,
    observer: DeniedObserver,
    calls: Option<CallObserver>,
}

impl GateLayer {
    pub fn new(policy: Policy, insecure: bool, observer: DeniedObserver) -> GateLayer {
        GateLayer::with_throttle(policy, insecure, observer, Arc::new(Throttle::standard()))
    }

    /// The same with a given throttle: one shared by the gates of a
    /// process's planes, or a test's own.
    pub fn with_throttle(
        policy: Policy,
        insecure: bool,
        observer: DeniedObserver,
        throttle: Arc<Throttle<Arc<Identity>>>,
    ) -> GateLayer {
        GateLayer { inner: Arc::new(GateShared { policy, insecure, throttle, observer, calls: None }) }
    }

    /// The same, telling `calls` of every call let in (latency metrics).
    pub fn observing(mut self, calls: Option<CallObserver>) -> GateLayer {
        Arc::make_mut(&mut self.inner).calls = calls;
        self
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, shared: self.inner.clone() }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<GateShared>,
}

impl GateShared {
    /// The caller to let in with, or the answer to refuse with.
    fn decide<B>(&self, request: &http::Request<B>) -> Result<Option<Arc<Identity>>, tonic::Status> {
        let info = request.extensions().get::<PeerInfo>();
        let identity = info.and_then(|info| info.identity.clone());
        let addr = info.and_then(|info| info.addr);
        let path = request.uri().path();
        let Some(identity) = identity else {
            if self.insecure {
                return Ok(None);
            }
            return Err(tonic::Status::unauthenticated("no client certificate: this server requires mutual TLS"));
        };
        if let Some(left) = self.throttle.barred(&identity) {
            return Err(crate::errors::throttled(
                &format!("{identity}: too many refused calls; barred for another {} ms", left.as_millis()),
                left,
            ));
        }
        match self.policy.check(path, &identity) {
            Ok(()) => Ok(Some(identity)),
            Err(refusal) => {
                let barred_for = self.throttle.failed(identity.clone());
                (self.observer)(&Denied { addr, identity: Some(&identity), path, refusal: &refusal, barred_for });
                Err(crate::errors::denied(refusal.code, &refusal.message, refusal.rule))
            }
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<BoxBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.shared.decide(&request) {
            Ok(caller) => {
                if let Some(identity) = caller {
                    let addr = request.extensions().get::<PeerInfo>().and_then(|info| info.addr);
                    request.extensions_mut().insert(Refuser { shared: self.shared.clone(), addr, identity });
                }
                // The ready service answers this call; a clone waits for the next.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                let trace = crate::trace::TraceContext::from_headers(request.headers());
                let observer = self.shared.calls.clone();
                if observer.is_none() && trace.is_none() {
                    return Box::pin(ready.call(request));
                }
                let uri = request.uri().clone();
                let sampled = trace.is_some_and(|t| t.sampled);
                let started = std::time::Instant::now();
                let answer = CALL_PATH.scope(uri.clone(), ready.call(request));
                let answer = async move {
                    if sampled {
                        tracing::info!(path = uri.path(), "call received");
                    }
                    // A call dropped before its answer (its deadline passed,
                    // its caller went away) is counted as Canceled.
                    let unanswered =
                        observer.map(|observer| Unanswered { observer: Some(observer), uri: uri.clone(), started });
                    let answer = answer.await;
                    if let Ok(response) = &answer {
                        let code = response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .map(tonic::Code::from);
                        if let Some(pending) = unanswered {
                            pending.answered(code);
                        }
                        if sampled {
                            let code = code.unwrap_or(tonic::Code::Ok);
                            let ms = started.elapsed().as_secs_f64() * 1000.0;
                            tracing::info!(path = uri.path(), ?code, ms, "call answered");
                        }
                    }
                    answer
                };
                match trace {
                    // A sampled call's log lines all carry its trace id.
                    Some(context) => {
                        use tracing::Instrument;
                        let span = if context.sampled {
                            let span = tracing::info_span!("call", trace_id = %context.trace_id_hex());
                            crate::trace::adopt(&span, &context);
                            span
                        } else {
                            tracing::Span::none()
                        };
                        Box::pin(crate::trace::scope(context, answer).instrument(span))
                    }
                    None => Box::pin(answer),
                }
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// A call let in and not answered yet: told to the observer as Canceled if
/// it is dropped unanswered.
struct Unanswered {
    observer: Option<CallObserver>,
    uri: http::Uri,
    started: std::time::Instant,
}

impl Unanswered {
    fn answered(mut self, code: Option<tonic::Code>) {
        if let Some(observer) = self.observer.take() {
            observer(self.uri.path(), code, self.started.elapsed());
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(observer) = self.observer.take() {
            observer(self.uri.path(), Some(tonic::Code::Cancelled), self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uri: &str) -> Identity {
        Identity::parse(uri).unwrap()
    }

    /// A call answered is told with its code; one dropped unanswered (its
    /// deadline passed, its caller left) is told as Canceled, once.
    #[test]
    fn a_call_dropped_unanswered_is_counted_as_canceled() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let observer: CallObserver = Arc::new(move |path, code, _| {
            record.lock().unwrap().push((path.to_string(), code));
        });
        let call = |observer: &CallObserver| Unanswered {
            observer: Some(observer.clone()),
            uri: "/cellbank.v1.Ledger/Transfer".parse().unwrap(),
            started: std::time::Instant::now(),
        };
        call(&observer).answered(Some(tonic::Code::NotFound));
        drop(call(&observer));
        call(&observer).answered(None);
        let path = "/cellbank.v1.Ledger/Transfer".to_string();
        assert_eq!(
            *seen.lock().unwrap(),
            [(path.clone(), Some(tonic::Code::NotFound)), (path.clone(), Some(tonic::Code::Cancelled)), (path, None)]
        );
    }

    #[tokio::test]
    async fn a_call_names_its_method_to_what_it_calls() {
        assert_eq!(with_call_method(str::to_owned), "none");
        let uri: http::Uri = "/cellbank.v1.Ledger/Transfer".parse().unwrap();
        let inside = CALL_PATH.scope(uri, async { with_call_method(str::to_owned) }).await;
        assert_eq!(inside, "Transfer");
    }

    fn policy() -> Policy {
        Policy::new(
            Member::Cell(3),
            &[
                (Plane::Client, "/cellbank.cell.v1.ReplicaAdmin/", Allow::OPERATORS),
                (Plane::Client, "/cellbank.cell.v1.ReplicaAdmin/Configure", Allow::ROUTERS),
                (Plane::Client, "/cellbank.cell.v1.ReplicaAdmin/Status", Allow::ROUTERS.or(Allow::OPERATORS)),
                (Plane::Client, "/cellbank.cell.v1.RaftTransport/", Allow::GROUP),
            ],
        )
    }

    #[test]
    fn the_longest_rule_decides_and_an_unnamed_path_is_refused() {
        let policy = policy();
        let router = id("cellbank://local/router/1");
        let operator = id("cellbank://local/operator/alice");
        let service = id("cellbank://local/service/payments");
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdmin/Configure", &router).is_ok());
        let refused = policy.check("/cellbank.cell.v1.ReplicaAdmin/Configure", &operator).unwrap_err();
        assert_eq!(refused.code, tonic::Code::PermissionDenied);
        assert_eq!(refused.rule, Some("/cellbank.cell.v1.ReplicaAdmin/Configure"));
        assert!(refused.message.contains("admits routers"), "{}", refused.message);
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdmin/ChangeMembership", &operator).is_ok());
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdmin/ChangeMembership", &router).is_err());
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdmin/Status", &router).is_ok());
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdmin/Status", &service).is_err());
        let unnamed = policy.check("/cellbank.cell.v1.Standby/Replicate", &operator).unwrap_err();
        assert_eq!(unnamed.rule, None);
        // A prefix rule does not match a path that merely starts with its
        // service's name.
        assert!(policy.check("/cellbank.cell.v1.ReplicaAdminX/Status", &operator).is_err());
    }

    #[test]
    fn a_group_rule_admits_the_replicas_of_this_cell_only() {
        let policy = policy();
        let path = "/cellbank.cell.v1.RaftTransport/Stream";
        assert!(policy.check(path, &id("cellbank://local/cell/3/replica/2")).is_ok());
        assert!(policy.check(path, &id("cellbank://local/cell/4/replica/2")).is_err());
        assert!(policy.check(path, &id("cellbank://local/router/1")).is_err());
        let routers =
            Policy::new(Member::Routers, &[(Plane::Client, "/cellbank.cell.v1.RaftTransport/", Allow::GROUP)]);
        assert!(routers.check(path, &id("cellbank://local/router/2")).is_ok());
        assert!(routers.check(path, &id("cellbank://local/cell/1/replica/1")).is_err());
    }

    #[test]
    fn a_path_of_another_plane_is_refused_naming_it_and_connections_follow_the_planes_rules() {
        let rules = [
            (Plane::Client, "/grpc.health.v1.Health/", Allow::ANYONE),
            (Plane::Peer, "/grpc.health.v1.Health/", Allow::ANYONE),
            (Plane::Client, "/cellbank.v1.Ledger/", Allow::SERVICES.or(Allow::OPERATORS)),
            (Plane::Peer, "/cellbank.cell.v1.RaftTransport/", Allow::GROUP),
            (Plane::Peer, "/cellbank.cell.v1.Clearing/", Allow::ROUTERS),
        ];
        let client = Policy::new(Member::Cell(3), &rules);
        let peer = client.on(Plane::Peer);
        let replica = id("cellbank://local/cell/3/replica/1");
        let other_cell = id("cellbank://local/cell/4/replica/1");
        let router = id("cellbank://local/router/1");
        let service = id("cellbank://local/service/payments");
        let raft = "/cellbank.cell.v1.RaftTransport/Stream";
        assert!(peer.check(raft, &replica).is_ok());
        let refused = client.check(raft, &replica).unwrap_err();
        assert_eq!(refused.rule, Some("/cellbank.cell.v1.RaftTransport/"));
        assert!(refused.message.contains("served on the peer plane"), "{}", refused.message);
        assert!(peer.check("/cellbank.v1.Ledger/Transfer", &service).unwrap_err().message.contains("client plane"));
        // Health is open on both planes, yet opens neither to everyone.
        assert!(peer.check("/grpc.health.v1.Health/Check", &router).is_ok());
        assert!(peer.admits_connection(&replica).is_ok());
        assert!(peer.admits_connection(&router).is_ok());
        let why = peer.admits_connection(&service).unwrap_err();
        assert!(why.contains("may not connect to the peer plane"), "{why}");
        assert!(peer.admits_connection(&other_cell).is_err());
        assert!(client.admits_connection(&service).is_ok());
        assert!(client.admits_connection(&router).is_err());
    }
}
