//! What each service may do through the routers' `Ledger` API: the scope
//! policy, a TOML file the routers reload when it changes.
//!
//! ```toml
//! # Deposits and withdrawals move money from and to the settlement
//! # account: treasury operations, not every service's.
//! [service.treasury]
//! operations = ["*"]
//! debit_users = "any"
//!
//! [service.payments]
//! operations = ["open_account", "transfer", "submit_transfers", "get_account", "get_transfer", "list_transfers"]
//! debit_users = [[1, 9_999_999]]        # inclusive ranges of user ids
//!
//! [service.reporting]                   # read-only
//! operations = ["get_account", "get_transfer", "list_transfers", "get_envelope"]
//! ```
//!
//! A service the file does not name may do nothing; an operation its
//! `operations` does not list, or a debit of a user outside its
//! `debit_users` (`"any"`, `"none"` — the default — or ranges), is
//! PERMISSION_DENIED naming the rule. Operators are not scoped (the gate
//! admits only services and operators to the routers' `Ledger`). An
//! insecure router, which knows no callers, checks nothing.
//!
//! The file is looked at (its modification time) at most once a second;
//! a changed file is used from the next call. A file that does not load at
//! start stops the router; one that stops loading later leaves the last
//! good policy in force, with a warning in the log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use cellbank_client::tls::Identity;
use serde::Deserialize;
use tonic::Status;

/// The `Ledger` operations a scope names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    OpenAccount,
    Deposit,
    Withdraw,
    Transfer,
    SubmitTransfers,
    GetAccount,
    GetTransfer,
    ListTransfers,
    SendEnvelope,
    GrabEnvelope,
    GetEnvelope,
}

impl Operation {
    pub const ALL: [Operation; 11] = [
        Operation::OpenAccount,
        Operation::Deposit,
        Operation::Withdraw,
        Operation::Transfer,
        Operation::SubmitTransfers,
        Operation::GetAccount,
        Operation::GetTransfer,
        Operation::ListTransfers,
        Operation::SendEnvelope,
        Operation::GrabEnvelope,
        Operation::GetEnvelope,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::OpenAccount => "open_account",
            Operation::Deposit => "deposit",
            Operation::Withdraw => "withdraw",
            Operation::Transfer => "transfer",
            Operation::SubmitTransfers => "submit_transfers",
            Operation::GetAccount => "get_account",
            Operation::GetTransfer => "get_transfer",
            Operation::ListTransfers => "list_transfers",
            Operation::SendEnvelope => "send_envelope",
            Operation::GrabEnvelope => "grab_envelope",
            Operation::GetEnvelope => "get_envelope",
        }
    }
}

/// Whose accounts a service may debit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DebitUsers {
    Any,
    #[default]
    None,
    /// Inclusive ranges of user ids.
    Ranges(Vec<(u64, u64)>),
}

impl DebitUsers {
    fn allows(&self, user: u64) -> bool {
        match self {
            DebitUsers::Any => true,
            DebitUsers::None => false,
            DebitUsers::Ranges(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&user)),
        }
    }

    fn describe(&self) -> String {
        match self {
            DebitUsers::Any => "\"any\"".into(),
            DebitUsers::None => "\"none\"".into(),
            DebitUsers::Ranges(ranges) => {
                let ranges: Vec<String> = ranges.iter().map(|(lo, hi)| format!("[{lo}, {hi}]")).collect();
                format!("[{}]", ranges.join(", "))
            }
        }
    }
}

impl<'de> Deserialize<'de> for DebitUsers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<DebitUsers, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Ranges(Vec<[u64; 2]>),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Word(word) if word == "any" => Ok(DebitUsers::Any),
            Raw::Word(word) if word == "none" => Ok(DebitUsers::None),
            Raw::Word(word) => {
                Err(serde::de::Error::custom(format!("debit_users: {word:?} is not \"any\", \"none\" or ranges")))
            }
            Raw::Ranges(ranges) => {
                if let Some([lo, hi]) = ranges.iter().find(|[lo, hi]| lo > hi) {
                    return Err(serde::de::Error::custom(format!("debit_users: range [{lo}, {hi}] is empty")));
                }
                Ok(DebitUsers::Ranges(ranges.into_iter().map(|[lo, hi]| (lo, hi)).collect()))
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    operations: Vec<String>,
    #[serde(default)]
    debit_users: DebitUsers,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    service: BTreeMap<String, RawScope>,
}

/// One service's scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub operations: Vec<Operation>,
    pub debit_users: DebitUsers,
}

