//! Certificates for a whole cluster: one CA, one certificate per process,
//! and certificates for services and operators (`cellbank certs init`,
//! and `cellbank up` on its first start).
//!
//! A directory holds `ca.pem` and `ca.key` (the cluster CA: ECDSA P-256,
//! ten years) and, per identity, `<stem>.pem` and `<stem>.key` (one year),
//! where the stem is the identity's path with `-` for `/`:
//! `cell-3-replica-2`, `router-1`, `service-cli`, `operator-admin`. Process
//! certificates also carry the DNS name `<cluster>.cellbank`, which clients
//! ask for. Keys are written readable by their owner only; every file is
//! written to a temporary name and renamed, so a process reloading its
//! certificate never reads half of one.
//!
//! [`ensure`] is idempotent: it keeps a CA and certificates that exist
//! (and name the right identity) and issues only what is missing, so a
//! cluster that grows gets certificates for its new processes from the
//! same CA.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use cellbank_client::tls::{identity_of, server_dns_name, Identity, TlsPaths};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The service certificate `certs init` and `up` make for the CLI's
/// money commands.
pub const DEFAULT_SERVICE: &str = "cli";
/// The operator certificate they make for admin commands, drills and the
/// benchmarks.
pub const DEFAULT_OPERATOR: &str = "admin";

const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

/// The file stem of `identity`'s certificate and key.
pub fn stem(identity: &Identity) -> String {
    identity.path().replace('/', "-")
}

/// The files of `identity` in `dir`.
pub fn paths(dir: &Path, identity: &Identity) -> TlsPaths {
    TlsPaths::in_dir(dir, &stem(identity))
}

fn write_atomically(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: the clocks of a cluster's hosts differ a little.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// The CA of a directory, able to sign.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// `dir`'s CA: loaded, or made when `dir` has none.
fn ca(dir: &Path, cluster: &str) -> anyhow::Result<Ca> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() && key_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(&cert_path)?)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        // The same subject and key: what it signs chains to the CA on disk.
        let cert = params.self_signed(&key)?;
        return Ok(Ca { cert, key });
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "cellbank");
    name.push(DnType::CommonName, format!("cellbank cluster {cluster} CA"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_atomically(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(Ca { cert, key })
}

fn issue(dir: &Path, ca: &Ca, identity: &Identity) -> anyhow::Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "cellbank");
    name.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = name;
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    if identity.is_process() {
        params.subject_alt_names.push(SanType::DnsName(server_dns_name(identity.cluster()).try_into()?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, LEAF_DAYS);
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    let files = paths(dir, identity);
    write_atomically(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_atomically(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// True when `identity`'s certificate in `dir` exists and names it.
fn has(dir: &Path, identity: &Identity) -> bool {
    let files = paths(dir, identity);
    if !files.key.exists() {
        return false;
    }
    let Ok(pem) = std::fs::read(&files.cert) else { return false };
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().and_then(Result::ok);
    der.is_some_and(|der| identity_of(&der).as_ref() == Ok(identity))
}

/// Makes `dir`'s CA if it has none and a certificate for every identity
/// that has none; returns the identities issued now.
pub fn ensure(dir: &Path, cluster: &str, identities: &[Identity]) -> anyhow::Result<Vec<Identity>> {
    // Tests start clusters from many threads of one process.
    static ISSUING: Mutex<()> = Mutex::new(());
    let _issuing = ISSUING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for identity in identities {
        anyhow::ensure!(identity.cluster() == cluster, "{identity} is not of cluster {cluster}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = ca(dir, cluster)?;
    let mut issued = Vec::new();
    for identity in identities {
        if !has(dir, identity) {
            issue(dir, &ca, identity)?;
            issued.push(identity.clone());
        }
    }
    Ok(issued)
}

/// The default service and operator identities of `cluster`.
pub fn client_identities(cluster: &str) -> [Identity; 2] {
    [
        Identity::Service { cluster: cluster.into(), name: DEFAULT_SERVICE.into() },
        Identity::Operator { cluster: cluster.into(), name: DEFAULT_OPERATOR.into() },
    ]
}

/// Where `certs init` and `up` put a cluster's certificates: `certs/` in
/// its data directory.
pub fn default_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_issues_what_is_missing_and_keeps_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let router = Identity::parse("cellbank://local/router/1").unwrap();
        let replica = Identity::parse("cellbank://local/cell/2/replica/3").unwrap();
        let issued = ensure(dir.path(), "local", &[router.clone(), replica.clone()]).unwrap();
        assert_eq!(issued, vec![router.clone(), replica.clone()]);
        let first = std::fs::read(paths(dir.path(), &router).cert).unwrap();
        let operator = Identity::parse("cellbank://local/operator/alice").unwrap();
        let issued = ensure(dir.path(), "local", &[router.clone(), operator.clone()]).unwrap();
        assert_eq!(issued, vec![operator.clone()], "only the missing one");
        assert_eq!(std::fs::read(paths(dir.path(), &router).cert).unwrap(), first, "kept");
        for identity in [&router, &replica, &operator] {
            let credentials = cellbank_client::tls::Credentials::load(paths(dir.path(), identity)).unwrap();
            assert_eq!(&credentials.identity(), identity);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the CA key is its owner's only");
        assert!(ensure(dir.path(), "other", &[router]).is_err(), "another cluster's identity");
    }
}
