//! cellbank's gRPC contracts, generated from `proto/cellbank/**.proto`.
//!
//! - [`v1`]: the public `cellbank.v1.Ledger` API that clients call.
//! - [`cell`]: internal services of a cell replica (Raft transport, snapshots,
//!   status, membership, standby replication) and the command encoding of
//!   Raft entries.
//! - [`router`]: the routers' routing table and operator actions.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

/// The generated modules, nested as their packages are (one proto package
/// refers to another through `super::`).
pub mod cellbank {
    pub mod v1 {
        tonic::include_proto!("cellbank.v1");
    }
    pub mod cell {
        pub mod v1 {
            tonic::include_proto!("cellbank.cell.v1");
        }
    }
    pub mod router {
        pub mod v1 {
            tonic::include_proto!("cellbank.router.v1");
        }
    }
}

pub use cellbank::cell::v1 as cell;
pub use cellbank::router::v1 as router;
pub use cellbank::v1;

/// Encoded `FileDescriptorSet` of every cellbank proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cellbank_descriptor");

/// Most transfers one `SubmitTransfers` call may carry.
pub const SUBMIT_TRANSFERS_ITEMS_MAX: usize = 8189;

/// gRPC metadata key carrying the leader's client address on an UNAVAILABLE answer.
pub const LEADER_ADDR_METADATA_KEY: &str = "cellbank-leader-addr";

/// gRPC metadata key carrying a slice's routing epoch: set by routers on every
/// request to a cell, and by a cell on a refusal (its own epoch).
pub const EPOCH_METADATA_KEY: &str = "cellbank-epoch";

/// Checks `authorization: Bearer <token>` on an admin request against the
/// configured token (compared in time that depends only on the lengths).
/// Shared by the routers' admin API and the replicas' fault points.
#[allow(clippy::result_large_err)]
pub fn check_admin_token<T>(request: &tonic::Request<T>, token: &str) -> Result<(), tonic::Status> {
    let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
    match presented.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(tonic::Status::permission_denied("authorization: the admin token is wrong")),
        None => Err(tonic::Status::unauthenticated("authorization: admin calls need `Bearer <admin token>`")),
    }
}

fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The name of a public enum's value without the enum's prefix (`OK` for
/// `RESULT_CODE_OK`), as the CLI, the logs, the metrics' labels, refusal
/// texts and drill histories print it. The proto names gained their prefix
/// for other languages' generated code; the words people and scripts read
/// stayed those of earlier versions.
pub trait ShortName {
    fn short_name(&self) -> &'static str;
}

macro_rules! short_names {
    ($($enum:ty => $prefix:literal),*) => {$(
        impl ShortName for $enum {
            fn short_name(&self) -> &'static str {
                let name = self.as_str_name();
                // The zero value had its prefix before too.
                if name.ends_with("_UNSPECIFIED") {
                    return name;
                }
                name.strip_prefix($prefix).unwrap_or(name)
            }
        }
    )*};
}

short_names!(
    v1::ResultCode => "RESULT_CODE_",
    v1::Settlement => "SETTLEMENT_",
    v1::EnvelopeSplit => "ENVELOPE_SPLIT_",
    v1::EnvelopeState => "ENVELOPE_STATE_",
    v1::TransferKind => "TRANSFER_KIND_"
);

#[cfg(test)]
mod tests {
    use super::v1::{ResultCode, Settlement, TransferKind};
    use super::ShortName;

    #[test]
    fn short_names_are_the_words_of_earlier_versions() {
        assert_eq!(ResultCode::Ok.short_name(), "OK");
        assert_eq!(ResultCode::IdReusedWithDifferentFields.short_name(), "ID_REUSED_WITH_DIFFERENT_FIELDS");
        assert_eq!(ResultCode::Unspecified.short_name(), "RESULT_CODE_UNSPECIFIED");
        assert_eq!(Settlement::Unspecified.short_name(), "SETTLEMENT_UNSPECIFIED");
        assert_eq!(Settlement::InTransit.short_name(), "IN_TRANSIT");
        assert_eq!(TransferKind::EnvelopeGrab.short_name(), "ENVELOPE_GRAB");
        assert_eq!(ResultCode::Ok.as_str_name(), "RESULT_CODE_OK", "the proto name, for other languages");
    }
}