/// The whole policy: service name -> scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub services: BTreeMap<String, Scope>,
}

impl Policy {
    /// Reads a policy file's text; an unknown operation or field is an error.
    pub fn parse(text: &str) -> anyhow::Result<Policy> {
        let raw: RawPolicy = toml::from_str(text)?;
        let mut services = BTreeMap::new();
        for (name, scope) in raw.service {
            let mut operations = Vec::new();
            for word in &scope.operations {
                if word == "*" {
                    operations.extend(Operation::ALL);
                    continue;
                }
                let operation = Operation::ALL.into_iter().find(|o| o.name() == word).ok_or_else(|| {
                    let known: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
                    anyhow::anyhow!("service.{name}.operations: unknown {word:?} (known: \"*\", {})", known.join(", "))
                })?;
                operations.push(operation);
            }
            operations.sort();
            operations.dedup();
            services.insert(name, Scope { operations, debit_users: scope.debit_users });
        }
        Ok(Policy { services })
    }

    /// Whether `caller` may make `operation`, debiting `debits`.
    pub fn check(&self, caller: Option<&Identity>, operation: Operation, debits: &[u64]) -> Result<(), Status> {
        let Some(Identity::Service { name, .. }) = caller else { return Ok(()) };
        let denied = |message: String, rule: String| {
            cellbank_client::errors::denied(tonic::Code::PermissionDenied, &message, Some(&rule))
        };
        let Some(scope) = self.services.get(name) else {
            return Err(denied(
                format!("service {name} may not {}: the policy file names no such service", operation.name()),
                format!("service.{name}"),
            ));
        };
        if !scope.operations.contains(&operation) {
            let listed: Vec<&str> = scope.operations.iter().map(|o| o.name()).collect();
            return Err(denied(
                format!(
                    "service {name} may not {}: rule service.{name}.operations = [{}]",
                    operation.name(),
                    listed.join(", ")
                ),
                format!("service.{name}.operations"),
            ));
        }
        if let Some(user) = debits.iter().find(|user| !scope.debit_users.allows(**user)) {
            return Err(denied(
                format!(
                    "service {name} may not debit user {user}: rule service.{name}.debit_users = {}",
                    scope.debit_users.describe()
                ),
                format!("service.{name}.debit_users"),
            ));
        }
        Ok(())
    }
}

/// The policy a router enforces, reloaded from its file when it changes.
pub struct Scopes {
    path: Option<PathBuf>,
    policy: RwLock<(Arc<Policy>, Option<SystemTime>)>,
    checked: Mutex<Instant>,
}

const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Scopes {
    /// The policy of `path` (none: services may do nothing).
    pub fn load(path: Option<PathBuf>) -> anyhow::Result<Scopes> {
        let (policy, stamp) = match &path {
            Some(path) => {
                let stamp = modified(path);
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the policy file {}: {e}", path.display()))?;
                let policy =
                    Policy::parse(&text).map_err(|e| anyhow::anyhow!("the policy file {}: {e:#}", path.display()))?;
                (policy, stamp)
            }
            None => (Policy::default(), None),
        };
        Ok(Scopes { path, policy: RwLock::new((Arc::new(policy), stamp)), checked: Mutex::new(Instant::now()) })
    }

    /// The policy in force: re-read first when the file changed since the
    /// last look (at most one look a second).
    pub fn current(&self) -> Arc<Policy> {
        let (policy, stamp) = self.policy.read().expect("scopes lock").clone();
        let Some(path) = &self.path else { return policy };
        {
            let mut checked = self.checked.lock().expect("scopes lock");
            if checked.elapsed() < RELOAD_CHECK_EVERY {
                return policy;
            }
            *checked = Instant::now();
        }
        let now = modified(path);
        if now == stamp {
            return policy;
        }
        let loaded = std::fs::read_to_string(path).map_err(anyhow::Error::from).and_then(|t| Policy::parse(&t));
        match loaded {
            Ok(fresh) => {
                tracing::info!(path = %path.display(), services = fresh.services.len(), "policy file reloaded");
                let fresh = Arc::new(fresh);
                *self.policy.write().expect("scopes lock") = (fresh.clone(), now);
                fresh
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "the policy file changed but does not load; the last good policy stays in force");
                // Not again until it changes once more.
                self.policy.write().expect("scopes lock").1 = now;
                policy
            }
        }
    }

    /// [`Policy::check`] against the policy in force.
    pub fn check(&self, caller: Option<&Identity>, operation: Operation, debits: &[u64]) -> Result<(), Status> {
        if !matches!(caller, Some(Identity::Service { .. })) {
            return Ok(());
        }
        self.current().check(caller, operation, debits)
    }
}

