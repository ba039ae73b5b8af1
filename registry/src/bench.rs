//! The enrollment benchmark behind `cargo bench -p sixmesh-registry --bench
//! enroll` (and a future `sixmesh bench registry`): durable enrollments per
//! second over HTTPS on loopback, with p50/p99 latency.
//!
//! Each enrollment is a new TLS connection (no client certificate), a CSR
//! check, a prefix allocation, a certificate signature and a
//! `synchronous=FULL` commit before the answer. CSRs are made before the
//! clock starts: the benchmark measures the registry.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ca::{self, KeyType};
use crate::client::{self, Method};
use crate::error::{Error, Result};
use crate::registry::{self as reg, InitOptions, Registry, TokenOptions, now};
use crate::server::{ServeOptions, Server};

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Enrollments done.
    pub enrollments: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Durable enrollments per second.
    pub per_sec: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registry enroll: {} durable enrollments, {} concurrent HTTPS clients, {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
            self.enrollments, self.clients, self.per_sec, self.p50_ms, self.p99_ms
        )
    }
}

/// Initialises a registry in `state_dir` (which must not hold one), serves
/// it on `[::1]:0`, and enrolls `total` nodes from `clients` concurrent
/// clients.
pub async fn enroll_benchmark(state_dir: &Path, total: usize, clients: usize) -> Result<BenchReport> {
    if total == 0 || clients == 0 {
        return Err(Error::BadRequest("give at least one enrollment and one client".into()));
    }
    Registry::init(state_dir, &InitOptions::new(Some("fd00:be::/40".parse()?)), now())?;
    let mut r = Registry::open(state_dir)?;
    let topts = TokenOptions { email: None, prefix_len: None, expires_secs: 3600, count: total };
    let tokens = r.write(|c, ctx| reg::add_tokens(c, ctx, now(), &topts))?;
    let key = ca::generate_key(KeyType::EcdsaP256)?;
    let csr = ca::make_csr(&key, Some(&[9; 32]))?;
    let bodies: Vec<Vec<u8>> =
        tokens.iter().map(|t| serde_json::json!({"token": t, "csr": csr}).to_string().into_bytes()).collect();
    let ca_pem = r.ctx.ca.cert_pem().to_string();
    let (conn, ctx, _lock) = r.into_parts();
    let so = ServeOptions {
        listen: "[::1]:0".parse().map_err(|_| Error::Internal("address".into()))?,
        legacy_listen: None,
        server_names: vec!["::1".into()],
    };
    let server = Server::bind(conn, ctx, &so).await?;
    let url = format!("https://{}", server.local_addr().ok_or_else(|| Error::Internal("no address".into()))?);
    let serving = tokio::spawn(server.run(std::future::pending()));
    let bodies = Arc::new(Mutex::new(bodies));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (bodies, url, ca_pem) = (bodies.clone(), url.clone(), ca_pem.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            // The guard is consumed inside `and_then`: no lock is held across the await.
            while let Some(body) = bodies.lock().ok().and_then(|mut b| b.pop()) {
                let t = Instant::now();
                let (s, b) =
                    client::call(&url, &ca_pem, None, Method::POST, "/v1/enroll", Some(body)).await?;
                if s != 200 {
                    return Err(Error::Refused {
                        status: s,
                        message: String::from_utf8_lossy(&b).into_owned(),
                    });
                }
                lat.push(t.elapsed());
            }
            Ok::<_, Error>(lat)
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| Error::Internal(e.to_string()))??);
    }
    let elapsed = start.elapsed();
    serving.abort();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Ok(BenchReport {
        enrollments: lat.len(),
        clients,
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}
