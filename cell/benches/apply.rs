//! What one replica pays to apply transfers, without Raft or gRPC: decode a
//! 1,000-transfer entry, run the ledger over RocksDB (reads through the
//! batch overlay), and write the apply batch. Three replicas on one host
//! each pay this for every transfer, which bounds a cell's throughput there.

use std::sync::Arc;

use cellbank_cell::ledger::Ledger;
use cellbank_proto::cell::{command, Command, MoveCommand, OpenAccountCommand};
use cellbank_raft::storage::open_db;
use cellbank_raft::{ApplyBatch, StateMachine};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rocksdb::{WriteOptions, DB};

const ACCOUNTS: u64 = 10_000;
const TRANSFERS_PER_ENTRY: usize = 1_000;

fn entry(commands: Vec<Command>) -> Vec<u8> {
    Ledger::new().encode_batch(commands, 1_700_000_000_000)
}

fn apply(db: &DB, ledger: &mut Ledger, index: u64, data: &[u8]) {
    let mut batch = ApplyBatch::new(db);
    let results = ledger.apply(&mut batch, index, data);
    assert!(results.iter().all(|r| r.code == 1), "every benchmark command applies");
    db.write_opt(batch.into_write_batch(), &WriteOptions::default()).unwrap();
}

fn setup() -> (tempfile::TempDir, Arc<DB>, Ledger, u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let mut ledger = Ledger::new();
    let mut index = 0;
    let opens: Vec<Command> = (1..=ACCOUNTS)
        .map(|user| Command {
            kind: Some(command::Kind::OpenAccount(OpenAccountCommand { user_id: user, currency: "CNY".into() })),
        })
        .collect();
    index += 1;
    apply(&db, &mut ledger, index, &entry(opens));
    let deposits: Vec<Command> = (1..=ACCOUNTS)
        .map(|user| Command {
            kind: Some(command::Kind::Move(MoveCommand {
                transfer_id: format!("seed-{user}").into_bytes(),
                kind: 2,
                from_user_id: 0,
                to_user_id: user,
                currency: "CNY".into(),
                amount: 1_000_000_000,
                ..Default::default()
            })),
        })
        .collect();
    index += 1;
    apply(&db, &mut ledger, index, &entry(deposits));
    (dir, db, ledger, index)
}

fn transfers(rng: &mut rand::rngs::StdRng, next_id: &mut u64) -> Vec<Command> {
    (0..TRANSFERS_PER_ENTRY)
        .map(|_| {
            let from = rng.gen_range(1..=ACCOUNTS);
            let to = if from == ACCOUNTS { 1 } else { from + 1 };
            *next_id += 1;
            Command {
                kind: Some(command::Kind::Move(MoveCommand {
                    transfer_id: format!("t-{next_id}").into_bytes(),
                    kind: 1,
                    from_user_id: from,
                    to_user_id: to,
                    currency: "CNY".into(),
                    amount: rng.gen_range(1..=100),
                    ..Default::default()
                })),
            }
        })
        .collect()
}

fn bench_apply(c: &mut Criterion) {
    let (_dir, db, mut ledger, mut index) = setup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut next_id = 0;
    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(TRANSFERS_PER_ENTRY as u64));
    group.bench_function("apply 1000 transfers (decode, ledger, RocksDB write)", |b| {
        b.iter_batched(
            || entry(transfers(&mut rng, &mut next_id)),
            |data| {
                index += 1;
                apply(&db, &mut ledger, index, &data);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(10));
    targets = bench_apply
}
criterion_main!(benches);