/// The policy `cellbank up` writes for a new local cluster: its CLI
/// service may do everything.
pub const LOCAL_POLICY: &str = r#"# What each service may do through the routers' Ledger API (reloaded when
# this file changes). See router/src/scopes.rs for the format.
[service.cli]
operations = ["*"]
debit_users = "any"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> Identity {
        Identity::Service { cluster: "local".into(), name: name.into() }
    }

    const POLICY: &str = r#"
[service.treasury]
operations = ["*"]
debit_users = "any"
[service.payments]
operations = ["transfer", "submit_transfers", "get_account"]
debit_users = [[1, 10], [100, 100]]
[service.reporting]
operations = ["get_account", "list_transfers"]
"#;

    #[test]
    fn a_service_does_what_its_scope_lists_and_nothing_else() {
        let policy = Policy::parse(POLICY).unwrap();
        let (treasury, payments, reporting) = (service("treasury"), service("payments"), service("reporting"));
        assert!(policy.check(Some(&treasury), Operation::Deposit, &[]).is_ok());
        assert!(policy.check(Some(&treasury), Operation::Withdraw, &[77]).is_ok());
        assert!(policy.check(Some(&payments), Operation::Transfer, &[10]).is_ok());
        assert!(policy.check(Some(&payments), Operation::SubmitTransfers, &[1, 100]).is_ok());
        let denied = policy.check(Some(&payments), Operation::Deposit, &[]).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("rule service.payments.operations"), "{}", denied.message());
        let denied = policy.check(Some(&payments), Operation::SubmitTransfers, &[1, 11]).unwrap_err();
        assert!(denied.message().contains("may not debit user 11"), "{}", denied.message());
        assert!(denied.message().contains("[[1, 10], [100, 100]]"), "{}", denied.message());
        assert!(policy.check(Some(&reporting), Operation::GetAccount, &[]).is_ok());
        assert!(policy.check(Some(&reporting), Operation::Transfer, &[1]).is_err(), "read-only");
        let unknown = policy.check(Some(&service("stranger")), Operation::GetAccount, &[]).unwrap_err();
        assert!(unknown.message().contains("names no such service"), "{}", unknown.message());
        // Operators and insecure callers are not scoped.
        let operator = Identity::Operator { cluster: "local".into(), name: "alice".into() };
        assert!(policy.check(Some(&operator), Operation::Deposit, &[]).is_ok());
        assert!(policy.check(None, Operation::Deposit, &[]).is_ok());
    }

    #[test]
    fn a_bad_policy_is_refused_with_its_field() {
        let unknown = Policy::parse("[service.x]\noperations = [\"mint\"]\n").unwrap_err().to_string();
        assert!(unknown.contains("service.x.operations: unknown \"mint\""), "{unknown}");
        assert!(Policy::parse("[service.x]\noperations = []\ndebit_users = \"all\"\n").is_err());
        assert!(Policy::parse("[service.x]\noperations = []\ndebit_users = [[5, 1]]\n").is_err());
        assert!(Policy::parse("[service.x]\noperations = []\ntypo = 1\n").is_err());
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
    }

    #[test]
    fn the_file_is_reloaded_when_it_changes_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[service.a]\noperations = [\"get_account\"]\n").unwrap();
        let scopes = Scopes::load(Some(path.clone())).unwrap();
        let a = service("a");
        assert!(scopes.check(Some(&a), Operation::Transfer, &[]).is_err());
        std::fs::write(&path, "[service.a]\noperations = [\"transfer\"]\ndebit_users = \"any\"\n").unwrap();
        *scopes.checked.lock().unwrap() = Instant::now() - RELOAD_CHECK_EVERY;
        assert!(scopes.check(Some(&a), Operation::Transfer, &[1]).is_ok(), "reloaded");
        std::fs::write(&path, "not toml [").unwrap();
        *scopes.checked.lock().unwrap() = Instant::now() - RELOAD_CHECK_EVERY;
        assert!(scopes.check(Some(&a), Operation::Transfer, &[1]).is_ok(), "the last good policy stays");
        assert!(Scopes::load(Some(path)).is_err(), "a broken file at start is an error");
        let none = Scopes::load(None).unwrap();
        assert!(none.check(Some(&a), Operation::GetAccount, &[]).is_err(), "no file: services may do nothing");
    }
}
