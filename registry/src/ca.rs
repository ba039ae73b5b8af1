//! The certificate authority: keys, the CA certificate, node and server
//! certificates, CSR checks, CRLs, and raw signatures for the network config.
//!
//! # Certificate profile
//! - **CA**: self-signed, `CN=sixmesh registry CA <network>`, `O=sixmesh`,
//!   basicConstraints `CA:TRUE, pathlen:0` (critical), keyUsage
//!   `keyCertSign, cRLSign, digitalSignature`, 20 years. Its serial number is
//!   re6st's encoding of the network prefix (binary `1` followed by the network
//!   bits) so that re6st clients find the network in it.
//! - **Node** (enrolled by `sixmesh join`): random 128-bit serial; subject
//!   `CN=<node prefix>` (e.g. `CN=fd12:3456:789a:1::/64`); SAN IP = the mesh
//!   address (`prefix::1`); SAN URI `sixmesh:wg:<standard base64 of the
//!   32-byte X25519 tunnel public key>`; keyUsage `digitalSignature`;
//!   extendedKeyUsage `serverAuth, clientAuth`; authorityKeyIdentifier.
//! - **Node** (enrolled by re6st-conf): the same, except `CN=<prefix bits as
//!   integer>/<number of bits>` and subject `serialNumber=<same integer>`, as
//!   re6st expects; no tunnel key.
//! - **Server** (the registry's HTTPS listener): made at each `serve` start,
//!   ECDSA P-256, SAN DNS/IP names given to `serve`, extendedKeyUsage
//!   `serverAuth`, 90 days.

use std::net::{IpAddr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber, SigningKey as _,
};
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, Result};
use crate::prefix::{Ipv6Prefix, Network};

/// Prefix of the SAN URI that carries a node's tunnel public key.
pub const TUNNEL_KEY_URI_PREFIX: &str = "sixmesh:wg:";
/// Prefix of the SAN URI that marks an administrator's certificate.
pub const ADMIN_URI_PREFIX: &str = "sixmesh:admin:";
/// Validity of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 20 * 365;
/// Validity of the registry's HTTPS server certificate.
pub const SERVER_CERT_VALIDITY_DAYS: i64 = 90;
/// How far back `notBefore` is set, to tolerate clock skew.
pub const BACKDATE_SECS: i64 = 300;

/// Key algorithm of the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (default).
    EcdsaP256,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 (needed by re6st clients).
    Rsa2048,
}

impl KeyType {
    /// The name used on the command line and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Rsa2048 => "rsa2048",
        }
    }

    /// Parses `ecdsa-p256` or `rsa2048`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "rsa2048" => Ok(KeyType::Rsa2048),
            _ => Err(Error::BadRequest(format!("unknown key type {s:?}: use ecdsa-p256 or rsa2048"))),
        }
    }
}

/// Generates a private key of the given type.
pub fn generate_key(kind: KeyType) -> Result<KeyPair> {
    match kind {
        KeyType::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
        KeyType::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey as _;
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
                .map_err(|e| Error::Certificate(format!("RSA key generation failed: {e}")))?;
            let der = key.to_pkcs8_der().map_err(|e| Error::Certificate(format!("RSA key encoding: {e}")))?;
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
            Ok(KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)?)
        }
    }
}

/// `sha256:<hex>` of a DER certificate: the CA fingerprint nodes pin.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = if s.len() % 2 == 1 { format!("0{s}") } else { s.to_string() };
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// PEM-encodes DER with the given label (e.g. `X509 CRL`).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let b = B64.encode(der);
    // Base64 is ASCII: every 64-byte chunk is a valid str.
    let lines: Vec<&str> = b.as_bytes().chunks(64).filter_map(|c| std::str::from_utf8(c).ok()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Converts a unix time to the `time` crate's type.
pub fn to_time(unix: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| Error::Internal(format!("time {unix}: {e}")))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    if b[0] == 0 {
        b[0] = 1; // keep the encoded length stable; 2^-8 of the values lose one bit
    }
    SerialNumber::from_slice(&b)
}

/// Parses a PEM or DER certificate's first block into DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| Error::Certificate(format!("not a PEM certificate: {e}")))
}

/// The registry's CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    kind: KeyType,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("kind", &self.kind).field("fingerprint", &self.fingerprint()).finish()
    }
}

/// What a node certificate says.
#[derive(Debug, Clone)]
pub struct NodeCertSpec {
    /// Subject CN.
    pub cn: String,
    /// re6st's subject `serialNumber` attribute, for re6st nodes.
    pub subject_serial: Option<String>,
    /// SAN IP.
    pub mesh_address: Ipv6Addr,
    /// X25519 public key, for the SAN URI.
    pub tunnel_key: Option<[u8; 32]>,
    /// Unix time.
    pub not_before: i64,
    /// Unix time.
    pub not_after: i64,
}

