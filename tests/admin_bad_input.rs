//! Bad admin input gets a clear error and changes nothing: wrong or missing
//! credentials, unknown pairs and cells, a switchover of a degraded pair, a
//! failover of a healthy pair without --force, a malformed configure.

mod common;

use std::time::Duration;

use cellbank_proto::cell::{ConfigureRequest, PairRole, PairState};
use cellbank_proto::router::{FailoverRequest, PairMode, SwitchoverRequest};
use common::cluster::Cluster;

const TOKEN: &str = "test-admin-token";

fn switchover(pair_id: u64) -> SwitchoverRequest {
    SwitchoverRequest { pair_id, who: "test".into(), why: "bad input".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_admin_requests_are_refused_and_change_nothing() {
    let mut cluster = Cluster::start(1, 1, |t| t.admin_token = Some(TOKEN.into()));
    let routers = cluster.routers();
    let token = Some(TOKEN);
    let started = std::time::Instant::now();
    let status = loop {
        match cellbank::routers::ClusterClient::new(&routers, token).status().await {
            // (A table not bootstrapped yet has no pairs at all.)
            Ok(status)
                if status.table.as_ref().is_some_and(|t| {
                    !t.pairs.is_empty() && t.pairs.iter().all(|p| p.mode == PairMode::Sync as i32)
                }) =>
            {
                break status
            }
            _ => {
                assert!(started.elapsed() < Duration::from_secs(30), "the pair never reached SYNC");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let audit_before = status.table.as_ref().unwrap().audit_count;

    // Credentials.
    let missing = cellbank::routers::ClusterClient::new(&routers, None).status().await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated, "{missing:?}");
    let wrong =
        cellbank::routers::ClusterClient::new(&routers, Some("guess")).switchover(switchover(1)).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied, "{wrong:?}");

    // Unknown pair, missing pair id.
    let unknown = cellbank::routers::ClusterClient::new(&routers, token).switchover(switchover(9)).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("no pair 9"), "{}", unknown.message());
    let unset = cellbank::routers::ClusterClient::new(&routers, token).switchover(switchover(0)).await.unwrap_err();
    assert_eq!(unset.code(), tonic::Code::InvalidArgument);

    // A failover of a healthy pair needs --force.
    let healthy = FailoverRequest { pair_id: 1, force: false, who: "test".into(), why: "bad input".into() };
    let refused = cellbank::routers::ClusterClient::new(&routers, token).failover(healthy).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("healthy"), "{}", refused.message());

    // Isolating an unknown cell.
    let isolate = cellbank::routers::ClusterClient::new(&routers, token)
        .isolate_cells(&[42], Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(format!("{isolate:#}").contains("no cell 42"), "{isolate:#}");

    // A configure straight at a cell with a bad epoch or an older epoch
    // (as a router: only routers may configure).
    let addr = cluster.sup.addr(cluster.cell_leader(1).await.expect("leader")).unwrap();
    let router = common::credentials_of("router/1");
    let admin_plane = cellbank_client::planes::Plane::Admin.of(&addr);
    let channel = cellbank_client::ChannelSettings::OPERATOR.connect_as(&admin_plane, Some(&router)).await.unwrap();
    let mut cell = cellbank_client::channel::admin(channel);
    let zero = PairState { epoch: 0, role: PairRole::Active as i32, ..Default::default() };
    let error =
        cell.configure(ConfigureRequest { cell_id: 1, state: Some(zero), ..Default::default() }).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let wrong_cell = PairState { epoch: 5, role: PairRole::Fenced as i32, ..Default::default() };
    let error = cell
        .configure(ConfigureRequest { cell_id: 9, state: Some(wrong_cell), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);

    // A switchover of a degraded pair is refused.
    cluster.sup.kill_cell(2);
    let started = std::time::Instant::now();
    loop {
        let status = cellbank::routers::ClusterClient::new(&routers, token).status().await.expect("status");
        if Cluster::pair_of(&status, 1).mode == PairMode::Degraded as i32 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the pair never degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let degraded = cellbank::routers::ClusterClient::new(&routers, token).switchover(switchover(1)).await.unwrap_err();
    assert_eq!(degraded.code(), tonic::Code::FailedPrecondition);
    assert!(degraded.message().contains("DEGRADED"), "{}", degraded.message());

    // Nothing changed: same active, same epoch; the only audit record added
    // is the coordinator's own degradation.
    let status = cellbank::routers::ClusterClient::new(&routers, token).status().await.expect("status");
    let pair = Cluster::pair_of(&status, 1);
    assert_eq!((pair.active_cell_id, pair.standby_cell_id, pair.epoch), (1, 2, 1));
    assert_eq!(status.table.unwrap().audit_count, audit_before + 1);
}

/// An option value the command does not know is an error that names the
/// values it knows, not a silent fallback (a log format, here, before any
/// cluster is asked anything).
#[test]
fn an_unknown_log_format_is_an_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
        .args(["--log-format", "xml", "status"])
        .output()
        .expect("run cellbank");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'xml' for '--log-format"), "{stderr}");
    assert!(stderr.contains("[possible values: text, json]"), "{stderr}");
}
