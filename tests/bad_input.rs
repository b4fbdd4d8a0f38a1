//! Bad input of every kind against a real replica over real gRPC: each gets
//! a clear error naming the problem, and no balance changes.

mod common;

use std::io::Write;
use std::time::Duration;

use cellbank_proto::cell::raft_transport_client::RaftTransportClient;
use cellbank_proto::cell::RaftBatch;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::*;
use common::Cell;
use tonic::Code;

fn transfer(id: &[u8], from: u64, to: u64, currency: &str, amount: u64) -> TransferRequest {
    TransferRequest {
        transfer_id: id.to_vec(),
        from_user_id: from,
        to_user_id: to,
        currency: currency.into(),
        amount,
        ..Default::default()
    }
}

async fn balances(client: &mut LedgerClient<tonic::transport::Channel>) -> Vec<u64> {
    let mut out = Vec::new();
    for user in [1, 2, 3] {
        let account = client.get_account(GetAccountRequest { user_id: user, currency: "CNY".into() }).await.unwrap();
        out.push(account.into_inner().balance);
    }
    out
}

enum Expect {
    /// gRPC INVALID_ARGUMENT whose message contains the text.
    Invalid(&'static str),
    /// A result code in the response.
    Result(ResultCode),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let cell = Cell::start(1, &[]);
    cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let addr = cell.endpoints()[0].clone();
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.unwrap();
    let mut client = LedgerClient::new(channel.clone());
    for user in [1, 2] {
        client.open_account(OpenAccountRequest { user_id: user, currency: "CNY".into() }).await.unwrap();
    }
    client.open_account(OpenAccountRequest { user_id: 3, currency: "USD".into() }).await.unwrap();
    client.open_account(OpenAccountRequest { user_id: 3, currency: "CNY".into() }).await.unwrap();
    let seed = DepositRequest {
        transfer_id: b"seed".to_vec(),
        user_id: 1,
        currency: "CNY".into(),
        amount: 1000,
        ..Default::default()
    };
    client.deposit(seed).await.unwrap();
    let full = DepositRequest {
        transfer_id: b"full".to_vec(),
        user_id: 2,
        currency: "CNY".into(),
        amount: i64::MAX as u64,
        ..Default::default()
    };
    client.deposit(full.clone()).await.unwrap();
    client.deposit(DepositRequest { transfer_id: b"full2".to_vec(), ..full }).await.unwrap();
    let before = balances(&mut client).await;

    let cases: Vec<(&str, TransferRequest, Expect)> = vec![
        ("zero amount", transfer(b"a", 1, 2, "CNY", 0), Expect::Invalid("amount")),
        ("negative-looking amount", transfer(b"b", 1, 2, "CNY", (-5i64) as u64), Expect::Invalid("amount")),
        ("amount just past i64::MAX", transfer(b"c", 1, 2, "CNY", i64::MAX as u64 + 1), Expect::Invalid("amount")),
        ("credit overflows a balance", transfer(b"d", 1, 2, "CNY", 2), Expect::Result(ResultCode::BalanceOverflow)),
        ("more than the balance", transfer(b"e", 1, 3, "CNY", 1001), Expect::Result(ResultCode::InsufficientFunds)),
        ("unknown sender", transfer(b"f", 99, 1, "CNY", 1), Expect::Result(ResultCode::AccountNotFound)),
        ("unknown recipient", transfer(b"g", 1, 99, "CNY", 1), Expect::Result(ResultCode::AccountNotFound)),
        ("user 0", transfer(b"h", 0, 1, "CNY", 1), Expect::Invalid("from_user_id")),
        ("same account", transfer(b"i", 1, 1, "CNY", 1), Expect::Invalid("to_user_id")),
        (
            "currency the sender has no account in",
            transfer(b"j", 1, 3, "USD", 1),
            Expect::Result(ResultCode::AccountNotFound),
        ),
        ("unknown currency code", transfer(b"k", 1, 2, "XYZ", 1), Expect::Invalid("currency")),
        ("lower-case currency", transfer(b"l", 1, 2, "cny", 1), Expect::Invalid("currency")),
        ("missing currency", transfer(b"m", 1, 2, "", 1), Expect::Invalid("currency")),
        ("empty transfer id", transfer(b"", 1, 2, "CNY", 1), Expect::Invalid("transfer_id")),
        ("oversized transfer id", transfer(&[b'x'; 129], 1, 2, "CNY", 1), Expect::Invalid("transfer_id")),
        ("non-UTF-8 transfer id", transfer(&[0xc3, 0x28], 1, 2, "CNY", 1), Expect::Invalid("transfer_id")),
        (
            "two different ids, as bytes and as text",
            TransferRequest { transfer_id_text: "other".into(), ..transfer(b"n", 1, 2, "CNY", 1) },
            Expect::Invalid("transfer_id_text"),
        ),
        (
            "an oversized id as text",
            TransferRequest { transfer_id_text: "x".repeat(129), ..transfer(b"", 1, 2, "CNY", 1) },
            Expect::Invalid("transfer_id"),
        ),
        (
            "id reused with another amount",
            transfer(b"d", 1, 2, "CNY", 3),
            Expect::Result(ResultCode::IdReusedWithDifferentFields),
        ),
        (
            "a failed id stays failed on retry",
            transfer(b"d", 1, 2, "CNY", 2),
            Expect::Result(ResultCode::BalanceOverflow),
        ),
    ];
    for (name, request, expect) in cases {
        let outcome = client.transfer(request).await;
        match (expect, outcome) {
            (Expect::Invalid(field), Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
                assert!(
                    status.message().starts_with(field),
                    "{name}: message {:?} should name {field}",
                    status.message()
                );
                // The same field, structured, for callers in any language.
                assert_eq!(cellbank_client::errors::bad_field(&status).as_deref(), Some(field), "{name}");
            }
            (Expect::Result(code), Ok(response)) => {
                let result = response.into_inner().result.unwrap();
                assert_eq!(result.code, code as i32, "{name}: {result:?}");
                if code == ResultCode::IdReusedWithDifferentFields {
                    assert_eq!(result.field, "amount", "{name}");
                }
            }
            (_, other) => panic!("{name}: unexpected outcome {other:?}"),
        }
    }

    // Batches: over the limit and empty are refused whole; malformed items
    // are refused one by one while the rest apply.
    let too_many: Vec<_> = (0..8190).map(|i| transfer(format!("big{i}").as_bytes(), 1, 2, "CNY", 1)).collect();
    let status = client.submit_transfers(SubmitTransfersRequest { transfers: too_many }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("8189"), "{}", status.message());
    let status = client.submit_transfers(SubmitTransfersRequest { transfers: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mixed = vec![transfer(b"m1", 1, 2, "CNY", 0), transfer(b"m2", 1, 1, "CNY", 5), transfer(b"m3", 1, 3, "XXX", 5)];
    let results =
        client.submit_transfers(SubmitTransfersRequest { transfers: mixed }).await.unwrap().into_inner().results;
    let fields: Vec<_> = results.iter().map(|r| (r.code, r.field.as_str())).collect();
    let invalid = ResultCode::InvalidItem as i32;
    assert_eq!(fields, vec![(invalid, "amount"), (invalid, "to_user_id"), (invalid, "currency")]);

    // Reads of unknown things and malformed reads.
    let status = client.get_account(GetAccountRequest { user_id: 42, currency: "CNY".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .get_transfer(GetTransferRequest { transfer_id: b"never".to_vec(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let bad_page = ListTransfersRequest { user_id: 1, currency: "CNY".into(), page_size: 5000, page_token: vec![] };
    assert_eq!(client.list_transfers(bad_page).await.unwrap_err().code(), Code::InvalidArgument);
    let bad_token =
        ListTransfersRequest { user_id: 1, currency: "CNY".into(), page_size: 5, page_token: vec![1, 2, 3] };
    assert_eq!(client.list_transfers(bad_token).await.unwrap_err().code(), Code::InvalidArgument);

    // Garbage on the Raft port: raw bytes that are not HTTP/2 at all...
    let mut socket = std::net::TcpStream::connect(&addr).unwrap();
    socket.write_all(b"\x00\xffGARBAGE\r\n\r\nnot a grpc frame at all\x13\x37").unwrap();
    drop(socket);
    // ...and a well-formed stream carrying bytes that are not Raft messages,
    // or messages for another cell, from a certificate of this cell's
    // group (anyone else is refused before the bytes are read).
    let peer = common::credentials_of("cell/1/replica/9");
    let peer_plane = cellbank_client::planes::Plane::Peer.of(&addr);
    let peer_channel = cellbank_client::ChannelSettings::SERVICE.connect_as(&peer_plane, Some(&peer)).await.unwrap();
    let mut raft = RaftTransportClient::new(peer_channel);
    let sealed = |mut batch: RaftBatch| {
        batch.checksum = cellbank_client::integrity::raft_batch(&batch);
        batch
    };
    let garbage = sealed(RaftBatch {
        cell_id: 1,
        messages: vec![vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0xff]],
        from_replica_id: 9,
        from_addr: "x".into(),
        cluster: common::CLUSTER.into(),
        checksum: 0,
    });
    let status = raft.stream(tokio_stream::iter(vec![garbage.clone()])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The same with a byte flipped after sealing: refused before decoding.
    let mut flipped = garbage.clone();
    flipped.messages[0][0] ^= 1;
    let status = raft.stream(tokio_stream::iter(vec![flipped])).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    // Sealed by a process of another cluster.
    let foreign = sealed(RaftBatch { cluster: "another".into(), messages: vec![], ..garbage.clone() });
    let status = raft.stream(tokio_stream::iter(vec![foreign])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("cluster"), "{status:?}");
    let wrong_cell = sealed(RaftBatch { cell_id: 77, messages: vec![], ..garbage.clone() });
    let status = raft.stream(tokio_stream::iter(vec![wrong_cell])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A raft proposal from the network (any peer could forge one) is refused:
    // only the leader's own API proposes.
    let applied_before = cell.status(1).await.unwrap().applied_index;
    let mut forged = raft::eraftpb::Message::default();
    forged.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
    forged.to = 1;
    forged.from = 1;
    let entry = raft::eraftpb::Entry { data: vec![0xff; 16].into(), ..Default::default() };
    forged.entries = vec![entry].into();
    let forged = protobuf::Message::write_to_bytes(&forged).unwrap();
    let batch = sealed(RaftBatch { messages: vec![forged], from_replica_id: 1, ..garbage.clone() });
    raft.stream(tokio_stream::iter(vec![batch])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cell.status(1).await.unwrap().applied_index, applied_before, "a forged proposal reached the log");

    // An append whose entry is not a command batch: refused by the transport
    // before raft sees it (every replica would panic applying it).
    let mut poison = raft::eraftpb::Message::default();
    poison.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    poison.to = 1;
    poison.from = 2;
    poison.term = 1;
    let entry = raft::eraftpb::Entry { index: 1, term: 1, data: vec![0xff; 16].into(), ..Default::default() };
    poison.entries = vec![entry].into();
    let poison = protobuf::Message::write_to_bytes(&poison).unwrap();
    let batch = sealed(RaftBatch { messages: vec![poison], from_replica_id: 2, ..garbage });
    let status = raft.stream(tokio_stream::iter(vec![batch])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not a command batch"), "{status:?}");

    // A grpc-timeout header too large to represent is ignored, not fatal.
    let mut request = tonic::Request::new(GetAccountRequest { user_id: 1, currency: "CNY".into() });
    request.metadata_mut().insert("grpc-timeout", "99999999999999999H".parse().unwrap());
    let _ = client.get_account(request).await;

    // The replica still serves, and no balance moved.
    assert_eq!(balances(&mut client).await, before);
    let digest = cell.digest(1).await.unwrap();
    assert_eq!(digest.balance_sum_by_currency.get("CNY").map(String::as_str), Some("0"));
}

/// Stock gRPC tools can find their way: the standard health service answers
/// SERVING and server reflection lists the services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let cell = Cell::start(1, &[]);
    cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cell.endpoints()[0]).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    // Health follows readiness: a replica that has just learnt its leader
    // says SERVING within one check interval.
    let started = std::time::Instant::now();
    loop {
        let reply =
            health.check(HealthCheckRequest { service: "cellbank.v1.Ledger".into() }).await.unwrap().into_inner();
        if reply.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never SERVING: {reply:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().expect("a reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("unexpected reply") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "cellbank.v1.Ledger",
        "grpc.health.v1.Health",
        "cellbank.cell.v1.RaftTransport",
        "cellbank.cell.v1.ReplicaAdmin",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}
