//! The public `cellbank.v1.Ledger` API on one replica.
//!
//! Writes are validated before they are proposed (a malformed request is
//! INVALID_ARGUMENT naming the field and never reaches the log); the state
//! machine validates again on apply. Reads go through ReadIndex on the
//! leader. Anything that is not the leader answers UNAVAILABLE with the
//! leader's address in the `cellbank-leader-addr` metadata.

use std::time::Duration;

use cellbank_proto::cell::{command, Command, MoveCommand, OpenAccountCommand, SendEnvelopeCommand};
use cellbank_proto::v1::ledger_server::Ledger as LedgerApi;
use cellbank_proto::v1::*;
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::context::{invalid, now_ms, page_size, timeout_of, ReplicaContext, SnapshotKv};
use crate::ledger::{self, validate, AccountId};

fn move_command(
    kind: TransferKind,
    transfer_id: Vec<u8>,
    from: u64,
    to: u64,
    currency: String,
    amount: u64,
) -> MoveCommand {
    MoveCommand {
        transfer_id,
        kind: kind as i32,
        from_user_id: from,
        to_user_id: to,
        currency,
        amount,
        ..Default::default()
    }
}

/// One page of the keys under `prefix`, from `start` on: each key's suffix
/// after the prefix (its big-endian position) and its value become an item,
/// at most `page_size` of them. The next page's token is the suffix of the
/// first key not taken (empty after the last page), which is where that
/// page starts.
fn page<T>(
    view: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
    prefix: &[u8],
    start: &[u8],
    page_size: u32,
    mut item: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, Status>,
) -> Result<(Vec<T>, Vec<u8>), Status> {
    let mut iter = view.raw_iterator();
    iter.seek(start);
    let mut items = Vec::new();
    while iter.valid() {
        let key = iter.key().expect("key");
        if !key.starts_with(prefix) {
            break;
        }
        let suffix = &key[prefix.len()..];
        if items.len() as u32 == page_size {
            return Ok((items, suffix.to_vec()));
        }
        items.extend(item(suffix, iter.value().expect("value"))?);
        iter.next();
    }
    Ok((items, Vec::new()))
}

/// A record as answered: with its id as text too, for readers of JSON.
/// Filled here, not stored, so the ledger's bytes (and digests) are those
/// of every earlier version.
fn with_text_id(record: TransferRecord) -> TransferRecord {
    let transfer_id_text = String::from_utf8_lossy(&record.transfer_id).into_owned();
    TransferRecord { transfer_id_text, ..record }
}

fn wrap(movement: MoveCommand) -> Command {
    Command { kind: Some(command::Kind::Move(movement)) }
}

pub struct LedgerService {
    pub context: ReplicaContext,
}

impl LedgerService {
    /// A read of a user whose slice has left this cell is refused
    /// (UNAVAILABLE: the router asks again where the table then points):
    /// what is left here is the slice as it was when it left.
    fn check_slice_here(&self, kv: &dyn cellbank_raft::Kv, user_id: u64) -> Result<(), Status> {
        self.context.check_slices_here(kv, [user_id])
    }
}

impl LedgerService {
    /// A request that names a transfer, let in: its deadline, the gate
    /// passed, its text id folded into the byte id.
    fn accept<R: validate::NamesTransfer>(&self, request: Request<R>) -> Result<(Duration, R), Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        Ok((timeout, r))
    }

    async fn single_move(
        &self,
        timeout: Duration,
        movement: MoveCommand,
    ) -> Result<Response<TransferResponse>, Status> {
        validate::move_command(&movement).map_err(invalid)?;
        let mut results = self.context.propose(timeout, vec![wrap(movement)]).await?;
        let result = results.pop().expect("one result per command");
        Ok(Response::new(TransferResponse { result: Some(result) }))
    }
}

#[tonic::async_trait]
impl LedgerApi for LedgerService {
    async fn open_account(
        &self,
        request: Request<OpenAccountRequest>,
    ) -> Result<Response<OpenAccountResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let request = request.into_inner();
        validate::open_account(request.user_id, &request.currency).map_err(invalid)?;
        let command = Command {
            kind: Some(command::Kind::OpenAccount(OpenAccountCommand {
                user_id: request.user_id,
                currency: request.currency,
            })),
        };
        let mut results = self.context.propose(timeout, vec![command]).await?;
        let result = results.pop().expect("one result per command");
        Ok(Response::new(OpenAccountResponse { code: result.code, detail: result.detail }))
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<TransferResponse>, Status> {
        let (timeout, r) = self.accept(request)?;
        self.single_move(
            timeout,
            move_command(TransferKind::Deposit, r.transfer_id, 0, r.user_id, r.currency, r.amount),
        )
        .await
    }

