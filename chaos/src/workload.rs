//! The drill's workload: clients sending transfers (within and across
//! cells) and red-envelope sends and grabs through the routers at a fixed
//! rate, and a share of reads (a user's balance, a recent transfer), recording
//! every operation with what its client heard; then the resolution of
//! unknown outcomes and the read of the final state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellbank_client::CellClient;
use cellbank_proto::v1::*;
use cellbank_proto::ShortName;
use tonic::Status;

use crate::drill::{Rng, Workload, WorkloadKind};
use crate::history::{EnvelopeState, FinalState, History, Op, OpKind, Outcome, Recorded};

pub const CURRENCY: &str = "CNY";
/// Per-envelope amount per share (so every share can be at least 1).
const ENVELOPE_UNIT: u64 = 100;

/// Users, their pairs and the run's id prefix.
#[derive(Clone, Debug)]
pub struct Population {
    /// Distinguishes this run's transfer ids from any earlier run's.
    pub run_id: String,
    pub users: Vec<u64>,
    /// user -> pair id serving it.
    pub pair_of: BTreeMap<u64, u64>,
}

impl Population {
    /// `count` users from `first_user` on, skipping users whose pair is not
    /// `allowed` (an attached drill's users live inside its blast radius).
    pub fn new(
        run_id: String,
        first_user: u64,
        count: u64,
        pair_of: impl Fn(u64) -> u64,
        allowed: impl Fn(u64) -> bool,
    ) -> Population {
        let users: Vec<u64> = (first_user..).filter(|u| allowed(pair_of(*u))).take(count as usize).collect();
        let pair_of = users.iter().map(|u| (*u, pair_of(*u))).collect();
        Population { run_id, users, pair_of }
    }

    fn pair(&self, user: u64) -> u64 {
        self.pair_of.get(&user).copied().unwrap_or(0)
    }
}

/// Everything the clients heard, shared by the workers.
/// An envelope of the workload, as its grabbers know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Being sent.
    Pending,
    /// Sent (or maybe sent); grabbable.
    Open,
    /// Emptied, refused or unknown to the ledger.
    Closed,
}

pub struct Recorder {
    pub started: Instant,
    pub ops: Mutex<Vec<Op>>,
    /// Operation -> the pair it was sent to (the sender's).
    pub pairs: Mutex<Vec<u64>>,
    next_seq: AtomicU64,
    pub stop: AtomicBool,
    /// Envelopes that were sent: (id, sender, state as far as the
    /// grabbers know).
    envelopes: Mutex<Vec<(String, u64, Slot)>>,
    /// Answer time of the latest acknowledged operation (ms).
    pub last_ok_ms: AtomicU64,
    /// The ids of the latest answered transfers and envelope sends (any
    /// outcome), for the reads of a transfer to choose from.
    recent_transfers: Mutex<VecDeque<String>>,
}

/// How many of the latest transfer ids a transfer read chooses from.
const RECENT_TRANSFERS: usize = 64;

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            started: Instant::now(),
            ops: Mutex::new(Vec::new()),
            pairs: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            envelopes: Mutex::new(Vec::new()),
            last_ok_ms: AtomicU64::new(0),
            recent_transfers: Mutex::new(VecDeque::new()),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn record(&self, sent_ms: u64, kind: OpKind, outcome: Outcome, pair: u64) {
        let answered_ms = self.now_ms();
        if outcome == Outcome::Ok {
            self.last_ok_ms.fetch_max(answered_ms, Ordering::Relaxed);
        }
        if let OpKind::Transfer { transfer_id, .. } | OpKind::SendEnvelope { transfer_id, .. } = &kind {
            let mut recent = self.recent_transfers.lock().expect("recent transfers lock");
            if recent.len() == RECENT_TRANSFERS {
                recent.pop_front();
            }
            recent.push_back(transfer_id.clone());
        }
        // The sequence number is taken under the lock: ops and pairs stay
        // in step, in sequence order.
        let mut ops = self.ops.lock().expect("ops lock");
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        ops.push(Op { seq, sent_ms, answered_ms, kind, outcome, resolved: None });
        self.pairs.lock().expect("pairs lock").push(pair);
    }

    /// (operations, unknown outcomes) answered in the last `window_ms`.
    /// Operations are stored in answer order.
    pub fn recent(&self, window_ms: u64) -> (usize, usize) {
        let since = self.now_ms().saturating_sub(window_ms);
        let ops = self.ops.lock().expect("ops lock");
        let recent = ops.iter().rev().take_while(|op| op.answered_ms >= since);
        recent.fold((0, 0), |(n, u), op| (n + 1, u + usize::from(op.outcome == Outcome::Unknown)))
    }

    /// Runs `f` over the operations so far without copying them.
    pub fn with_ops<T>(&self, f: impl FnOnce(&[Op]) -> T) -> T {
        f(&self.ops.lock().expect("ops lock"))
    }

    /// The pair of each operation, in sequence order.
    pub fn op_pairs(&self) -> Vec<u64> {
        self.pairs.lock().expect("pairs lock").clone()
    }

    pub fn history(&self) -> History {
        let mut ops = self.ops.lock().expect("ops lock").clone();
        ops.sort_by_key(|op| op.seq);
        History { ops, ..Default::default() }
    }
}

