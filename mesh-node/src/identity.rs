//! The node's identity as `sixmesh join` left it in the state directory,
//! and the check of other nodes' certificates: a tunnel key is trusted only
//! when a certificate signed by the network's CA, valid now and not
//! revoked, binds it to a prefix.

use std::path::Path;

use ipnet::Ipv6Net;
use sixmesh_registry::ca::{CertInfo, pem_to_der};
use sixmesh_registry::client::files;
use sixmesh_registry::netconfig::{NetworkConfig, SignedConfig};
use x25519_dalek::StaticSecret;

/// What is wrong with the identity or a peer's certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{0}: not enrolled yet; run `sixmesh join --registry https://HOST:PORT --token T --ca-fingerprint sha256:HEX --state-dir {0}`"
    )]
    NotEnrolled(String),
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
    #[error("peer certificate: {0}")]
    Peer(String),
}

/// This node's identity.
pub struct Identity {
    pub prefix: Ipv6Net,
    pub network: Ipv6Net,
    pub tunnel_secret: StaticSecret,
    /// Our certificate (DER), offered to peers.
    pub cert_der: Vec<u8>,
    /// The CA certificate (DER) that peers' certificates must chain to.
    pub ca_der: Vec<u8>,
    /// The verified network configuration.
    pub config: NetworkConfig,
}

fn read(dir: &Path, name: &str) -> Result<String, IdentityError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotEnrolled(dir.display().to_string())
        } else {
            IdentityError::Bad { path: path.display().to_string(), msg: e.to_string() }
        }
    })
}

impl Identity {
    /// Loads and checks the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let bad =
            |name: &str, msg: String| IdentityError::Bad { path: dir.join(name).display().to_string(), msg };
        let ca_der = pem_to_der(&read(dir, files::CA)?).map_err(|e| bad(files::CA, e.to_string()))?;
        let cert_der = pem_to_der(&read(dir, files::CERT)?).map_err(|e| bad(files::CERT, e.to_string()))?;
        let signed = SignedConfig::from_json(read(dir, files::NETWORK)?.trim())
            .map_err(|e| bad(files::NETWORK, e.to_string()))?;
        let config = signed.verify(&ca_der).map_err(|e| bad(files::NETWORK, e.to_string()))?;
        let network: Ipv6Net =
            config.network.parse().map_err(|e| bad(files::NETWORK, format!("network: {e}")))?;
        let prefix: Ipv6Net =
            read(dir, files::PREFIX)?.trim().parse().map_err(|e| bad(files::PREFIX, format!("{e}")))?;
        let key = sixmesh_registry::ca::parse_tunnel_key(read(dir, files::TUNNEL_KEY)?.trim())
            .map_err(|e| bad(files::TUNNEL_KEY, e.to_string()))?;
        let tunnel_secret = StaticSecret::from(key);
        // Our own certificate must bind our tunnel key and prefix.
        let (p, k, _) = verify_peer_cert(&ca_der, &cert_der, now_unix(), &[])
            .map_err(|e| bad(files::CERT, e.to_string()))?;
        if p != prefix || k != x25519_dalek::PublicKey::from(&tunnel_secret).to_bytes() {
            return Err(bad(files::CERT, "does not match the prefix or tunnel key in this directory".into()));
        }
        Ok(Identity { prefix, network, tunnel_secret, cert_der, ca_der, config })
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks a peer's certificate: signed by `ca_der`, valid at `now`, serial
/// not in `revoked`, and binding a tunnel key and a prefix. Returns (prefix,
/// tunnel key, serial).
pub fn verify_peer_cert(
    ca_der: &[u8],
    cert_der: &[u8],
    now: i64,
    revoked: &[String],
) -> Result<(Ipv6Net, [u8; 32], String), IdentityError> {
    use x509_parser::prelude::*;
    let err = |m: String| IdentityError::Peer(m);
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| err(format!("CA: {e}")))?;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| err(format!("cannot parse: {e}")))?;
    cert.verify_signature(Some(ca.public_key())).map_err(|_| err("not signed by the network's CA".into()))?;
    let info = CertInfo::from_der(cert_der).map_err(|e| err(e.to_string()))?;
    if now < info.not_before || now > info.not_after {
        return Err(err(format!("not valid now (serial {})", info.serial)));
    }
    if revoked.iter().any(|s| s.eq_ignore_ascii_case(&info.serial)) {
        return Err(err(format!("revoked (serial {})", info.serial)));
    }
    let key = info.tunnel_key.ok_or_else(|| err("binds no tunnel key".into()))?;
    let prefix = info.prefix().ok_or_else(|| err(format!("CN {:?} is not a prefix", info.cn)))?;
    let prefix: Ipv6Net = prefix.to_string().parse().map_err(|e| err(format!("prefix: {e}")))?;
    Ok((prefix, key, info.serial))
}
