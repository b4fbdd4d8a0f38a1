//! Validation of client input, shared by the gRPC service (which answers
//! INVALID_ARGUMENT before proposing) and the state machine (which re-checks
//! every command it applies, so a bad command can never change a balance).

use cellbank_proto::cell::MoveCommand;
use cellbank_proto::v1::TransferKind;

use super::Currency;

/// Longest transfer id, in bytes.
pub const TRANSFER_ID_BYTES_MAX: usize = 64;
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

pub fn transfer_id(id: &[u8]) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(invalid("transfer_id", "must be 1 to 64 bytes, got 0"));
    }
    if id.len() > TRANSFER_ID_BYTES_MAX {
        return Err(invalid("transfer_id", format!("must be 1 to 64 bytes, got {}", id.len())));
    }
    if std::str::from_utf8(id).is_err() {
        return Err(invalid("transfer_id", "must be valid UTF-8"));
    }
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
        TransferKind::Unspecified => return Err(invalid("kind", "must be TRANSFER, DEPOSIT or WITHDRAW")),
    }
    let currency = currency(&command.currency)?;
    amount(command.amount)?;
    Ok(ValidMove { kind, currency })
}