/// A certificate just signed.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM.
    pub pem: String,
    /// Serial as lowercase hex without leading zeros (the database key).
    pub serial: String,
}

/// A checked certificate signing request.
#[derive(Debug)]
pub struct Csr {
    params: CertificateSigningRequestParams,
    /// The tunnel key from a `sixmesh:wg:` SAN URI, if any.
    pub tunnel_key: Option<[u8; 32]>,
}

/// Parses a base64 X25519 public key.
pub fn parse_tunnel_key(b64: &str) -> Result<[u8; 32]> {
    let v =
        B64.decode(b64.trim()).map_err(|_| Error::BadRequest("the tunnel key is not valid base64".into()))?;
    v.try_into().map_err(|_| Error::BadRequest("the tunnel key must be 32 bytes".into()))
}

impl Csr {
    /// Parses a PEM CSR and verifies its signature (proof of possession of
    /// the key). Rejects requests for CA certificates.
    pub fn from_pem(pem: &str) -> Result<Self> {
        use rustls_pki_types::pem::PemObject as _;
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| Error::BadRequest("the CSR is not a PEM certificate request".into()))?;
        let params = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => Error::BadRequest(
                "the CSR's signature does not match its public key (no proof of possession)".into(),
            ),
            rcgen::Error::UnsupportedExtension => {
                Error::BadRequest("the CSR requests an extension the registry does not accept".into())
            }
            other => Error::BadRequest(format!("the CSR cannot be parsed: {other}")),
        })?;
        if !matches!(params.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(Error::BadRequest("the CSR asks for a CA certificate".into()));
        }
        let mut tunnel_key = None;
        for san in &params.params.subject_alt_names {
            if let SanType::URI(uri) = san
                && let Some(k) = uri.as_str().strip_prefix(TUNNEL_KEY_URI_PREFIX)
            {
                tunnel_key = Some(parse_tunnel_key(k)?);
            }
        }
        Ok(Csr { params, tunnel_key })
    }

    /// SHA-256 (hex) of the requested key's SubjectPublicKeyInfo: equal to
    /// [`CertInfo::spki_sha256`] of a certificate for the same key.
    pub fn spki_sha256(&self) -> String {
        use rcgen::PublicKeyData as _;
        hex(&Sha256::digest(self.params.public_key.subject_public_key_info()))
    }
}

