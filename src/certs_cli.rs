//! `cellbank certs`: the cluster CA and the certificates of a topology's
//! processes, services and operators.

use std::path::PathBuf;

use cellbank::certs;
use cellbank_client::tls::Identity;

#[derive(clap::Subcommand)]
pub enum CertsAction {
    /// Make the CA (unless the directory has one) and every certificate
    /// missing for the topology's routers and replicas, the default service
    /// (`cli`) and operator (`admin`), and any named below. Existing ones
    /// are kept.
    Init {
        /// Topology file; the built-in default when absent.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Where to write them; the topology's `certs_dir`, else
        /// `<data_dir>/certs`.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// More service identities (repeat, or comma-separate).
        #[arg(long = "service", value_delimiter = ',')]
        services: Vec<String>,
        /// More operator identities (repeat, or comma-separate).
        #[arg(long = "operator", value_delimiter = ',')]
        operators: Vec<String>,
    },
}

pub fn run(action: CertsAction) -> anyhow::Result<()> {
    match action {
        CertsAction::Init { topology, dir, services, operators } => {
            let topology = crate::up::load_topology(topology.as_ref())?;
            let dir = dir.unwrap_or_else(|| topology.certs_dir());
            let cluster = topology.cluster.clone();
            let mut identities = topology.identities();
            for name in &services {
                identities.push(Identity::parse(&format!("cellbank://{cluster}/service/{name}"))?);
            }
            for name in &operators {
                identities.push(Identity::parse(&format!("cellbank://{cluster}/operator/{name}"))?);
            }
            let issued = certs::ensure(&dir, &cluster, &identities)?;
            println!("certificates of cluster {cluster} in {}", dir.display());
            for identity in &identities {
                let state = if issued.contains(identity) { "issued" } else { "kept" };
                println!("  {:<28} {state:<6} {identity}", format!("{}.pem", certs::stem(identity)));
            }
            Ok(())
        }
    }
}
