//! The network configuration, signed by the CA.
//!
//! # Format (version 1)
//! The registry serves a [`SignedConfig`], a JSON object:
//! ```json
//! {"payload": "<standard base64 of the config JSON bytes>",
//!  "algorithm": "ecdsa-p256-sha256",
//!  "signature": "<standard base64 of the CA's signature over the payload bytes>"}
//! ```
//! The signature covers the exact payload bytes (no canonicalisation needed);
//! `algorithm` is `ecdsa-p256-sha256` (ASN.1 DER ECDSA signature) or
//! `rsa-pkcs1-sha256`, following the CA key. The payload decodes to a
//! [`NetworkConfig`]. A node accepts a config only if the signature verifies
//! with the CA certificate it pinned at enrollment, `format` is 1 and
//! `version` is not lower than the one it holds.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::ca::{Ca, verify_with_ca};
use crate::error::{Error, Result};

/// The payload format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Tunnel parameters every node of the network uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelParams {
    /// The tunnel protocol: `wireguard` (the WireGuard protocol in user space).
    pub protocol: String,
    /// Default UDP port of a node's tunnel socket.
    pub port: u16,
    /// Target number of outgoing tunnels per node.
    pub client_count: u32,
    /// Maximum number of incoming tunnels per node.
    pub max_clients: u32,
    /// Seconds between two replacements of the least useful tunnel.
    pub refresh_secs: u32,
    /// Persistent keepalive, seconds.
    pub keepalive_secs: u32,
    /// MTU of the TUN device.
    pub mtu: u32,
}

impl Default for TunnelParams {
    fn default() -> Self {
        TunnelParams {
            protocol: "wireguard".into(),
            port: 51820,
            client_count: 10,
            max_clients: 20,
            refresh_secs: 300,
            keepalive_secs: 25,
            mtu: 1420,
        }
    }
}

/// The network configuration (the signed payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Payload format, [`FORMAT`].
    pub format: u32,
    /// Increases at every change (revocation, expiry, parameter change).
    pub version: u64,
    /// Unix time the registry signed it.
    pub issued_at: i64,
    /// The network prefix, e.g. `fd12:3456:789a::/48`.
    pub network: String,
    /// Default node prefix length.
    pub node_prefix_len: u8,
    /// Serials (lowercase hex) of revoked certificates that have not expired yet.
    pub revoked_serials: Vec<String>,
    /// Validity of node certificates, days; nodes renew from 2/3 of it.
    pub cert_validity_days: u32,
    /// Tunnel parameters.
    pub tunnel: TunnelParams,
}

/// A [`NetworkConfig`] with the CA's signature; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedConfig {
    /// Base64 of the payload JSON bytes.
    pub payload: String,
    /// Signature algorithm.
    pub algorithm: String,
    /// Base64 of the signature.
    pub signature: String,
}

impl SignedConfig {
    /// Signs `config` with the CA key.
    pub fn sign(ca: &Ca, config: &NetworkConfig) -> Result<Self> {
        let bytes = serde_json::to_vec(config).map_err(|e| Error::Internal(e.to_string()))?;
        let sig = ca.sign(&bytes)?;
        Ok(SignedConfig {
            payload: B64.encode(&bytes),
            algorithm: ca.signature_algorithm().to_string(),
            signature: B64.encode(sig),
        })
    }

    /// Checks the signature with the CA certificate (DER) and decodes the payload.
    pub fn verify(&self, ca_der: &[u8]) -> Result<NetworkConfig> {
        let bytes = B64
            .decode(&self.payload)
            .map_err(|_| Error::Verification("network config payload is not base64".into()))?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| Error::Verification("network config signature is not base64".into()))?;
        verify_with_ca(ca_der, &self.algorithm, &bytes, &sig)?;
        let cfg: NetworkConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Verification(format!("network config payload is not a config: {e}")))?;
        if cfg.format != FORMAT {
            return Err(Error::Verification(format!(
                "network config format {} is not supported by this sixmesh (it reads {FORMAT}): upgrade sixmesh",
                cfg.format
            )));
        }
        Ok(cfg)
    }

    /// The JSON text of this document.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the JSON text of a document.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::Verification(format!("not a signed network config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::KeyType;
    use crate::prefix::Network;

    #[test]
    fn sign_verify_and_tamper() {
        let net = Network::new("fd00:9::/48".parse().unwrap()).unwrap();
        let (ca, _) = Ca::create(&net, KeyType::EcdsaP256, 1_800_000_000).unwrap();
        let cfg = NetworkConfig {
            format: FORMAT,
            version: 7,
            issued_at: 1_800_000_000,
            network: net.to_string(),
            node_prefix_len: 64,
            revoked_serials: vec!["abc".into()],
            cert_validity_days: 365,
            tunnel: TunnelParams::default(),
        };
        let signed = SignedConfig::sign(&ca, &cfg).unwrap();
        let back = SignedConfig::from_json(&signed.to_json()).unwrap().verify(ca.cert_der()).unwrap();
        assert_eq!(back, cfg);
        let mut forged = cfg.clone();
        forged.revoked_serials.clear();
        let tampered =
            SignedConfig { payload: B64.encode(serde_json::to_vec(&forged).unwrap()), ..signed.clone() };
        assert!(tampered.verify(ca.cert_der()).is_err());
        let (other, _) = Ca::create(&net, KeyType::EcdsaP256, 1_800_000_000).unwrap();
        assert!(signed.verify(other.cert_der()).is_err(), "another CA's key must not verify");
    }
}
