//! Validation of client input, shared by the gRPC service (which answers
//! INVALID_ARGUMENT before proposing) and the state machine (which re-checks
//! every command it applies, so a bad command can never change a balance).

use cellbank_proto::cell::{GrabCommand, MoveCommand, SendEnvelopeCommand};
use cellbank_proto::v1::TransferKind;

use crate::currency::Currency;

/// Longest transfer id, in bytes.
pub const TRANSFER_ID_BYTES_MAX: usize = 64;
/// Most bytes of a transfer id as a cell stores it: a service's id (at most
/// [`TRANSFER_ID_BYTES_MAX`]) under its namespace (see [`in_namespace`]).
pub const STORED_TRANSFER_ID_BYTES_MAX: usize = 128;
/// Where the services' namespaces begin: a service's id `abc` is stored as
/// `svc:<service>:abc`.
pub const SERVICE_NAMESPACE_PREFIX: &str = "svc:";
/// Largest amount in one movement: amounts above it are what a negative
/// number sent as unsigned looks like.
pub const AMOUNT_MAX: u64 = i64::MAX as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

fn invalid(field: &'static str, detail: impl Into<String>) -> Invalid {
    Invalid { field, detail: detail.into() }
}

pub struct ValidMove {
    pub kind: TransferKind,
    pub currency: Currency,
}

/// A transfer id as cells store it: 1 to [`STORED_TRANSFER_ID_BYTES_MAX`]
/// bytes of UTF-8 (a client's own ids are checked by [`client_transfer_id`]).
pub fn transfer_id(id: &[u8]) -> Result<(), Invalid> {
    id_of_length(id, STORED_TRANSFER_ID_BYTES_MAX)
}

/// A transfer id as a client gives it to the routers: 1 to
/// [`TRANSFER_ID_BYTES_MAX`] bytes of UTF-8.
pub fn client_transfer_id(id: &[u8]) -> Result<(), Invalid> {
    id_of_length(id, TRANSFER_ID_BYTES_MAX)
}

fn id_of_length(id: &[u8], max: usize) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > max {
        return Err(invalid("transfer_id", format!("must be 1 to {max} bytes, got {}", id.len())));
    }
    if std::str::from_utf8(id).is_err() {
        return Err(invalid("transfer_id", "must be valid UTF-8"));
    }
    Ok(())
}

/// The namespace of a service's transfer ids.
pub fn service_namespace(service: &str) -> String {
    format!("{SERVICE_NAMESPACE_PREFIX}{service}:")
}

/// Puts a client's transfer id for a write in the caller's namespace: a
/// service's ids are its own, so that no service can take, pre-empt or
/// answer as a duplicate of another's transfer. A caller without a
/// namespace (an operator) may not write into a service's.
pub fn in_namespace(namespace: Option<&str>, id: &mut Vec<u8>) -> Result<(), Invalid> {
    client_transfer_id(id)?;
    match namespace {
        Some(namespace) => {
            id.splice(0..0, namespace.bytes());
            transfer_id(id)
                .map_err(|_| invalid("transfer_id", format!("the namespace {namespace:?} leaves no room for the id")))
        }
        None if id.starts_with(SERVICE_NAMESPACE_PREFIX.as_bytes()) => Err(invalid(
            "transfer_id",
            format!("ids that begin with {SERVICE_NAMESPACE_PREFIX:?} are services' namespaces"),
        )),
        None => Ok(()),
    }
}

/// Names a transfer to look up: a service's own id in its namespace; an
/// operator's as given (it may name any service's, `svc:<service>:<id>`).
pub fn lookup_in_namespace(namespace: Option<&str>, id: &mut Vec<u8>) -> Result<(), Invalid> {
    match namespace {
        Some(namespace) => {
            client_transfer_id(id)?;
            id.splice(0..0, namespace.bytes());
            transfer_id(id)
        }
        None => transfer_id(id),
    }
}

/// A stored id as its caller knows it: without the caller's namespace.
pub fn out_of_namespace(namespace: Option<&str>, id: &mut Vec<u8>) {
    if let Some(namespace) = namespace {
        if id.starts_with(namespace.as_bytes()) {
            id.drain(..namespace.len());
        }
    }
}

/// A request that names a transfer: by `transfer_id` (bytes) or, for a
/// caller that cannot send bytes (JSON, grpcurl), by `transfer_id_text`.
pub trait NamesTransfer {
    fn transfer_ids(&mut self) -> (&mut Vec<u8>, &mut String);
}

