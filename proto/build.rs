//! Generates the Rust code for cellbank's protos with a vendored `protoc`,
//! so a build needs no system protobuf compiler.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_build::configure().file_descriptor_set_path(out_dir.join("cellbank_descriptor.bin")).compile_protos(
        &["cellbank/v1/ledger.proto", "cellbank/cell/v1/cell.proto", "cellbank/router/v1/router.proto"],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=cellbank");
    Ok(())
}