fn code_name(code: i32) -> String {
    ResultCode::try_from(code).map(|c| c.short_name().to_string()).unwrap_or_else(|_| format!("CODE_{code}"))
}

fn outcome_of(result: Option<&TransferResult>) -> Outcome {
    match result {
        Some(r) if r.code == ResultCode::Ok as i32 => Outcome::Ok,
        Some(r) => Outcome::Refused(code_name(r.code)),
        None => Outcome::Unknown,
    }
}

async fn transfer(client: &CellClient, request: &TransferRequest) -> Result<TransferResponse, Status> {
    client.transfer(request.clone()).await
}

async fn send_envelope(client: &CellClient, request: &SendEnvelopeRequest) -> Result<SendEnvelopeResponse, Status> {
    client.send_envelope(request.clone()).await
}

async fn grab(client: &CellClient, envelope_id: &str, user: u64) -> Result<GrabEnvelopeResponse, Status> {
    client.grab_envelope(GrabEnvelopeRequest { envelope_id: envelope_id.to_string(), user_id: user }).await
}

/// A grab's outcome: ALREADY_GRABBED on a first grab means an earlier
/// attempt (a retry inside the client or router) applied; it names the share.
fn grab_outcome(response: &GrabEnvelopeResponse) -> (Outcome, Option<u64>) {
    match response.result.as_ref().map(|r| r.code) {
        Some(c) if c == ResultCode::Ok as i32 || c == ResultCode::AlreadyGrabbed as i32 => {
            (Outcome::Ok, Some(response.amount))
        }
        Some(c) => (Outcome::Refused(code_name(c)), None),
        None => (Outcome::Unknown, None),
    }
}