macro_rules! names_transfer {
    ($($request:ty),*) => {$(
        impl NamesTransfer for $request {
            fn transfer_ids(&mut self) -> (&mut Vec<u8>, &mut String) {
                (&mut self.transfer_id, &mut self.transfer_id_text)
            }
        }
    )*};
}

names_transfer!(
    cellbank_proto::v1::DepositRequest,
    cellbank_proto::v1::WithdrawRequest,
    cellbank_proto::v1::TransferRequest,
    cellbank_proto::v1::GetTransferRequest,
    cellbank_proto::v1::SendEnvelopeRequest
);

/// Moves a request's text id into its byte id, so that what follows reads
/// one field: the text's UTF-8 bytes are the id. Both set and different is
/// refused (`transfer_id_text`); the id itself is checked later, as any id.
pub fn take_transfer_id(request: &mut impl NamesTransfer) -> Result<(), Invalid> {
    let (bytes, text) = request.transfer_ids();
    if text.is_empty() {
        return Ok(());
    }
    if !bytes.is_empty() && bytes.as_slice() != text.as_bytes() {
        return Err(invalid("transfer_id_text", "names another id than transfer_id; set one of the two"));
    }
    *bytes = std::mem::take(text).into_bytes();
    Ok(())
}

pub fn user_id(field: &'static str, id: u64) -> Result<(), Invalid> {
    if id == 0 {
        return Err(invalid(field, "must be set (user ids start at 1)"));
    }
    Ok(())
}

pub fn currency(code: &str) -> Result<Currency, Invalid> {
    Currency::parse(code).map_err(|detail| invalid("currency", detail))
}

pub fn amount(amount: u64) -> Result<(), Invalid> {
    if amount == 0 {
        return Err(invalid("amount", "must be at least 1 minor unit"));
    }
    if amount > AMOUNT_MAX {
        return Err(invalid("amount", format!("{amount} exceeds {AMOUNT_MAX} (a negative number sent as unsigned?)")));
    }
    Ok(())
}

pub fn open_account(id: u64, code: &str) -> Result<Currency, Invalid> {
    user_id("user_id", id)?;
    currency(code)
}

pub fn move_command(command: &MoveCommand) -> Result<ValidMove, Invalid> {
    transfer_id(&command.transfer_id)?;
    let kind = TransferKind::try_from(command.kind).unwrap_or(TransferKind::Unspecified);
    match kind {
        TransferKind::Transfer => {
            user_id("from_user_id", command.from_user_id)?;
            user_id("to_user_id", command.to_user_id)?;
            if command.from_user_id == command.to_user_id {
                return Err(invalid("to_user_id", "must differ from from_user_id"));
            }
        }
        TransferKind::Deposit => {
            user_id("user_id", command.to_user_id)?;
            if command.from_user_id != 0 {
                return Err(invalid("from_user_id", "a deposit has no sending user"));
            }
        }
        TransferKind::Withdraw => {
            user_id("user_id", command.from_user_id)?;
            if command.to_user_id != 0 {
                return Err(invalid("to_user_id", "a withdrawal has no receiving user"));
            }
        }
        _ => return Err(invalid("kind", "must be TRANSFER, DEPOSIT or WITHDRAW")),
    }
    if command.source_pair_id != 0 || command.dest_pair_id != 0 {
        if kind != TransferKind::Transfer {
            return Err(invalid("kind", "only a TRANSFER crosses cells"));
        }
        if command.source_pair_id == 0 || command.dest_pair_id == 0 {
            return Err(invalid("dest_pair_id", "a cross-cell transfer names both pairs"));
        }
        if command.source_pair_id == command.dest_pair_id {
            return Err(invalid("dest_pair_id", "must differ from source_pair_id"));
        }
    }
    let currency = currency(&command.currency)?;
    amount(command.amount)?;
    Ok(ValidMove { kind, currency })
}

/// Most shares in one envelope.
pub const ENVELOPE_SHARES_MAX: u32 = 100_000;
/// How long an envelope stays open when the sender does not say.
pub const ENVELOPE_EXPIRY_DEFAULT_MS: u64 = 24 * 3600 * 1000;
/// Furthest expiry a sender may choose.
pub const ENVELOPE_EXPIRY_MAX_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest envelope id: a user id, a dot and a transfer id.
pub const ENVELOPE_ID_BYTES_MAX: usize = 20 + 1 + STORED_TRANSFER_ID_BYTES_MAX;

