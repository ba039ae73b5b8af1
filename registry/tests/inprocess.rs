//! The server and the client in one process: join, CRL, config refresh,
//! endpoints and bootstrap, with no binary involved.

use std::path::PathBuf;

use sixmesh_registry::client::{self, JoinOptions};
use sixmesh_registry::registry::{self as reg, InitOptions, Registry, TokenOptions, now};
use sixmesh_registry::server::{ServeOptions, Server};

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_fetches_a_signed_crl_and_follows_revocations() {
    let tmp = Tmp(std::env::temp_dir().join(format!("smreg-inproc-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let state = tmp.0.join("reg");
    let summary =
        Registry::init(&state, &InitOptions::new(Some("fd00:66::/48".parse().unwrap())), now()).unwrap();
    let mut r = Registry::open(&state).unwrap();
    let opts = TokenOptions { email: None, prefix_len: None, expires_secs: 600, count: 2 };
    let toks = r.write(|c, ctx| reg::add_tokens(c, ctx, now(), &opts)).unwrap();
    let (conn, ctx, _lock) = r.into_parts();
    let so = ServeOptions {
        listen: "[::1]:0".parse().unwrap(),
        legacy_listen: None,
        server_names: vec!["::1".into()],
    };
    let server = Server::bind(conn, ctx, &so).await.unwrap();
    let url = format!("https://{}", server.local_addr().unwrap());
    let serving = tokio::spawn(server.run(std::future::pending()));

    let join = |dir: PathBuf, token: String| JoinOptions {
        registry: url.clone(),
        token,
        ca_fingerprint: Some(summary.ca_fingerprint.clone()),
        trust_on_first_use: false,
        state_dir: dir,
    };
    let a = tmp.0.join("a");
    let b = tmp.0.join("b");
    let ida = client::join(&join(a.clone(), toks[0].clone())).await.unwrap();
    let idb = client::join(&join(b.clone(), toks[1].clone())).await.unwrap();
    assert_eq!(ida.prefix, "fd00:66::/64");
    assert_eq!(idb.prefix, "fd00:66:0:1::/64");
    assert!(a.join("crl.pem").exists(), "join writes the CRL");

    client::report_endpoints(&a, vec!["198.51.100.1:51820".into()]).await.unwrap();
    let peers = client::bootstrap_peers(&b, 4).await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].endpoints, vec!["198.51.100.1:51820"]);

    // Revoke A locally while the server runs (shared lock, SQLite serialises).
    let mut local = Registry::open(&state).unwrap();
    let rv = local.write(|c, ctx| reg::revoke(c, ctx, now(), &ida.prefix, "test")).unwrap();
    assert_eq!(rv.serials, vec![ida.serial.clone()]);
    let serials = client::refresh_crl(&b).await.unwrap();
    assert_eq!(serials, vec![ida.serial.clone()]);
    let cfg = client::refresh_network_config(&b).await.unwrap();
    assert_eq!(cfg.revoked_serials, vec![ida.serial.clone()]);
    assert_eq!(cfg.version, rv.config_version);
    // A revoked node is refused by the mTLS calls, and its peers no longer see it.
    assert!(client::report_endpoints(&a, vec!["198.51.100.1:51820".into()]).await.is_err());
    assert!(client::bootstrap_peers(&b, 4).await.unwrap().is_empty());
    serving.abort();
}
