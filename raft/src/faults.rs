//! Fault points for chaos drills, compiled in only with the cargo feature
//! `fault-points` (without it every check below is a constant and the
//! `FaultPoints` service answers UNIMPLEMENTED).
//!
//! A replica is one process, so the registry is process-wide. Faults are
//! switched over the authenticated `FaultPoints` gRPC service and each one
//! carries an expiry: a fault nobody heals (a drill runner that died) goes
//! away on its own. The points:
//!
//! - `raft.send` / `raft.recv`: Raft messages to / from some peers are
//!   dropped (with a probability) or delayed. Both on one replica is a
//!   partition of that replica.
//! - `standby.ship`: the stream to the standby cell is cut or delayed.
//! - `standby.ack` (action `skip`): the replica acknowledges writes without
//!   waiting for its standby. This disables synchronous replication; it
//!   exists to prove that the drills' lost-write checker can fail.
//! - `disk.sync`: synced log writes are slowed (`delay`) or fail (`error`:
//!   the replica stops, as it does on a real failed fsync).
//! - `clock`: the replica's wall clock is moved by `offset_ms`.
//! - `snapshot.install` (action `crash`): the replica aborts in the middle
//!   of installing a snapshot (its first pair written), as a power cut
//!   would stop it; at its next start it installs the snapshot again.
//! - `move.frozen`, `move.left`, `move.imported` (action `crash`, on a
//!   router): the coordinator aborts in the middle of a slice move, once
//!   the source froze the slice, once the slice's money left it, or once
//!   the target imported it (before the table's flip).
//! - `clearing.holds_accounts` (action `unimplemented`): the replica
//!   answers `Clearing.HoldsAccounts` UNIMPLEMENTED, as a build from before
//!   that call would during a rolling upgrade.
//!
//! A fault can also be in place from the first instant of a process, before
//! its gRPC server answers (an old active restarted cut off from its
//! standby, say): [`STARTUP_ENV`] lists them, and [`inject_from_env`] reads it
//! at start.

use std::time::Duration;

use cellbank_proto::cell::{FaultList, InjectFaultRequest};

pub const POINTS: &[&str] = &[
    "raft.send",
    "raft.recv",
    "standby.ship",
    "standby.ack",
    "disk.sync",
    "clock",
    "snapshot.install",
    "move.frozen",
    "move.left",
    "move.imported",
    "clearing.holds_accounts",
];
/// Longest a fault may last before it heals itself.
pub const DURATION_MAX: Duration = Duration::from_secs(600);
/// Largest delay one fault may add.
pub const DELAY_MAX_MS: u64 = 60_000;
/// Largest clock jump (either way).
pub const OFFSET_MAX_MS: i64 = 24 * 3600 * 1000;

/// Faults a replica injects into itself at start: `;`-separated
/// `point=action:duration_ms[:value]`, the value being `delay_ms` for a
/// delay and `offset_ms` for a clock offset. Example:
/// `standby.ship=drop:60000;disk.sync=delay:30000:50`.
pub const STARTUP_ENV: &str = "CELLBANK_FAULTS";

/// Parses the [`STARTUP_ENV`] value into checked requests.
pub fn parse_startup(value: &str) -> Result<Vec<InjectFaultRequest>, String> {
    let mut requests = Vec::new();
    for item in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (point, rest) =
            item.split_once('=').ok_or_else(|| format!("{item:?}: expected point=action:duration_ms"))?;
        let mut parts = rest.split(':');
        let action = parts.next().unwrap_or_default();
        let number = |part: Option<&str>, what: &str| -> Result<i64, String> {
            part.ok_or_else(|| format!("{item:?}: {what} is missing"))?
                .parse::<i64>()
                .map_err(|e| format!("{item:?}: {what}: {e}"))
        };
        let duration_ms = number(parts.next(), "duration_ms")?;
        let mut request = InjectFaultRequest {
            point: point.to_string(),
            action: action.to_string(),
            duration_ms: u64::try_from(duration_ms).map_err(|_| format!("{item:?}: duration_ms is negative"))?,
            ..Default::default()
        };
        match action {
            "delay" => {
                request.delay_ms =
                    u64::try_from(number(parts.next(), "delay_ms")?).map_err(|_| format!("{item:?}: negative delay"))?
            }
            "offset" => request.offset_ms = number(parts.next(), "offset_ms")?,
            _ => {}
        }
        if parts.next().is_some() {
            return Err(format!("{item:?}: too many fields"));
        }
        validate(&request).map_err(|e| format!("{item:?}: {e}"))?;
        requests.push(request);
    }
    Ok(requests)
}