/// Checks a send; `now_ms` is the proposer's clock (in apply, the entry's
/// timestamp), against which the expiry must lie in (now, now + 7 days].
pub fn send_envelope(command: &SendEnvelopeCommand, now_ms: u64) -> Result<Currency, Invalid> {
    let currency = send_envelope_fields(command)?;
    expiry(command.expires_at_ms, now_ms)?;
    Ok(currency)
}

/// The checks of a send that do not depend on time (a retry of a recorded
/// send is answered after these, whatever the clock says now).
pub fn send_envelope_fields(command: &SendEnvelopeCommand) -> Result<Currency, Invalid> {
    transfer_id(&command.transfer_id)?;
    user_id("sender_user_id", command.sender_user_id)?;
    let currency = currency(&command.currency)?;
    if command.total == 0 {
        return Err(invalid("total", "must be at least 1 minor unit"));
    }
    if command.total > AMOUNT_MAX {
        return Err(invalid("total", format!("{} exceeds {AMOUNT_MAX}", command.total)));
    }
    if command.shares == 0 || command.shares > ENVELOPE_SHARES_MAX {
        return Err(invalid("shares", format!("must be 1 to {ENVELOPE_SHARES_MAX}, got {}", command.shares)));
    }
    if u64::from(command.shares) > command.total {
        return Err(invalid(
            "shares",
            format!("{} shares of {} minor units: every share needs at least one unit", command.shares, command.total),
        ));
    }
    if !(0..=2).contains(&command.split) {
        return Err(invalid("split", "must be RANDOM or EVEN"));
    }
    Ok(currency)
}

pub fn expiry(expires_at_ms: u64, now_ms: u64) -> Result<(), Invalid> {
    if expires_at_ms <= now_ms {
        return Err(invalid("expires_at_ms", format!("{expires_at_ms} is not in the future")));
    }
    if expires_at_ms - now_ms > ENVELOPE_EXPIRY_MAX_MS {
        return Err(invalid("expires_at_ms", "is more than 7 days away"));
    }
    Ok(())
}

/// The sender encoded in an envelope id `<sender_user_id>.<transfer_id>`.
pub fn envelope_id(id: &str) -> Result<u64, Invalid> {
    if id.is_empty() || id.len() > ENVELOPE_ID_BYTES_MAX {
        return Err(invalid("envelope_id", format!("must be 1 to {ENVELOPE_ID_BYTES_MAX} bytes")));
    }
    let (sender, send_id) =
        id.split_once('.').ok_or_else(|| invalid("envelope_id", "is not an id SendEnvelope returned"))?;
    let sender: u64 = sender.parse().map_err(|_| invalid("envelope_id", "is not an id SendEnvelope returned"))?;
    if sender == 0 || send_id.is_empty() {
        return Err(invalid("envelope_id", "is not an id SendEnvelope returned"));
    }
    Ok(sender)
}

pub fn grab(command: &GrabCommand) -> Result<u64, Invalid> {
    let sender = envelope_id(&command.envelope_id)?;
    user_id("user_id", command.user_id)?;
    if (command.envelope_pair_id == 0) != (command.grabber_pair_id == 0) {
        return Err(invalid("grabber_pair_id", "both pairs are set (through a router) or neither (a local grab)"));
    }
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use cellbank_proto::v1::TransferRequest;

    use super::*;

    #[test]
    fn an_id_as_text_is_the_same_id_and_two_different_ids_are_refused() {
        let mut text = TransferRequest { transfer_id_text: "order-42".into(), ..Default::default() };
        take_transfer_id(&mut text).unwrap();
        assert_eq!((text.transfer_id.as_slice(), text.transfer_id_text.as_str()), (&b"order-42"[..], ""));
        let mut both = TransferRequest {
            transfer_id: b"order-42".to_vec(),
            transfer_id_text: "order-42".into(),
            ..Default::default()
        };
        take_transfer_id(&mut both).unwrap();
        assert_eq!(both.transfer_id, b"order-42");
        let mut bytes = TransferRequest { transfer_id: b"order-42".to_vec(), ..Default::default() };
        take_transfer_id(&mut bytes).unwrap();
        assert_eq!(bytes.transfer_id, b"order-42");
        let mut two = TransferRequest {
            transfer_id: b"order-42".to_vec(),
            transfer_id_text: "order-43".into(),
            ..Default::default()
        };
        assert_eq!(take_transfer_id(&mut two).unwrap_err().field, "transfer_id_text");
        assert_eq!(two.transfer_id, b"order-42", "a refused request is left as it was");
    }
}
