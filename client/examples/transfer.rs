//! The README's example, compiled with every build: one transfer through
//! the routers of a local cluster (`./scripts/up.sh`), then its retry.
//!
//! `cargo run -p cellbank-client --example transfer [ROUTER_ADDR]`

use cellbank_client::CellClient;
use cellbank_proto::v1::{ResultCode, TransferRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let router = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7000".into());
    let client = CellClient::new(vec![router]);
    let request = TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: b"example-order-42".to_vec(),
        from_user_id: 1,
        to_user_id: 3,
        currency: "CNY".into(),
        amount: 2500,
    };
    let first = client.transfer(request.clone()).await?;
    // The same transfer id again: the original outcome, nothing applied twice.
    let again = client.transfer(request).await?;
    let code = |r: &Option<cellbank_proto::v1::TransferResult>| {
        r.as_ref().and_then(|r| ResultCode::try_from(r.code).ok()).unwrap_or(ResultCode::Unspecified)
    };
    println!("first: {:?}; retry: {:?}", code(&first.result), code(&again.result));
    Ok(())
}