/// Injects the faults [`STARTUP_ENV`] names. An unparsable value is an error
/// (the replica refuses to start rather than run without the fault asked
/// for); a build without fault points refuses any.
pub fn inject_from_env() -> Result<(), String> {
    let Ok(value) = std::env::var(STARTUP_ENV) else { return Ok(()) };
    let requests = parse_startup(&value)?;
    if !requests.is_empty() && !COMPILED_IN {
        return Err(format!("{STARTUP_ENV} is set but this build has no fault points"));
    }
    for request in requests {
        inject(request);
    }
    Ok(())
}

/// A fault request a point does not accept: the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct InvalidFault {
    pub field: &'static str,
    pub detail: String,
}

fn invalid_fault(field: &'static str, detail: impl Into<String>) -> InvalidFault {
    InvalidFault { field, detail: detail.into() }
}

/// Checks a request against what each point accepts; the error names the field.
pub fn validate(request: &InjectFaultRequest) -> Result<(), InvalidFault> {
    let point = request.point.as_str();
    if !POINTS.contains(&point) {
        return Err(invalid_fault("point", format!("unknown fault point {point:?}; known: {}", POINTS.join(", "))));
    }
    let allowed: &[&str] = match point {
        "raft.send" | "raft.recv" | "standby.ship" => &["drop", "delay"],
        "standby.ack" => &["skip"],
        "disk.sync" => &["delay", "error"],
        "snapshot.install" | "move.frozen" | "move.left" | "move.imported" => &["crash"],
        "clearing.holds_accounts" => &["unimplemented"],
        _ => &["offset"],
    };
    if !allowed.contains(&request.action.as_str()) {
        return Err(invalid_fault(
            "action",
            format!("{point} takes {}, not {:?}", allowed.join(" or "), request.action),
        ));
    }
    if request.duration_ms == 0 || request.duration_ms > DURATION_MAX.as_millis() as u64 {
        return Err(invalid_fault("duration_ms", format!("must be 1..={}", DURATION_MAX.as_millis())));
    }
    if request.action == "delay" && (request.delay_ms == 0 || request.delay_ms > DELAY_MAX_MS) {
        return Err(invalid_fault("delay_ms", format!("must be 1..={DELAY_MAX_MS} for a delay")));
    }
    if request.action == "offset" && (request.offset_ms == 0 || request.offset_ms.abs() > OFFSET_MAX_MS) {
        return Err(invalid_fault("offset_ms", format!("must be non-zero and at most {OFFSET_MAX_MS} either way")));
    }
    if !(0.0..=1.0).contains(&request.probability) || request.probability.is_nan() {
        return Err(invalid_fault("probability", "must be in [0, 1] (0 means always)"));
    }
    if !request.peers.is_empty() && !point.starts_with("raft.") {
        return Err(invalid_fault("peers", format!("only raft.send and raft.recv take peers, not {point}")));
    }
    Ok(())
}

#[cfg(feature = "fault-points")]
mod registry {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::RwLock;
    use std::time::{Duration, Instant};

    use super::*;

    struct Fault {
        id: u64,
        request: InjectFaultRequest,
        until: Instant,
    }

    static ANY: AtomicBool = AtomicBool::new(false);
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    static FAULTS: RwLock<Vec<Fault>> = RwLock::new(Vec::new());

    pub const COMPILED_IN: bool = true;

    fn refresh(faults: &mut Vec<Fault>) {
        let now = Instant::now();
        faults.retain(|f| f.until > now);
        ANY.store(!faults.is_empty(), Ordering::Release);
    }

    pub fn inject(request: InjectFaultRequest) {
        let mut faults = FAULTS.write().expect("faults lock");
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + Duration::from_millis(request.duration_ms);
        tracing::warn!(id, point = %request.point, action = %request.action, duration_ms = request.duration_ms, "injected fault");
        faults.push(Fault { id, request, until });
        refresh(&mut faults);
    }

    pub fn heal(point: &str) {
        let mut faults = FAULTS.write().expect("faults lock");
        faults.retain(|f| !point.is_empty() && f.request.point != point);
        refresh(&mut faults);
        tracing::warn!(point, "faults healed");
    }

    pub fn list() -> FaultList {
        let mut faults = FAULTS.write().expect("faults lock");
        refresh(&mut faults);
        let now = Instant::now();
        let faults = faults
            .iter()
            .map(|f| cellbank_proto::cell::ActiveFault {
                id: f.id,
                point: f.request.point.clone(),
                action: f.request.action.clone(),
                delay_ms: f.request.delay_ms,
                offset_ms: f.request.offset_ms,
                probability: f.request.probability,
                peers: f.request.peers.clone(),
                remaining_ms: f.until.saturating_duration_since(now).as_millis() as u64,
            })
            .collect();
        FaultList { faults, compiled_in: true }
    }

