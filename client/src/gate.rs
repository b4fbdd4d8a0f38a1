//! Who may call what: the authorization layer in front of every gRPC
//! server of the project.
//!
//! A [`Policy`] is a list of rules, each a method path or a service prefix
//! (`/cellbank.cell.v1.ReplicaAdmin/Configure`, `/cellbank.cell.v1.Standby/`)
//! and the callers it admits ([`Allow`]); the longest matching path decides
//! and a path no rule names is refused (deny by default). The caller is the
//! identity its TLS certificate proved ([`crate::tls::PeerInfo`]); a request
//! let in carries it as [`Caller`], so handlers narrow further (the standby
//! admits only its source cell's replicas, the routers' audit log records
//! who) and never trust a name the request itself gives.
//!
//! A refusal is PERMISSION_DENIED naming the rule, reported to the
//! server's observer (metrics, the audit trail) and throttled per identity
//! ([`Throttle`]): while barred, the identity's calls are refused with
//! RESOURCE_EXHAUSTED before any handler runs. A server started insecure
//! (no TLS) lets every call in with no caller: that mode is for a laptop,
//! and the process says so when it starts.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::BoxBody;

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

/// The rules of one server.
#[derive(Clone, Debug)]
pub struct Policy {
    pub member: Member,
    rules: BTreeMap<&'static str, Allow>,
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: tonic::Code,
    pub message: String,
    /// The rule that refused it (its path), when one matched.
    pub rule: Option<&'static str>,
}

impl Policy {
    /// `rules`: (path or `/package.Service/` prefix, who may call it).
    pub fn new(member: Member, rules: &[(&'static str, Allow)]) -> Policy {
        Policy { member, rules: rules.iter().copied().collect() }
    }

    /// The rule for `path`: the longest rule path it starts with.
    pub fn rule(&self, path: &str) -> Option<(&'static str, Allow)> {
        self.rules
            .iter()
            .filter(|(rule, _)| path == **rule || (rule.ends_with('/') && path.starts_with(**rule)))
            .max_by_key(|(rule, _)| rule.len())
            .map(|(rule, allow)| (*rule, *allow))
    }

    /// Whether `identity` may call `path`.
    pub fn check(&self, path: &str, identity: &Identity) -> Result<(), Refusal> {
        let Some((rule, allow)) = self.rule(path) else {
            return Err(Refusal {
                code: tonic::Code::PermissionDenied,
                message: format!("{identity} may not call {path}: no rule admits anyone to it"),
                rule: None,
            });
        };
        let admitted =
            allow.admits_role(identity.role()) || (allow.0 & Allow::GROUP.0 != 0 && self.member.admits(identity));
        if admitted {
            return Ok(());
        }
        Err(Refusal {
            code: tonic::Code::PermissionDenied,
            message: format!("{identity} may not call {path}: rule {rule} admits {}", allow.describe()),
            rule: Some(rule),
        })
    }
}

/// The identity a request was let in with (absent on an insecure server).
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<Identity>);

/// The caller of `request`, as the gate proved it.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request.extensions().get::<Caller>().map(|caller| caller.0.as_ref())
}

/// The address `request` came from.
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<PeerInfo>().and_then(|info| info.addr)
}

/// Writes a handler's refusal of a caller (a check the policy cannot make:
/// a standby's source cell, a courier batch's sender) to the audit trail
/// as the gate writes its own.
pub fn audit_denied(addr: Option<SocketAddr>, identity: &Identity, path: &str, status: &tonic::Status) {
    tracing::warn!(
        target: "cellbank::audit",
        event = "call_denied",
        peer = %addr.map(|a| a.to_string()).unwrap_or_default(),
        identity = %identity,
        path,
        rule = "handler",
        message = %status.message(),
    );
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

/// The layer that puts a [`Policy`] in front of a server's services.
#[derive(Clone)]
pub struct GateLayer {
    inner: Arc<GateShared>,
}

struct GateShared {
    policy: Policy,
    /// No TLS: every call is let in, with no caller.
    insecure: bool,
    throttle: Throttle<Arc<Identity>>,
    observer: DeniedObserver,
}

impl GateLayer {
    pub fn new(policy: Policy, insecure: bool, observer: DeniedObserver) -> GateLayer {
        GateLayer { inner: Arc::new(GateShared { policy, insecure, throttle: Throttle::standard(), observer }) }
    }

    /// The same with a throttle of one's own (tests).
    pub fn with_throttle(
        policy: Policy,
        insecure: bool,
        observer: DeniedObserver,
        throttle: Throttle<Arc<Identity>>,
    ) -> GateLayer {
        GateLayer { inner: Arc::new(GateShared { policy, insecure, throttle, observer }) }
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
                    request.extensions_mut().insert(Caller(identity));
                }
                // The ready service answers this call; a clone waits for the next.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uri: &str) -> Identity {
        Identity::parse(uri).unwrap()
    }

    fn policy() -> Policy {
        Policy::new(
            Member::Cell(3),
            &[
                ("/cellbank.cell.v1.ReplicaAdmin/", Allow::OPERATORS),
                ("/cellbank.cell.v1.ReplicaAdmin/Configure", Allow::ROUTERS),
                ("/cellbank.cell.v1.ReplicaAdmin/Status", Allow::ROUTERS.or(Allow::OPERATORS)),
                ("/cellbank.cell.v1.RaftTransport/", Allow::GROUP),
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
        let routers = Policy::new(Member::Routers, &[("/cellbank.cell.v1.RaftTransport/", Allow::GROUP)]);
        assert!(routers.check(path, &id("cellbank://local/router/2")).is_ok());
        assert!(routers.check(path, &id("cellbank://local/cell/1/replica/1")).is_err());
    }
}
