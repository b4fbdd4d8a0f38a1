//! Errors a caller can read without parsing text: every refusal of a
//! cellbank server carries the standard `google.rpc` details beside its
//! message, so a client in any language finds the bad field
//! (`BadRequest`), the reason (`ErrorInfo`, domain `cellbank`) and, for a
//! replica that does not lead, the leader's address (`ErrorInfo` metadata
//! `leader_addr`; also in the `cellbank-leader-addr` header, which older
//! clients read) and, when waiting is what helps, how long to wait first
//! (`RetryInfo`: no leader known yet, a full queue).

use std::collections::HashMap;
use std::time::Duration;

use cellbank_proto::{EPOCH_METADATA_KEY, LEADER_ADDR_METADATA_KEY};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of every cellbank error.
pub const DOMAIN: &str = "cellbank";
/// `ErrorInfo.reason` of a request with a bad field.
/// `ErrorInfo.reason` of writes refused for lack of disk space.
pub const REASON_DISK_LOW: &str = "DISK_LOW";
pub const REASON_INVALID_FIELD: &str = "INVALID_FIELD";
/// `ErrorInfo.reason` of a replica that does not lead its cell.
pub const REASON_NOT_LEADER: &str = "NOT_LEADER";
/// `ErrorInfo.reason` of a replica whose input queue is full.
pub const REASON_OVERLOADED: &str = "OVERLOADED";
/// `ErrorInfo.reason` of a cell whose pair epoch is not the caller's (a
/// router's table behind, a deposed cell, a superseded source); metadata
/// `epoch` is the cell's.
pub const REASON_EPOCH_MISMATCH: &str = "EPOCH_MISMATCH";
/// `ErrorInfo.reason` of a call the caller's identity may not make;
/// metadata `rule` names the rule that refused it.
pub const REASON_NOT_ALLOWED: &str = "NOT_ALLOWED";
/// `ErrorInfo.reason` of a caller barred for a while after refused calls.
pub const REASON_THROTTLED: &str = "THROTTLED";
/// `RetryInfo` of a replica that knows no leader: an election takes at
/// least a Raft tick (100 ms), so an earlier retry finds the same.
pub const NO_LEADER_RETRY_DELAY: Duration = Duration::from_millis(100);
/// `RetryInfo` of a replica whose queue is full: about one batch's time.
pub const OVERLOADED_RETRY_DELAY: Duration = Duration::from_millis(20);

/// INVALID_ARGUMENT naming `field`: the message says `field: detail`, the
/// details carry a `BadRequest` field violation and an `ErrorInfo`.
pub fn invalid_argument(field: &str, detail: &str) -> Status {
    let mut details = ErrorDetails::with_bad_request_violation(field, detail);
    details.set_error_info(REASON_INVALID_FIELD, DOMAIN, HashMap::from([("field".to_string(), field.to_string())]));
    Status::with_error_details(Code::InvalidArgument, format!("{field}: {detail}"), details)
}

/// UNAVAILABLE from a replica that does not lead: `leader_addr`, when
/// known, in the details and in the leader header (go there at once);
/// when not, a `RetryInfo` of [`NO_LEADER_RETRY_DELAY`].
pub fn not_leader(message: String, leader_addr: Option<&str>) -> Status {
    let metadata: HashMap<String, String> =
        leader_addr.map(|addr| HashMap::from([("leader_addr".to_string(), addr.to_string())])).unwrap_or_default();
    let mut details = ErrorDetails::with_error_info(REASON_NOT_LEADER, DOMAIN, metadata);
    if leader_addr.is_none() {
        details.set_retry_info(Some(NO_LEADER_RETRY_DELAY));
    }
    let mut status = Status::with_error_details(Code::Unavailable, message, details);
    if let Some(value) = leader_addr.and_then(|addr| addr.parse().ok()) {
        status.metadata_mut().insert(LEADER_ADDR_METADATA_KEY, value);
    }
    status
}

/// UNAVAILABLE from a replica whose input queue is full: nothing was
/// applied; retry after [`OVERLOADED_RETRY_DELAY`] (`RetryInfo`). The
/// leader, when known (this replica itself, most often), is named as a
/// follower names it, so that callers stay on it instead of moving away.
pub fn overloaded(message: String, leader_addr: Option<&str>) -> Status {
    let metadata: HashMap<String, String> =
        leader_addr.map(|addr| HashMap::from([("leader_addr".to_string(), addr.to_string())])).unwrap_or_default();
    let mut details = ErrorDetails::with_error_info(REASON_OVERLOADED, DOMAIN, metadata);
    details.set_retry_info(Some(OVERLOADED_RETRY_DELAY));
    let mut status = Status::with_error_details(Code::Unavailable, message, details);
    if let Some(value) = leader_addr.and_then(|addr| addr.parse().ok()) {
        status.metadata_mut().insert(LEADER_ADDR_METADATA_KEY, value);
    }
    status
}