    /// The first live fault at `point` that concerns `peer` (0: any), as
    /// (action, delay, offset, probability).
    pub fn find(point: &str, peer: u64) -> Option<(String, u64, i64, f64)> {
        if !ANY.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        let (found, all_expired) = {
            let faults = FAULTS.read().expect("faults lock");
            let found = faults
                .iter()
                .find(|f| {
                    f.until > now
                        && f.request.point == point
                        && (peer == 0 || f.request.peers.is_empty() || f.request.peers.contains(&peer))
                })
                .map(|f| (f.request.action.clone(), f.request.delay_ms, f.request.offset_ms, f.request.probability));
            (found, faults.iter().all(|f| f.until <= now))
        };
        if all_expired {
            // Back to the lock-free fast path once every fault has expired.
            refresh(&mut FAULTS.write().expect("faults lock"));
        }
        found
    }
}

#[cfg(not(feature = "fault-points"))]
mod registry {
    use super::*;

    pub const COMPILED_IN: bool = false;

    pub fn inject(_request: InjectFaultRequest) {}

    pub fn heal(_point: &str) {}

    pub fn list() -> FaultList {
        FaultList { faults: Vec::new(), compiled_in: false }
    }

    #[inline(always)]
    pub fn find(_point: &str, _peer: u64) -> Option<(String, u64, i64, f64)> {
        None
    }
}

pub use registry::{heal, inject, list, COMPILED_IN};

/// What a message or a stream should suffer at `point`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hit {
    Drop,
    Delay(Duration),
}

/// `raft.send` / `raft.recv` / `standby.ship` for one peer (0: the standby stream).
#[inline]
pub fn message(point: &str, peer: u64) -> Option<Hit> {
    let (action, delay_ms, _, probability) = registry::find(point, peer)?;
    match action.as_str() {
        "drop" if probability == 0.0 || rand::random::<f64>() < probability => Some(Hit::Drop),
        "delay" => Some(Hit::Delay(Duration::from_millis(delay_ms))),
        _ => None,
    }
}

/// `disk.sync`: Err when the write must fail; sleeps first when slowed.
#[inline]
pub fn disk_sync() -> Result<(), String> {
    match registry::find("disk.sync", 0) {
        Some((action, _, _, _)) if action == "error" => Err("injected fault: the disk refused the write".into()),
        Some((_, delay_ms, _, _)) => {
            std::thread::sleep(Duration::from_millis(delay_ms));
            Ok(())
        }
        None => Ok(()),
    }
}

/// `standby.ack`: true while writes are acknowledged without the standby.
#[inline]
pub fn skip_standby_ack() -> bool {
    registry::find("standby.ack", 0).is_some()
}

/// `clearing.holds_accounts`: true while the replica answers as a build
/// without `HoldsAccounts`.
#[inline]
pub fn holds_accounts_unimplemented() -> bool {
    registry::find("clearing.holds_accounts", 0).is_some()
}

/// `snapshot.install`: true while an install must stop the process half way.
#[inline]
pub fn crash_installing_snapshot() -> bool {
    registry::find("snapshot.install", 0).is_some()
}

/// `move.<step>`: stops the process (a coordinator) at that step of a
/// slice move, as a power cut would.
pub fn crash_at_move_step(point: &str) {
    if registry::find(point, 0).is_some() {
        tracing::error!(point, "injected fault: stopping in the middle of a slice move");
        std::process::abort();
    }
}

/// `clock`: milliseconds added to the replica's wall clock.
#[inline]
pub fn clock_offset_ms() -> i64 {
    registry::find("clock", 0).map(|(_, _, offset, _)| offset).unwrap_or(0)
}

/// The replica's wall clock (ms since the epoch), moved by a `clock` fault.
pub fn wall_ms() -> u64 {
    cellbank_client::clock::unix_ms().saturating_add_signed(clock_offset_ms())
}

/// The `FaultPoints` gRPC service of a replica.
pub struct FaultService {
    pub admin_token: Option<String>,
}

impl FaultService {
    fn authorize<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        if !COMPILED_IN {
            return Err(tonic::Status::unimplemented("this binary was built without the `fault-points` feature"));
        }
        let Some(token) = &self.admin_token else {
            return Err(tonic::Status::permission_denied(
                "fault injection needs `admin_token` in the replica's config",
            ));
        };
        cellbank_proto::check_admin_token(request, token)
    }
}