/// Opens and seeds every account (before the clock of the drill starts
/// mattering; failures here abort the drill). `fresh`: every account must
/// be new (on a shared cluster an existing one would carry another balance).
pub async fn seed(client: &CellClient, population: &Population, amount: u64, fresh: bool) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for chunk in population.users.chunks(population.users.len().div_ceil(8).max(1)) {
        let (client, chunk, run_id) =
            (CellClient::new(client.endpoints().to_vec()), chunk.to_vec(), population.run_id.clone());
        tasks.push(tokio::spawn(async move {
            for user in chunk {
                let opened =
                    client.open_account(OpenAccountRequest { user_id: user, currency: CURRENCY.into() }).await?;
                anyhow::ensure!(
                    opened.code == ResultCode::Ok as i32
                        || (!fresh && opened.code == ResultCode::AccountAlreadyExists as i32),
                    "opening user {user}: {}",
                    code_name(opened.code)
                );
                let request = DepositRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("{run_id}-seed-{user}").into_bytes(),
                    user_id: user,
                    currency: CURRENCY.into(),
                    amount,
                };
                let seeded = client.deposit(request.clone()).await?;
                let code = seeded.result.map(|r| r.code).unwrap_or(-1);
                anyhow::ensure!(code == ResultCode::Ok as i32, "seeding user {user}: {}", code_name(code));
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Most operations in flight at once (all clients together).
const IN_FLIGHT_MAX: usize = 4096;

/// Starts `workload.clients` workers; each sends its share of the rate on
/// its own clock (open loop: an operation that hangs on a dead leader does
/// not hold back the next one, so an outage of one pair shows as that
/// pair's failures, not as every client waiting).
pub fn start(
    routers: Vec<String>,
    workload: &Workload,
    population: Arc<Population>,
    recorder: Arc<Recorder>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let per_client = (workload.rate as f64 / workload.clients as f64).max(0.1);
    let interval = Duration::from_secs_f64(1.0 / per_client);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    (0..workload.clients)
        .map(|worker| {
            let mut client = CellClient::new(routers.clone());
            client.deadline = Duration::from_millis(workload.deadline_ms);
            let client = Arc::new(client);
            let (workload, population, recorder) = (workload.clone(), population.clone(), recorder.clone());
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let mut rng = Rng::new(seed ^ (worker + 1).wrapping_mul(0x1000_0000_01b3));
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n = 0u64;
                let mut grabbed: BTreeSet<(String, u64)> = BTreeSet::new();
                let mut sent = tokio::task::JoinSet::new();
                while !recorder.stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    while sent.try_join_next().is_some() {}
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                    n += 1;
                    if rng.chance(workload.reads) {
                        let ctx = Ctx { client: client.clone(), recorder: recorder.clone(), worker, n };
                        if let Some(op) = read_step(ctx, &population, &mut rng) {
                            sent.spawn(async move {
                                op.await;
                                drop(permit);
                            });
                        }
                        continue;
                    }
                    let envelope_op = match workload.kind {
                        WorkloadKind::Transfers => false,
                        WorkloadKind::Envelopes => true,
                        WorkloadKind::Mixed => rng.chance(0.5),
                    };
                    let ctx = Ctx { client: client.clone(), recorder: recorder.clone(), worker, n };
                    if envelope_op {
                        if let Some(op) = envelope_step(ctx, &workload, &population, &mut rng, &mut grabbed) {
                            sent.spawn(async move {
                                op.await;
                                drop(permit);
                            });
                        }
                    } else {
                        let op = transfer_step(ctx, &workload, &population, &mut rng);
                        sent.spawn(async move {
                            op.await;
                            drop(permit);
                        });
                    }
                }
                // Every operation sent is answered (or times out) and recorded.
                while sent.join_next().await.is_some() {}
            })
        })
        .collect()
}

/// What one operation needs once its parameters are chosen.
struct Ctx {
    client: Arc<CellClient>,
    recorder: Arc<Recorder>,
    worker: u64,
    n: u64,
}

/// Chooses a transfer (seeded) and returns the call that sends and records it.
fn transfer_step(
    ctx: Ctx,
    workload: &Workload,
    population: &Population,
    rng: &mut Rng,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let users = &population.users;
    let from = users[rng.below(users.len() as u64) as usize];
    let from_pair = population.pair(from);
    let cross = rng.chance(workload.cross_cell);
    let candidates: Vec<u64> =
        users.iter().copied().filter(|u| *u != from && (population.pair(*u) != from_pair) == cross).collect();
    let to = if candidates.is_empty() {
        users[(users.iter().position(|u| *u == from).unwrap_or(0) + 1) % users.len()]
    } else {
        candidates[rng.below(candidates.len() as u64) as usize]
    };
    // One in fifty asks for more than anyone holds: it must be refused.
    let amount =
        if rng.chance(0.02) { workload.seed_amount.saturating_mul(1000) } else { 1 + rng.below(workload.amount_max) };
    let transfer_id = format!("{}-t{}-{}", population.run_id, ctx.worker, ctx.n);
    let request = TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: transfer_id.clone().into_bytes(),
        from_user_id: from,
        to_user_id: to,
        currency: CURRENCY.into(),
        amount,
    };
    async move {
        let sent_ms = ctx.recorder.now_ms();
        let outcome = match transfer(&ctx.client, &request).await {
            Ok(response) => outcome_of(response.result.as_ref()),
            Err(_) => Outcome::Unknown,
        };
        let kind = OpKind::Transfer { transfer_id, from, to, currency: CURRENCY.into(), amount };
        ctx.recorder.record(sent_ms, kind, outcome, from_pair);
    }
}

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Chooses a read (seeded): half of them a random user's balance, half a
/// recent transfer (one of the latest answered, whatever its outcome). With
/// no transfer answered yet, a balance.
fn read_step(ctx: Ctx, population: &Population, rng: &mut Rng) -> Option<Call> {
    let users = &population.users;
    if users.is_empty() {
        return None;
    }
    let balance = rng.chance(0.5);
    let user = users[rng.below(users.len() as u64) as usize];
    let pick = rng.next_u64();
    let recent = {
        let recent = ctx.recorder.recent_transfers.lock().expect("recent transfers lock");
        (!recent.is_empty()).then(|| recent[(pick % recent.len() as u64) as usize].clone())
    };
    match recent {
        Some(transfer_id) if !balance => {
            // The pair of its sender, for the per-pair figures.
            let pair = ctx.recorder.with_ops(|ops| {
                ops.iter().rev().find_map(|op| match &op.kind {
                    OpKind::Transfer { transfer_id: id, from, .. } if *id == transfer_id => {
                        Some(population.pair(*from))
                    }
                    OpKind::SendEnvelope { transfer_id: id, sender, .. } if *id == transfer_id => {
                        Some(population.pair(*sender))
                    }
                    _ => None,
                })
            });
            Some(Box::pin(async move {
                let sent_ms = ctx.recorder.now_ms();
                let request = GetTransferRequest { transfer_id_text: transfer_id.clone(), ..Default::default() };
                let answer = ctx.client.get_transfer(request.clone()).await;
                let (outcome, found, code, settlement) = match answer {
                    Ok(response) => match response.transfer {
                        Some(record) => {
                            (Outcome::Ok, true, code_name(record.result), settlement_name(record.settlement))
                        }
                        None => (Outcome::Ok, false, String::new(), String::new()),
                    },
                    // Every pair answered that it holds no such transfer.
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        (Outcome::Ok, false, String::new(), String::new())
                    }
                    Err(_) => (Outcome::Unknown, false, String::new(), String::new()),
                };
                let kind = OpKind::ReadTransfer { transfer_id, found, code, settlement };
                ctx.recorder.record(sent_ms, kind, outcome, pair.unwrap_or(0));
            }))
        }
        _ => {
            let pair = population.pair(user);
            Some(Box::pin(async move {
                let sent_ms = ctx.recorder.now_ms();
                let answer =
                    ctx.client.get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() }).await;
                let (outcome, balance) = match answer {
                    Ok(account) => (Outcome::Ok, Some(account.balance)),
                    Err(status) => match final_error(&status) {
                        Some(refused) => (refused, None),
                        None => (Outcome::Unknown, None),
                    },
                };
                let kind = OpKind::ReadBalance { user, currency: CURRENCY.into(), balance };
                ctx.recorder.record(sent_ms, kind, outcome, pair);
            }))
        }
    }
}