/// Writes refused because the replica's data disk is below its free-space
/// watermark: RESOURCE_EXHAUSTED with an `ErrorInfo` of reason `DISK_LOW`.
/// Not retried by clients: space must be freed by an operator first.
pub fn disk_low(message: String) -> Status {
    let details = ErrorDetails::with_error_info(REASON_DISK_LOW, DOMAIN, HashMap::new());
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// A refusal of the caller's identity (`code` is PERMISSION_DENIED or
/// UNAUTHENTICATED), with an `ErrorInfo` naming the rule that refused it.
pub fn denied(code: Code, message: &str, rule: Option<&str>) -> Status {
    let metadata: HashMap<String, String> =
        rule.map(|rule| HashMap::from([("rule".to_string(), rule.to_string())])).unwrap_or_default();
    let details = ErrorDetails::with_error_info(REASON_NOT_ALLOWED, DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// RESOURCE_EXHAUSTED for a caller barred after refused calls: nothing was
/// looked at; `RetryInfo` says when the bar ends.
pub fn throttled(message: &str, left: Duration) -> Status {
    let mut details = ErrorDetails::with_error_info(REASON_THROTTLED, DOMAIN, HashMap::new());
    details.set_retry_info(Some(left));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// `status` with the cell's pair `epoch`: in the `cellbank-epoch` header
/// (which routers read) and, when the status carries no details yet, in an
/// `ErrorInfo` (`EPOCH_MISMATCH`, metadata `epoch`) for other clients.
pub fn with_epoch(status: Status, epoch: u64) -> Status {
    let mut status = if status.details().is_empty() {
        let details = ErrorDetails::with_error_info(
            REASON_EPOCH_MISMATCH,
            DOMAIN,
            HashMap::from([("epoch".to_string(), epoch.to_string())]),
        );
        let mut rebuilt = Status::with_error_details(status.code(), status.message(), details);
        *rebuilt.metadata_mut() = status.metadata().clone();
        rebuilt
    } else {
        status
    };
    if let Ok(value) = epoch.to_string().parse() {
        status.metadata_mut().insert(EPOCH_METADATA_KEY, value);
    }
    status
}

/// How long a refusal asks its caller to wait before retrying
/// (`RetryInfo`), if it says.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// The field a refusal names, from its `BadRequest` details.
pub fn bad_field(status: &Status) -> Option<String> {
    status.get_details_bad_request()?.field_violations.first().map(|v| v.field.clone())
}

/// The reason a refusal gives, from its `ErrorInfo` details.
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named_in_the_details_and_the_message() {
        let status = invalid_argument("amount", "must be at least 1");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "amount: must be at least 1");
        assert_eq!(bad_field(&status).as_deref(), Some("amount"));
        assert_eq!(reason(&status).as_deref(), Some(REASON_INVALID_FIELD));
        // The details survive the trip through gRPC trailers (encoded in
        // `grpc-status-details-bin`).
        let header = status.clone().into_http();
        let back = Status::from_header_map(header.headers()).expect("a status");
        assert_eq!(bad_field(&back).as_deref(), Some("amount"));
    }

    #[test]
    fn a_follower_names_its_leader_in_the_details_and_the_header() {
        let status = not_leader("not the leader".into(), Some("127.0.0.1:7102"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(crate::retry::leader_hint(&status), Some("127.0.0.1:7102"));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), (REASON_NOT_LEADER, DOMAIN));
        assert_eq!(info.metadata.get("leader_addr").map(String::as_str), Some("127.0.0.1:7102"));
        assert_eq!(retry_delay(&status), None, "a named leader is tried at once");
        let unknown = not_leader("no leader yet".into(), None);
        assert_eq!(crate::retry::leader_hint(&unknown), None);
        assert_eq!(retry_delay(&unknown), Some(NO_LEADER_RETRY_DELAY));
        assert!(crate::retry::retryable(&unknown, false));
    }

    #[test]
    fn an_epoch_refusal_names_the_epoch_in_the_header_and_the_details() {
        let status = with_epoch(Status::unavailable("cell 3 is STANDBY at epoch 4"), 4);
        assert_eq!(crate::retry::epoch_hint(&status), Some(4));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.metadata.get("epoch").map(String::as_str)),
            (REASON_EPOCH_MISMATCH, Some("4"))
        );
        assert_eq!((status.code(), status.message()), (Code::Unavailable, "cell 3 is STANDBY at epoch 4"));
        // Details already there are kept; the header is added.
        let named = with_epoch(invalid_argument("epoch", "older"), 7);
        assert_eq!(
            (reason(&named).as_deref(), crate::retry::epoch_hint(&named)),
            (Some(REASON_INVALID_FIELD), Some(7))
        );
    }

    #[test]
    fn a_full_queue_asks_for_a_pause_and_is_retried() {
        let status = overloaded("replica overloaded: input queue full".into(), Some("127.0.0.1:7101"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status).as_deref(), Some(REASON_OVERLOADED));
        assert_eq!(crate::retry::leader_hint(&status), Some("127.0.0.1:7101"), "stay on the leader");
        assert!(crate::retry::retryable(&status, false), "nothing was applied");
        let header = status.clone().into_http();
        let back = Status::from_header_map(header.headers()).expect("a status");
        assert_eq!(retry_delay(&back), Some(OVERLOADED_RETRY_DELAY));
    }
}