impl Ca {
    /// Creates a new CA for `network`. Returns it with its key in PEM.
    pub fn create(network: &Network, kind: KeyType, now: i64) -> Result<(Self, String)> {
        let key = generate_key(kind)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sixmesh");
        dn.push(DnType::CommonName, format!("sixmesh registry CA {network}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from_slice(&network.re6st_ca_serial()));
        params.not_before = to_time(now - BACKDATE_SECS)?;
        params.not_after = to_time(now + CA_VALIDITY_DAYS * 86400)?;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let ca = Ca::load(&cert.pem(), &key_pem)?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key in PEM.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let kind = if key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            KeyType::EcdsaP256
        } else if key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
            KeyType::Rsa2048
        } else {
            return Err(Error::Certificate("the CA key is neither ECDSA P-256 nor RSA".into()));
        };
        let cert_der = pem_to_der(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        Ok(Ca { cert_pem: cert_pem.to_string(), cert_der, kind, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA key type.
    pub fn key_type(&self) -> KeyType {
        self.kind
    }

    /// `sha256:<hex>` of the CA certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Signs `msg` with the CA key (ECDSA P-256 SHA-256 ASN.1, or RSA PKCS#1
    /// v1.5 SHA-256).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        Ok(self.issuer.key().sign(msg)?)
    }

    /// The name of [`Ca::sign`]'s algorithm in signed documents.
    pub fn signature_algorithm(&self) -> &'static str {
        match self.kind {
            KeyType::EcdsaP256 => "ecdsa-p256-sha256",
            KeyType::Rsa2048 => "rsa-pkcs1-sha256",
        }
    }

    /// Signs a node certificate for the key in `csr`.
    pub fn sign_node(&self, csr: &Csr, spec: &NodeCertSpec) -> Result<Issued> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.cn.clone());
        if let Some(s) = &spec.subject_serial {
            dn.push(
                DnType::CustomDnType(vec![2, 5, 4, 5]),
                rcgen::DnValue::PrintableString(s.clone().try_into()?),
            );
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V6(spec.mesh_address))];
        if let Some(k) = spec.tunnel_key {
            params
                .subject_alt_names
                .push(SanType::URI(format!("{TUNNEL_KEY_URI_PREFIX}{}", B64.encode(k)).try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = to_time(spec.not_before)?;
        params.not_after = to_time(spec.not_after)?;
        let signed = CertificateSigningRequestParams { params, public_key: csr.params.public_key.clone() };
        let cert = signed.signed_by(&self.issuer)?;
        let info = CertInfo::from_der(cert.der())?;
        Ok(Issued { pem: cert.pem(), serial: info.serial })
    }

    /// Makes a key and an administrator's client certificate (`CN=sixmesh
    /// admin <name>`, SAN URI `sixmesh:admin:<name>`, clientAuth only).
    /// Returns `(certificate, key PEM)`.
    pub fn admin_cert(&self, name: &str, not_before: i64, not_after: i64) -> Result<(Issued, String)> {
        let key = generate_key(KeyType::EcdsaP256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("sixmesh admin {name}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(format!("{ADMIN_URI_PREFIX}{name}").try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = to_time(not_before)?;
        params.not_after = to_time(not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let info = CertInfo::from_der(cert.der())?;
        Ok((Issued { pem: cert.pem(), serial: info.serial }, key.serialize_pem()))
    }

    /// Makes a fresh key and server certificate for the HTTPS listener.
    /// Returns `(certificate DER, PKCS#8 key DER)`.
    pub fn server_cert(&self, names: &[String], now: i64) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = generate_key(KeyType::EcdsaP256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "sixmesh registry");
        params.distinguished_name = dn;
        for n in names {
            params.subject_alt_names.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = to_time(now - BACKDATE_SECS)?;
        params.not_after = to_time(now + SERVER_CERT_VALIDITY_DAYS * 86400)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// Makes a CRL listing `revoked` (`(serial hex, revocation unix time)`).
    /// Returns `(DER, PEM)`.
    pub fn crl(
        &self,
        revoked: &[(String, i64)],
        number: u64,
        now: i64,
        next_update_secs: i64,
    ) -> Result<(Vec<u8>, String)> {
        let mut certs = Vec::with_capacity(revoked.len());
        for (serial, at) in revoked {
            let bytes = unhex(serial)
                .ok_or_else(|| Error::Internal(format!("bad serial {serial:?} in the database")))?;
            certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: to_time(*at)?,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: to_time(now - BACKDATE_SECS)?,
            next_update: to_time(now + next_update_secs)?,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok((crl.der().to_vec(), crl.pem()?))
    }
}

/// What sixmesh reads from a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Subject CN.
    pub cn: String,
    /// First SAN IP address, if any.
    pub mesh_address: Option<Ipv6Addr>,
    /// Tunnel key from the `sixmesh:wg:` SAN URI, if any.
    pub tunnel_key: Option<[u8; 32]>,
    /// Unix time.
    pub not_before: i64,
    /// Unix time.
    pub not_after: i64,
    /// SHA-256 of the subject public key info.
    pub spki_sha256: String,
}

impl CertInfo {
    /// Parses a DER certificate (no signature check).
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, c) = X509Certificate::from_der(der)
            .map_err(|e| Error::Certificate(format!("cannot parse certificate: {e}")))?;
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string)
            .unwrap_or_default();
        let mut mesh_address = None;
        let mut tunnel_key = None;
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::IPAddress(b) if b.len() == 16 && mesh_address.is_none() => {
                        let a: [u8; 16] = (*b).try_into().unwrap_or([0; 16]);
                        mesh_address = Some(Ipv6Addr::from(a));
                    }
                    GeneralName::URI(u) => {
                        if let Some(k) = u.strip_prefix(TUNNEL_KEY_URI_PREFIX) {
                            tunnel_key = parse_tunnel_key(k).ok();
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            serial: c.tbs_certificate.serial.to_str_radix(16),
            cn,
            mesh_address,
            tunnel_key,
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
            spki_sha256: hex(&Sha256::digest(c.tbs_certificate.subject_pki.raw)),
        })
    }

    /// Parses a PEM certificate.
    pub fn from_pem(pem: &str) -> Result<Self> {
        Self::from_der(&pem_to_der(pem)?)
    }

    /// The node prefix in the CN, for sixmesh certificates.
    pub fn prefix(&self) -> Option<Ipv6Prefix> {
        self.cn.parse().ok()
    }
}

/// Verifies `sig` over `msg` with the public key of the CA certificate `ca_der`.
pub fn verify_with_ca(ca_der: &[u8], algorithm: &str, msg: &[u8], sig: &[u8]) -> Result<()> {
    use ring::signature;
    let (_, c) =
        X509Certificate::from_der(ca_der).map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
    let spk = &c.tbs_certificate.subject_pki.subject_public_key.data;
    let alg: &dyn signature::VerificationAlgorithm = match algorithm {
        "ecdsa-p256-sha256" => &signature::ECDSA_P256_SHA256_ASN1,
        "rsa-pkcs1-sha256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        other => return Err(Error::Verification(format!("unknown signature algorithm {other:?}"))),
    };
    signature::UnparsedPublicKey::new(alg, spk.as_ref())
        .verify(msg, sig)
        .map_err(|_| Error::Verification("the signature does not match the CA key".into()))
}

/// Makes a CSR for `key`, carrying the tunnel key as a SAN URI.
pub fn make_csr(key: &KeyPair, tunnel_key: Option<&[u8; 32]>) -> Result<String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sixmesh node");
    params.distinguished_name = dn;
    if let Some(k) = tunnel_key {
        params.subject_alt_names =
            vec![SanType::URI(format!("{TUNNEL_KEY_URI_PREFIX}{}", B64.encode(k)).try_into()?)];
    }
    Ok(params.serialize_request(key)?.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Network {
        Network::new("fd00:1:2::/48".parse().unwrap()).unwrap()
    }

    #[test]
    fn node_certificate_carries_prefix_address_and_tunnel_key() {
        let now = 1_800_000_000;
        let (ca, key_pem) = Ca::create(&net(), KeyType::EcdsaP256, now).unwrap();
        let ca2 = Ca::load(ca.cert_pem(), &key_pem).unwrap();
        assert_eq!(ca.fingerprint(), ca2.fingerprint());
        let node_key = generate_key(KeyType::EcdsaP256).unwrap();
        let tk = [7u8; 32];
        let csr = Csr::from_pem(&make_csr(&node_key, Some(&tk)).unwrap()).unwrap();
        assert_eq!(csr.tunnel_key, Some(tk));
        let spec = NodeCertSpec {
            cn: "fd00:1:2:5::/64".into(),
            subject_serial: None,
            mesh_address: "fd00:1:2:5::1".parse().unwrap(),
            tunnel_key: csr.tunnel_key,
            not_before: now,
            not_after: now + 86400,
        };
        let issued = ca2.sign_node(&csr, &spec).unwrap();
        let info = CertInfo::from_pem(&issued.pem).unwrap();
        assert_eq!(info.cn, "fd00:1:2:5::/64");
        assert_eq!(info.mesh_address, Some("fd00:1:2:5::1".parse().unwrap()));
        assert_eq!(info.tunnel_key, Some(tk));
        assert_eq!(info.serial, issued.serial);
        assert_eq!(
            info.spki_sha256,
            csr.spki_sha256(),
            "the same key hashes the same from CSR and certificate"
        );
        assert!(info.serial.len() >= 31, "128-bit serial, got {}", info.serial);
        assert_eq!(info.not_after, now + 86400);
        assert_eq!(info.prefix().unwrap().to_string(), "fd00:1:2:5::/64");
        // The CA serial encodes the network like re6st.
        let (_, c) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert_eq!(c.tbs_certificate.serial.to_str_radix(16), "1fd0000010002");
    }

    #[test]
    fn csr_with_a_forged_signature_is_refused() {
        let key = generate_key(KeyType::EcdsaP256).unwrap();
        let pem = make_csr(&key, None).unwrap();
        let mut der = pem_to_csr_der(&pem);
        let last = der.len() - 3;
        der[last] ^= 0x55; // inside the signature
        let pem_bad = der_to_pem("CERTIFICATE REQUEST", &der);
        let err = Csr::from_pem(&pem_bad).unwrap_err();
        assert!(
            err.to_string().contains("proof of possession") || err.to_string().contains("cannot be parsed"),
            "{err}"
        );
        assert!(Csr::from_pem("garbage").is_err());
    }

    #[test]
    fn signatures_verify_against_the_ca_certificate() {
        let (ca, _) = Ca::create(&net(), KeyType::EcdsaP256, 1_800_000_000).unwrap();
        let sig = ca.sign(b"hello").unwrap();
        verify_with_ca(ca.cert_der(), ca.signature_algorithm(), b"hello", &sig).unwrap();
        assert!(verify_with_ca(ca.cert_der(), ca.signature_algorithm(), b"hellO", &sig).is_err());
    }

    #[test]
    fn crl_lists_serials() {
        let (ca, _) = Ca::create(&net(), KeyType::EcdsaP256, 1_800_000_000).unwrap();
        let (der, pem) = ca.crl(&[("0abc".into(), 1_800_000_100)], 3, 1_800_000_200, 86400).unwrap();
        assert!(pem.starts_with("-----BEGIN X509 CRL-----"));
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let serials: Vec<String> =
            crl.iter_revoked_certificates().map(|r| r.user_certificate.to_str_radix(16)).collect();
        assert_eq!(serials, vec!["abc"]);
    }

    pub(crate) fn pem_to_csr_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject as _;
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }
}