fn settlement_name(settlement: i32) -> String {
    Settlement::try_from(settlement)
        .map(|s| s.short_name().to_string())
        .unwrap_or_else(|_| format!("SETTLEMENT_{settlement}"))
}

/// Chooses an envelope send or a grab (seeded) and returns the call, or
/// nothing when there is nothing left to grab.
fn envelope_step(
    ctx: Ctx,
    workload: &Workload,
    population: &Population,
    rng: &mut Rng,
    grabbed: &mut BTreeSet<(String, u64)>,
) -> Option<Call> {
    let users = &population.users;
    let open =
        ctx.recorder.envelopes.lock().expect("envelopes lock").iter().filter(|e| e.2 != Slot::Closed).count() as u64;
    // Keep `envelopes` open: send when fewer have shares left (a few extra
    // from workers racing are harmless), else grab.
    let send = open < workload.envelopes && (ctx.n % 4 == 1 || open == 0);
    if send {
        let sender = users[rng.below(users.len() as u64) as usize];
        let transfer_id = format!("{}-e{}-{}", population.run_id, ctx.worker, ctx.n);
        let total = workload.shares as u64 * ENVELOPE_UNIT;
        let request = SendEnvelopeRequest {
            transfer_id_text: String::new(),
            transfer_id: transfer_id.clone().into_bytes(),
            sender_user_id: sender,
            currency: CURRENCY.into(),
            total,
            shares: workload.shares,
            split: EnvelopeSplit::Random as i32,
            expires_at_ms: 0,
        };
        let pair = population.pair(sender);
        // Counted at once, so that other workers do not all send.
        let provisional = format!("{sender}.{transfer_id}");
        ctx.recorder.envelopes.lock().expect("envelopes lock").push((provisional.clone(), sender, Slot::Pending));
        return Some(Box::pin(async move {
            let sent_ms = ctx.recorder.now_ms();
            let (outcome, envelope_id) = match send_envelope(&ctx.client, &request).await {
                Ok(response) if !response.envelope_id.is_empty() => {
                    (outcome_of(response.result.as_ref()), response.envelope_id)
                }
                Ok(response) => (outcome_of(response.result.as_ref()), provisional.clone()),
                Err(_) => (Outcome::Unknown, provisional.clone()),
            };
            {
                let state = if matches!(outcome, Outcome::Refused(_)) { Slot::Closed } else { Slot::Open };
                let mut all = ctx.recorder.envelopes.lock().expect("envelopes lock");
                if let Some(e) = all.iter_mut().find(|e| e.0 == provisional) {
                    *e = (envelope_id.clone(), sender, state);
                }
            }
            let kind = OpKind::SendEnvelope { transfer_id, envelope_id, sender, currency: CURRENCY.into(), total };
            ctx.recorder.record(sent_ms, kind, outcome, pair);
        }));
    }
    let envelopes: Vec<(String, u64)> = ctx
        .recorder
        .envelopes
        .lock()
        .expect("envelopes lock")
        .iter()
        .filter(|e| e.2 == Slot::Open)
        .map(|e| (e.0.clone(), e.1))
        .collect();
    if envelopes.is_empty() {
        return None;
    }
    // A (envelope, user) this worker has not tried; every user grabs each
    // envelope at most once in the whole run (workers own disjoint users).
    let mine: Vec<u64> = users.iter().copied().filter(|u| u % workload.clients == ctx.worker).collect();
    if mine.is_empty() {
        return None;
    }
    for _ in 0..8 {
        let (envelope_id, sender) = envelopes[rng.below(envelopes.len() as u64) as usize].clone();
        let user = mine[rng.below(mine.len() as u64) as usize];
        if !grabbed.insert((envelope_id.clone(), user)) {
            continue;
        }
        let pair = population.pair(sender);
        return Some(Box::pin(async move {
            let sent_ms = ctx.recorder.now_ms();
            let (outcome, amount) = match grab(&ctx.client, &envelope_id, user).await {
                Ok(response) => grab_outcome(&response),
                Err(_) => (Outcome::Unknown, None),
            };
            let gone = ["ENVELOPE_EMPTY", "ENVELOPE_NOT_FOUND", "ENVELOPE_EXPIRED"];
            if matches!(&outcome, Outcome::Refused(code) if gone.contains(&code.as_str())) {
                let mut all = ctx.recorder.envelopes.lock().expect("envelopes lock");
                if let Some(e) = all.iter_mut().find(|e| e.0 == envelope_id) {
                    e.2 = Slot::Closed;
                }
            }
            ctx.recorder.record(sent_ms, OpKind::Grab { envelope_id, user, amount }, outcome, pair);
        }));
    }
    None
}