#[tonic::async_trait]
impl cellbank_proto::cell::fault_points_server::FaultPoints for FaultService {
    async fn inject(
        &self,
        request: tonic::Request<InjectFaultRequest>,
    ) -> Result<tonic::Response<FaultList>, tonic::Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        validate(&request).map_err(|e| cellbank_client::errors::invalid_argument(e.field, &e.detail))?;
        inject(request);
        Ok(tonic::Response::new(list()))
    }

    async fn heal(
        &self,
        request: tonic::Request<cellbank_proto::cell::HealFaultsRequest>,
    ) -> Result<tonic::Response<FaultList>, tonic::Status> {
        self.authorize(&request)?;
        let point = request.into_inner().point;
        if !point.is_empty() && !POINTS.contains(&point.as_str()) {
            return Err(tonic::Status::invalid_argument(format!("point: unknown fault point {point:?}")));
        }
        heal(&point);
        Ok(tonic::Response::new(list()))
    }

    async fn list(
        &self,
        request: tonic::Request<cellbank_proto::cell::ListFaultsRequest>,
    ) -> Result<tonic::Response<FaultList>, tonic::Status> {
        self.authorize(&request)?;
        Ok(tonic::Response::new(list()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(point: &str, action: &str) -> InjectFaultRequest {
        InjectFaultRequest { point: point.into(), action: action.into(), duration_ms: 1000, ..Default::default() }
    }

    #[test]
    fn startup_faults_parse_and_are_checked() {
        let parsed =
            parse_startup("standby.ship=drop:60000; disk.sync=delay:30000:50;clock=offset:1000:-5000").unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(
            (parsed[0].point.as_str(), parsed[0].action.as_str(), parsed[0].duration_ms),
            ("standby.ship", "drop", 60_000)
        );
        assert_eq!(parsed[1].delay_ms, 50);
        assert_eq!(parsed[2].offset_ms, -5000);
        assert!(parse_startup("").unwrap().is_empty());
        assert!(parse_startup("standby.ship").unwrap_err().contains("expected point=action"));
        assert!(parse_startup("standby.ship=drop").unwrap_err().contains("duration_ms is missing"));
        assert!(parse_startup("standby.ship=skip:10").unwrap_err().contains("action"));
        assert!(parse_startup("nowhere=drop:10").unwrap_err().contains("unknown fault point"));
        assert!(parse_startup("standby.ship=drop:10:5").unwrap_err().contains("too many"));
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert!(validate(&request("raft.send", "drop")).is_ok());
        assert!(validate(&request("nowhere", "drop")).unwrap_err().field == "point");
        assert!(validate(&request("clock", "drop")).unwrap_err().field == "action");
        assert!(validate(&request("raft.send", "delay")).unwrap_err().field == "delay_ms");
        assert!(validate(&request("clock", "offset")).unwrap_err().field == "offset_ms");
        let forever = InjectFaultRequest { duration_ms: 0, ..request("raft.send", "drop") };
        assert!(validate(&forever).unwrap_err().field == "duration_ms");
        let odd = InjectFaultRequest { probability: 1.5, ..request("raft.send", "drop") };
        assert!(validate(&odd).unwrap_err().field == "probability");
        let peers = InjectFaultRequest { peers: vec![2], ..request("disk.sync", "error") };
        assert!(validate(&peers).unwrap_err().field == "peers");
    }

    #[cfg(feature = "fault-points")]
    #[test]
    fn a_fault_applies_to_its_peers_and_expires_on_its_own() {
        // Peer ids no test cell uses: the registry is process-wide.
        let mut fault = request("raft.recv", "drop");
        fault.peers = vec![9_999];
        fault.duration_ms = 150;
        inject(fault);
        assert_eq!(message("raft.recv", 9_999), Some(Hit::Drop));
        assert_eq!(message("raft.recv", 9_998), None);
        assert_eq!(message("raft.send", 9_999), None);
        assert_eq!(list().faults.len(), 1);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(message("raft.recv", 9_999), None);
        assert!(list().faults.is_empty());
        let mut one = request("raft.send", "drop");
        one.peers = vec![9_999];
        inject(one);
        let mut other = request("raft.recv", "drop");
        other.peers = vec![9_999];
        inject(other);
        heal("raft.send");
        assert_eq!(message("raft.send", 9_999), None);
        assert_eq!(message("raft.recv", 9_999), Some(Hit::Drop), "healing one point leaves the others");
        heal("");
        assert!(list().faults.is_empty());
    }
}