    async fn withdraw(&self, request: Request<WithdrawRequest>) -> Result<Response<TransferResponse>, Status> {
        let (timeout, r) = self.accept(request)?;
        self.single_move(
            timeout,
            move_command(TransferKind::Withdraw, r.transfer_id, r.user_id, 0, r.currency, r.amount),
        )
        .await
    }

    async fn transfer(&self, request: Request<TransferRequest>) -> Result<Response<TransferResponse>, Status> {
        let (timeout, r) = self.accept(request)?;
        let movement =
            move_command(TransferKind::Transfer, r.transfer_id, r.from_user_id, r.to_user_id, r.currency, r.amount);
        self.single_move(timeout, movement).await
    }

    async fn submit_transfers(
        &self,
        request: Request<SubmitTransfersRequest>,
    ) -> Result<Response<SubmitTransfersResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let items = request.into_inner().transfers;
        if items.is_empty() {
            return Err(Status::invalid_argument("transfers: must hold at least one transfer"));
        }
        if items.len() > SUBMIT_TRANSFERS_ITEMS_MAX {
            return Err(Status::invalid_argument(format!(
                "transfers: {} items, at most {SUBMIT_TRANSFERS_ITEMS_MAX} per call",
                items.len()
            )));
        }
        let mut results: Vec<Option<TransferResult>> = vec![None; items.len()];
        let mut commands = Vec::with_capacity(items.len());
        let mut positions = Vec::with_capacity(items.len());
        for (position, mut r) in items.into_iter().enumerate() {
            let named = validate::take_transfer_id(&mut r);
            let movement =
                move_command(TransferKind::Transfer, r.transfer_id, r.from_user_id, r.to_user_id, r.currency, r.amount);
            match named.and_then(|()| validate::move_command(&movement)) {
                Ok(_) => {
                    commands.push(wrap(movement));
                    positions.push(position);
                }
                Err(error) => {
                    results[position] = Some(TransferResult {
                        code: ResultCode::InvalidItem as i32,
                        field: error.field.into(),
                        detail: error.detail,
                        ..Default::default()
                    });
                }
            }
        }
        if !commands.is_empty() {
            let applied = self.context.propose(timeout, commands).await?;
            assert_eq!(applied.len(), positions.len(), "one result per proposed command");
            for (position, result) in positions.into_iter().zip(applied) {
                results[position] = Some(result);
            }
        }
        let results = results.into_iter().map(|r| r.expect("every item has a result")).collect();
        Ok(Response::new(SubmitTransfersResponse { results }))
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let currency = validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let (view, read_index) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        self.check_slice_here(&kv, r.user_id)?;
        let account = ledger::get_user_account(&kv, r.user_id, currency)
            .ok_or_else(|| Status::not_found(format!("no account for user {} in {}", r.user_id, r.currency)))?;
        Ok(Response::new(GetAccountResponse {
            user_id: r.user_id,
            currency: r.currency,
            balance: u64::try_from(account.balance).expect("user balances are within u64"),
            version: account.version,
            read_index,
        }))
    }

    async fn get_transfer(
        &self,
        request: Request<GetTransferRequest>,
    ) -> Result<Response<GetTransferResponse>, Status> {
        let (timeout, r) = self.accept(request)?;
        validate::transfer_id(&r.transfer_id).map_err(invalid)?;
        let (view, _) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        let record = ledger::read_transfer(&kv, &r.transfer_id)
            .ok_or_else(|| Status::not_found("no transfer with this transfer_id"))?;
        Ok(Response::new(GetTransferResponse { transfer: Some(with_text_id(record)) }))
    }

    async fn list_transfers(
        &self,
        request: Request<ListTransfersRequest>,
    ) -> Result<Response<ListTransfersResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let currency = validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let page_size = page_size(r.page_size)?;
        let start = match r.page_token.len() {
            0 => 0,
            8 => u64::from_be_bytes(r.page_token[..].try_into().expect("8 bytes")),
            _ => return Err(Status::invalid_argument("page_token: not a token this server issued")),
        };
        let (view, _) = self.context.read_view(timeout).await?;
        self.check_slice_here(&SnapshotKv(&view), r.user_id)?;
        let id = AccountId::user(r.user_id, currency);
        let account_exists = view.get(id.key()).map_err(|e| Status::internal(e.to_string()))?.is_some();
        if !account_exists {
            return Err(Status::not_found(format!("no account for user {} in {}", r.user_id, r.currency)));
        }
        let (transfers, next_page_token) =
            page(&view, &id.history_prefix(), &id.history_key(start), page_size, |_, value| {
                let (_, record_key) =
                    ledger::parse_history(value).ok_or_else(|| Status::internal("a history entry is malformed"))?;
                let record = view
                    .get(record_key)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .ok_or_else(|| Status::internal("history names a record that does not exist"))?;
                let record = TransferRecord::decode(record.as_slice()).map_err(|e| Status::internal(e.to_string()))?;
                // A balance that moved with its slice left and arrived in
                // pairs of entries that cancel out: bookkeeping between
                // pairs, not a movement of the user's money.
                if record.kind == TransferKind::SliceMove as i32 {
                    return Ok(None);
                }
                Ok(Some(with_text_id(record)))
            })?;
        Ok(Response::new(ListTransfersResponse { transfers, next_page_token }))
    }

    async fn send_envelope(
        &self,
        request: Request<SendEnvelopeRequest>,
    ) -> Result<Response<SendEnvelopeResponse>, Status> {
        let (timeout, r) = self.accept(request)?;
        let now = now_ms();
        let command = SendEnvelopeCommand {
            transfer_id: r.transfer_id,
            sender_user_id: r.sender_user_id,
            currency: r.currency,
            total: r.total,
            shares: r.shares,
            split: r.split,
            expires_at_ms: match r.expires_at_ms {
                0 => now + validate::ENVELOPE_EXPIRY_DEFAULT_MS,
                at => at,
            },
        };
        validate::send_envelope_fields(&command).map_err(invalid)?;
        // A retry of a recorded send is answered by the log whatever the
        // clock says now; only a new send must expire in the future.
        let recorded =
            ledger::read_transfer(&cellbank_raft::ReadOnlyDb(&self.context.db), &command.transfer_id).is_some();
        if !recorded {
            validate::expiry(command.expires_at_ms, now).map_err(invalid)?;
        }
        let envelope_id = ledger::envelope::envelope_id(command.sender_user_id, &command.transfer_id);
        let expires_at_ms = command.expires_at_ms;
        let mut results =
            self.context.propose(timeout, vec![Command { kind: Some(command::Kind::SendEnvelope(command)) }]).await?;
        let result = results.pop().expect("one result per command");
        // A retry answers with the envelope as first sent.
        let expires_at_ms = if result.duplicate {
            ledger::envelope::read_envelope(&cellbank_raft::ReadOnlyDb(&self.context.db), &envelope_id)
                .map(|e| e.expires_at_ms)
                .unwrap_or(expires_at_ms)
        } else {
            expires_at_ms
        };
        Ok(Response::new(SendEnvelopeResponse { result: Some(result), envelope_id, expires_at_ms }))
    }

    async fn grab_envelope(
        &self,
        request: Request<GrabEnvelopeRequest>,
    ) -> Result<Response<GrabEnvelopeResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let grab = crate::clearing::local_grab(r.envelope_id, r.user_id);
        validate::grab(&grab).map_err(invalid)?;
        let envelope_id = grab.envelope_id.clone();
        let mut results =
            self.context.propose(timeout, vec![Command { kind: Some(command::Kind::Grab(grab)) }]).await?;
        let result = results.pop().expect("one result per command");
        let currency = crate::clearing::envelope_currency(&self.context, &envelope_id);
        Ok(Response::new(crate::clearing::grab_response(result, currency)))
    }

    async fn get_envelope(
        &self,
        request: Request<GetEnvelopeRequest>,
    ) -> Result<Response<GetEnvelopeResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        validate::envelope_id(&r.envelope_id).map_err(invalid)?;
        let page_size = page_size(r.page_size)?;
        let start = match r.page_token.len() {
            0 => 1,
            4 => u32::from_be_bytes(r.page_token[..].try_into().expect("4 bytes")),
            _ => return Err(Status::invalid_argument("page_token: not a token this server issued")),
        };
        let (view, _) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        let envelope = ledger::envelope::read_envelope(&kv, &r.envelope_id)
            .ok_or_else(|| Status::not_found(format!("no envelope {}", r.envelope_id)))?;
        let prefix = ledger::keys::grabs_prefix(&r.envelope_id);
        let first = ledger::keys::grab(&r.envelope_id, start);
        let (grabs, next_page_token) = page(&view, &prefix, &first, page_size, |suffix, value| {
            let share_index = u32::from_be_bytes(suffix.try_into().expect("grab key ends in u32"));
            let record = TransferRecord::decode(value).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Some(EnvelopeGrab {
                user_id: record.to_user_id,
                amount: record.amount,
                share_index,
                settlement: record.settlement,
                timestamp_ms: record.timestamp_ms,
            }))
        })?;
        Ok(Response::new(GetEnvelopeResponse { envelope: Some(envelope), grabs, next_page_token }))
    }
}