/// An error that retrying cannot change: the request itself was refused.
fn final_error(status: &Status) -> Option<Outcome> {
    use tonic::Code::*;
    matches!(status.code(), InvalidArgument | NotFound | FailedPrecondition | PermissionDenied | Unauthenticated)
        .then(|| Outcome::Refused(format!("{:?}", status.code())))
}

/// Retries every unknown operation with the same idempotency key until it
/// gets a final answer (each for at most `per_op`, all of them for at most
/// `total`), and records it. What stays unresolved keeps the checkers that
/// need it at "unknown".
pub async fn resolve(routers: Vec<String>, history: &mut History, per_op: Duration, total: Duration) -> usize {
    let mut client = CellClient::new(routers);
    client.deadline = Duration::from_secs(10);
    let mut resolved = 0;
    let phase = Instant::now();
    // Reads change nothing: an unanswered read stays unknown.
    for op in history.ops.iter_mut().filter(|op| op.outcome == Outcome::Unknown && !op.is_read()) {
        let started = Instant::now();
        while op.resolved.is_none() && started.elapsed() < per_op && phase.elapsed() < total {
            let outcome = match &mut op.kind {
                OpKind::Transfer { transfer_id, from, to, currency, amount } => {
                    let request = TransferRequest {
                        transfer_id_text: String::new(),
                        transfer_id: transfer_id.clone().into_bytes(),
                        from_user_id: *from,
                        to_user_id: *to,
                        currency: currency.clone(),
                        amount: *amount,
                    };
                    match transfer(&client, &request).await {
                        Ok(r) => Some(outcome_of(r.result.as_ref())),
                        Err(status) => final_error(&status),
                    }
                }
                OpKind::SendEnvelope { transfer_id, sender, currency, total, .. } => {
                    let shares = (*total / ENVELOPE_UNIT) as u32;
                    let request = SendEnvelopeRequest {
                        transfer_id_text: String::new(),
                        transfer_id: transfer_id.clone().into_bytes(),
                        sender_user_id: *sender,
                        currency: currency.clone(),
                        total: *total,
                        shares,
                        split: EnvelopeSplit::Random as i32,
                        expires_at_ms: 0,
                    };
                    match send_envelope(&client, &request).await {
                        Ok(r) => Some(outcome_of(r.result.as_ref())),
                        Err(status) => final_error(&status),
                    }
                }
                OpKind::Grab { envelope_id, user, amount } => match grab(&client, envelope_id, *user).await {
                    Ok(response) => {
                        let (outcome, share) = grab_outcome(&response);
                        *amount = share;
                        Some(outcome)
                    }
                    Err(status) => final_error(&status),
                },
                OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. } => break,
            };
            match outcome {
                Some(Outcome::Unknown) | None => tokio::time::sleep(Duration::from_millis(200)).await,
                Some(outcome) => {
                    op.resolved = Some(outcome);
                    resolved += 1;
                }
            }
        }
    }
    resolved
}

async fn list_all(client: &CellClient, user: u64) -> Result<Vec<TransferRecord>, Status> {
    let mut token = Vec::new();
    let mut all = Vec::new();
    loop {
        let request =
            ListTransfersRequest { user_id: user, currency: CURRENCY.into(), page_size: 1000, page_token: token };
        let page = client.list_transfers(request.clone()).await?;
        all.extend(page.transfers);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// Reads every user's balance and history and every envelope. Call once
/// the cross-cell credits have settled.
pub async fn read_final(
    routers: Vec<String>,
    population: &Population,
    history: &History,
    seed_amount: u64,
) -> anyhow::Result<FinalState> {
    let mut client = CellClient::new(routers);
    client.deadline = Duration::from_secs(20);
    let mut state = FinalState::default();
    let debit_kinds = [TransferKind::Transfer as i32, TransferKind::EnvelopeSend as i32];
    for &user in &population.users {
        state.seeded.insert((user, CURRENCY.into()), seed_amount as i128);
        let account = client.get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() }).await?;
        state.balances.insert((user, CURRENCY.into()), account.balance as i128);
        for record in list_all(&client, user).await? {
            let id = String::from_utf8_lossy(&record.transfer_id).to_string();
            if record.from_user_id == user && debit_kinds.contains(&record.kind) {
                let entry = state.recorded.entry(id).or_default();
                entry.code = "OK".into();
                entry.debits += 1;
                // The sender's record, as GetTransfer returns it: where the
                // money is, and when a cross-cell credit arrived.
                entry.settlement = settlement_name(record.settlement);
                if record.settlement == Settlement::Credited as i32 && record.credited_at_ms > 0 {
                    entry.credit_delay_ms = Some(record.credited_at_ms as i64 - record.timestamp_ms as i64);
                }
            } else if record.kind == TransferKind::Refund as i32 {
                state.recorded.entry(id).or_default().refunded = true;
            }
        }
    }
    // Transfers and sends the ledger does not show as applied.
    for op in &history.ops {
        if let OpKind::Transfer { transfer_id, .. } | OpKind::SendEnvelope { transfer_id, .. } = &op.kind {
            let entry = state
                .recorded
                .entry(transfer_id.clone())
                .or_insert_with(|| Recorded { code: "NOT_APPLIED".into(), ..Default::default() });
            if entry.code.is_empty() {
                entry.code = "NOT_APPLIED".into();
            }
        }
    }
    let envelope_ids: BTreeSet<String> = history
        .ops
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::SendEnvelope { envelope_id, .. } => Some(envelope_id.clone()),
            _ => None,
        })
        .collect();
    for envelope_id in envelope_ids {
        let mut grabs = Vec::new();
        let mut token = Vec::new();
        let mut info = None;
        loop {
            let request = GetEnvelopeRequest { envelope_id: envelope_id.clone(), page_size: 1000, page_token: token };
            let page = client.get_envelope(request.clone()).await;
            let page = match page {
                Ok(page) => page,
                // An envelope whose send was refused or never applied.
                Err(status) if status.code() == tonic::Code::NotFound => break,
                Err(status) => return Err(status.into()),
            };
            if page.envelope.is_none() {
                break;
            }
            info = page.envelope.clone();
            grabs.extend(page.grabs.iter().map(|g| (g.user_id, g.amount)));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if let Some(e) = info {
            state.envelopes.insert(
                envelope_id,
                EnvelopeState {
                    sender: e.sender_user_id,
                    currency: e.currency,
                    total: e.total,
                    remaining: e.remaining,
                    refunded: e.refunded,
                    grabs,
                },
            );
        }
    }
    Ok(state)
}
