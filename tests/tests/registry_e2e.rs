//! The registry as an operator and a node use it: `registry init` → `serve`
//! → `token add` → `join` → `openssl verify` → bad input → endpoints and
//! bootstrap → `join --renew` → `revoke` → CRL and network config →
//! backup/restore. Spawns the real binary on loopback.

mod registry_support;

use std::io::{Read as _, Write as _};

use registry_support::*;
use sixmesh_registry::client::{self, Method};
use sixmesh_registry::netconfig::SignedConfig;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn has_openssl() -> bool {
    std::process::Command::new("openssl").arg("version").output().is_ok()
}

/// Asserts a one-line JSON error with the given status.
fn assert_json_error(status: u16, body: &[u8], want: u16) {
    assert_eq!(status, want, "body: {}", String::from_utf8_lossy(body));
    let text = std::str::from_utf8(body).unwrap();
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text:?}");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
}

/// `sixmesh join` with a pinned CA fingerprint into `dir`.
fn join_args<'a>(url: &'a str, token: &'a str, fp: &'a str, dir: &'a str) -> [&'a str; 9] {
    ["join", "--registry", url, "--token", token, "--ca-fingerprint", fp, "--state-dir", dir]
}

#[test]
fn init_serve_join_verify_renew_revoke() {
    assert!(has_openssl(), "openssl is needed (apt-get install openssl; scripts/test installs it)");
    let tmp = TempDir::new("e2e");
    let reg = tmp.path().join("reg");
    let reg_s = reg.to_str().unwrap();
    let fp = init(&reg, &["--network", "fd00:77::/48"]);
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
    // init refuses to overwrite.
    assert!(!sixmesh(&["registry", "init", "--state-dir", reg_s]).status.success());

    let serve = Serve::start(&reg, false);
    let url = serve.url.clone();
    let toks = tokens(&reg, 3);
    assert_eq!(toks.len(), 3);
    let node = tmp.path().join("node");
    let node_s = node.to_str().unwrap();

    // No fingerprint: refused, nothing enrolled.
    let o = sixmesh(&["join", "--registry", &url, "--token", &toks[0], "--state-dir", node_s]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ca-fingerprint"));
    // Wrong fingerprint: refused before the token is sent.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = sixmesh(&join_args(&url, &toks[0], &wrong, node_s));
    assert!(!o.status.success());
    assert!(!node.join("node.pem").exists());

    // Join.
    let out = ok(&join_args(&url, &toks[0], &fp, node_s));
    assert!(out.contains("prefix:         fd00:77::/64"), "{out}");
    assert!(out.contains("mesh address:   fd00:77::1"), "{out}");
    for f in
        ["node.key", "tunnel.key", "node.pem", "ca.pem", "prefix", "network.json", "registry.json", "crl.pem"]
    {
        assert!(node.join(f).exists(), "{f} missing");
    }
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(node.join("node.key")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(node.join("prefix")).unwrap().trim(), "fd00:77::/64");
    let ca = node.join("ca.pem");
    let cert = node.join("node.pem");
    let v = run("openssl", &["verify", "-CAfile", ca.to_str().unwrap(), cert.to_str().unwrap()]);
    assert!(v.contains(": OK"), "{v}");
    let text = run("openssl", &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("CN = fd00:77::/64") || text.contains("CN=fd00:77::/64"), "{text}");
    assert!(text.contains("IP Address:FD00:77:0:0:0:0:0:1"), "{text}");
    assert!(text.contains("URI:sixmesh:wg:"), "{text}");
    let first_serial = client::load_identity(&node).unwrap().unwrap().serial;

    // Idempotent: re-running does not use a token.
    let again = ok(&join_args(&url, &toks[0], &fp, node_s));
    assert!(again.contains("already enrolled"), "{again}");
    // A used token cannot enroll another node.
    let other = tmp.path().join("other");
    let o = sixmesh(&join_args(&url, &toks[0], &fp, other.to_str().unwrap()));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("token"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!other.join("node.pem").exists());

    // Bad input: 4xx, one-line JSON, nothing written.
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let rt = rt();
    let call = |m: Method, path: &str, body: Option<Vec<u8>>| {
        rt.block_on(client::call(&url, &ca_pem, None, m, path, body)).unwrap()
    };
    let (s, b) = call(Method::POST, "/v1/enroll", Some(br#"{"token":"x","csr":"garbage"}"#.to_vec()));
    assert_json_error(s, &b, 400);
    let (s, b) = call(Method::POST, "/v1/enroll", Some(b"{not json".to_vec()));
    assert_json_error(s, &b, 400);
    let good_csr = {
        let k = sixmesh_registry::ca::generate_key(sixmesh_registry::ca::KeyType::EcdsaP256).unwrap();
        sixmesh_registry::ca::make_csr(&k, None).unwrap()
    };
    // A CSR whose signature does not match its key: flip a byte of the signature.
    let bad_csr = {
        use base64::Engine as _;
        let b64: String = good_csr.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let n = der.len();
        der[n - 5] ^= 0x5a;
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    };
    let body = serde_json::json!({"token": toks[1], "csr": bad_csr}).to_string().into_bytes();
    let (s, b) = call(Method::POST, "/v1/enroll", Some(body));
    assert_json_error(s, &b, 400);
    let body = serde_json::json!({"token": "0123456789abcdef0123456789abcdef", "csr": good_csr})
        .to_string()
        .into_bytes();
    let (s, b) = call(Method::POST, "/v1/enroll", Some(body));
    assert_json_error(s, &b, 401);
    // Oversized: the registry answers 413 without reading the body; the
    // client may see the answer or the connection closed under its write.
    match rt.block_on(client::call(&url, &ca_pem, None, Method::POST, "/v1/enroll", Some(vec![b'x'; 70_000])))
    {
        Ok((s, b)) => assert_json_error(s, &b, 413),
        Err(e) => assert!(e.to_string().contains("HTTP"), "{e}"),
    }
    let (s, b) = call(Method::GET, "/v1/nope", None);
    assert_json_error(s, &b, 404);
    let (s, b) = call(Method::GET, "/v2/ca", None);
    assert_json_error(s, &b, 404);
    let (s, b) = call(Method::DELETE, "/v1/enroll", None);
    assert_json_error(s, &b, 405);
    let (s, b) = call(Method::POST, "/v1/renew", Some(b"{}".to_vec()));
    assert_json_error(s, &b, 401);
    // Plain HTTP (garbage for TLS) on the HTTPS port.
    let addr = url.strip_prefix("https://").unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET /v1/ca HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"error\":\"not_tls\""), "{resp}");
    // toks[1] was not consumed by the rejected CSR; only one node exists.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["registry", "list", "--json", "--state-dir", reg_s])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Second node; endpoints and bootstrap over mTLS.
    let node2 = tmp.path().join("node2");
    let out2 = ok(&join_args(&url, &toks[1], &fp, node2.to_str().unwrap()));
    assert!(out2.contains("fd00:77:0:1::/64"), "{out2}");
    rt.block_on(client::report_endpoints(
        &node,
        vec!["192.0.2.7:51820".into(), "[2001:db8::7]:51820".into()],
    ))
    .unwrap();
    assert!(rt.block_on(client::report_endpoints(&node, vec!["nonsense".into()])).is_err());
    let peers = rt.block_on(client::bootstrap_peers(&node2, 8)).unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].prefix, "fd00:77::/64");
    assert_eq!(peers[0].endpoints, vec!["192.0.2.7:51820", "[2001:db8::7]:51820"]);
    assert!(peers[0].tunnel_key.is_some());

    // A second server on the same state directory is refused.
    let o = sixmesh(&["registry", "serve", "--listen", "[::1]:0", "--state-dir", reg_s]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already runs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Not due yet: --if-due does nothing.
    let out = ok(&["join", "--renew", "--if-due", "--state-dir", node_s]);
    assert!(out.contains("not due"), "{out}");
    assert_eq!(client::load_identity(&node).unwrap().unwrap().serial, first_serial);

    // Renewal: new serial and key, same prefix, still verifies.
    let out = ok(&["join", "--renew", "--state-dir", node_s]);
    assert!(out.contains("certificate renewed"), "{out}");
    let renewed = client::load_identity(&node).unwrap().unwrap();
    assert_ne!(renewed.serial, first_serial);
    assert_eq!(renewed.prefix, "fd00:77::/64");
    let v = run("openssl", &["verify", "-CAfile", ca.to_str().unwrap(), cert.to_str().unwrap()]);
    assert!(v.contains(": OK"), "{v}");
    assert!(!node.join("node.key.next").exists());

    // Revoke: both serials in the CRL and in the next network config.
    let out = ok(&["registry", "revoke", "fd00:77::/64", "--state-dir", reg_s]);
    assert!(out.contains(&renewed.serial), "{out}");
    let (s, der) = call(Method::GET, "/v1/crl", None);
    assert_eq!(s, 200);
    let crl_file = tmp.path().join("crl.der");
    std::fs::write(&crl_file, der).unwrap();
    let crl =
        run("openssl", &["crl", "-inform", "DER", "-in", crl_file.to_str().unwrap(), "-noout", "-text"]);
    for serial in [&first_serial, &renewed.serial] {
        assert!(crl.to_uppercase().contains(&serial.to_uppercase()), "{serial} not in\n{crl}");
    }
    let v = run(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            crl_file.to_str().unwrap(),
            "-noout",
            "-verify",
            "-CAfile",
            ca.to_str().unwrap(),
        ],
    );
    let _ = v; // openssl prints "verify OK" on stderr; success is the check
    let (s, b) = call(Method::GET, "/v1/network-config", None);
    assert_eq!(s, 200);
    let doc: SignedConfig = serde_json::from_slice(&b).unwrap();
    let cfg = doc.verify(&sixmesh_registry::ca::pem_to_der(&ca_pem).unwrap()).unwrap();
    assert!(
        cfg.revoked_serials.contains(&renewed.serial) && cfg.revoked_serials.contains(&first_serial),
        "{cfg:?}"
    );
    // The revoked node can no longer renew.
    assert!(!sixmesh(&["join", "--renew", "--state-dir", node_s]).status.success());
    // Re-running join on the revoked node enrolls it anew, with new keys.
    let old_key = std::fs::read_to_string(node.join("node.key")).unwrap();
    let fresh = tokens(&reg, 1).remove(0);
    let out =
        ok(&["join", "--registry", &url, "--token", &fresh, "--ca-fingerprint", &fp, "--state-dir", node_s]);
    assert!(out.starts_with("enrolled"), "{out}");
    assert_ne!(client::load_identity(&node).unwrap().unwrap().serial, renewed.serial);
    assert_ne!(std::fs::read_to_string(node.join("node.key")).unwrap(), old_key);
    assert!(node.join("node.key.revoked").exists());
    // Nodes fetch the CRL (signature checked) for TLS peers that take a CRL file.
    let revoked_serials = rt.block_on(client::refresh_crl(&node2)).unwrap();
    assert!(revoked_serials.contains(&renewed.serial) && revoked_serials.contains(&first_serial));
    let crl_pem = node2.join("crl.pem");
    run("openssl", &["crl", "-in", crl_pem.to_str().unwrap(), "-noout", "-CAfile", ca.to_str().unwrap()]);
    // The node's view of the config follows.
    let held = rt.block_on(client::refresh_network_config(&node2)).unwrap();
    assert_eq!(held.version, cfg.version);

    // Trust on first use: allowed only when asked for, with a warning.
    let node3 = tmp.path().join("node3");
    let o = sixmesh(&[
        "join",
        "--registry",
        &url,
        "--token",
        &toks[2],
        "--trust-on-first-use",
        "--state-dir",
        node3.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("WARNING"));
    assert_eq!(client::load_identity(&node3).unwrap().unwrap().ca_fingerprint, fp);
    // Tokens: listed by id (never in clear), deletable.
    let spare = tokens(&reg, 1).remove(0);
    let listed = ok(&["registry", "token", "list", "--json", "--state-dir", reg_s]);
    assert!(!listed.contains(&spare), "tokens are never shown in clear");
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let unused: Vec<&serde_json::Value> =
        rows.as_array().unwrap().iter().filter(|r| r["used_at"].is_null()).collect();
    assert_eq!(unused.len(), 1, "{listed}");
    ok(&["registry", "token", "delete", unused[0]["id"].as_str().unwrap(), "--state-dir", reg_s]);
    let o = sixmesh(&join_args(&url, &spare, &fp, tmp.path().join("n4").to_str().unwrap()));
    assert!(!o.status.success(), "a deleted token enrolls nothing");
    // show by serial finds the same node as by prefix.
    let by_serial = ok(&["registry", "show", &first_serial, "--json", "--state-dir", reg_s]);
    assert!(by_serial.contains("\"prefix\":\"fd00:77::/64\""), "{by_serial}");

    // Admin API over mTLS with an administrator's certificate.
    let admin = tmp.path().join("admin");
    let admin_s = admin.to_str().unwrap();
    ok(&["registry", "admin", "add", "alice", "--out", admin_s, "--state-dir", reg_s]);
    let remote = |args: &[&str]| {
        let mut a = vec!["registry", "--remote", url.as_str(), "--admin-dir", admin_s];
        a.extend_from_slice(args);
        sixmesh(&a)
    };
    let o = remote(&["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("fd00:77:0:1::/64"));
    let o = remote(&["token", "add", "--email", "r@example.org"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let remote_token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(remote_token.len(), 32, "{remote_token}");
    // A node's certificate is not an admin's; no certificate at all is 401.
    let node2_cert = std::fs::read_to_string(node2.join("node.pem")).unwrap();
    let node2_key = std::fs::read_to_string(node2.join("node.key")).unwrap();
    let (s, b) = rt
        .block_on(client::call(
            &url,
            &ca_pem,
            Some((&node2_cert, &node2_key)),
            Method::GET,
            "/v1/admin/nodes",
            None,
        ))
        .unwrap();
    assert_json_error(s, &b, 403);
    let (s, b) = call(Method::GET, "/v1/admin/nodes", None);
    assert_json_error(s, &b, 401);
    // The audit shows who did what, over the admin API too.
    let admin_cert = std::fs::read_to_string(admin.join("admin.pem")).unwrap();
    let admin_key = std::fs::read_to_string(admin.join("admin.key")).unwrap();
    let (s, b) = rt
        .block_on(client::call(
            &url,
            &ca_pem,
            Some((&admin_cert, &admin_key)),
            Method::GET,
            "/v1/admin/audit?limit=500",
            None,
        ))
        .unwrap();
    assert_eq!(s, 200);
    let audit: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    for a in ["init", "enroll", "renew", "revoke", "admin-add", "api-token-add"] {
        assert!(actions.contains(&a), "audit lacks {a}: {actions:?}");
    }
    assert!(audit.as_array().unwrap().iter().any(|r| r["actor"] == "admin:alice"), "{audit}");
    let audit = ok(&["registry", "--remote", &url, "--admin-dir", admin_s, "show", "fd00:77:0:1::/64"]);
    assert!(audit.contains("fd00:77:0:1::1"), "{audit}");
    ok(&["registry", "admin", "revoke", "alice", "--state-dir", reg_s]);
    let o = remote(&["list"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("403"), "{}", String::from_utf8_lossy(&o.stderr));

    // Backup while serving, restore elsewhere: same nodes, same CA.
    let backup = tmp.path().join("backup.db");
    ok(&["registry", "backup", backup.to_str().unwrap(), "--state-dir", reg_s]);
    let restored = tmp.path().join("restored");
    let out =
        ok(&["registry", "restore", backup.to_str().unwrap(), "--state-dir", restored.to_str().unwrap()]);
    assert!(out.contains(&fp), "{out}");
    let a = ok(&["registry", "list", "--json", "--state-dir", reg_s]);
    let b = ok(&["registry", "list", "--json", "--state-dir", restored.to_str().unwrap()]);
    assert_eq!(a, b);
    // Restoring something that is not a backup changes nothing.
    let junk = tmp.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all").unwrap();
    let o =
        sixmesh(&["registry", "restore", junk.to_str().unwrap(), "--state-dir", restored.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a sixmesh registry backup"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(ok(&["registry", "list", "--json", "--state-dir", restored.to_str().unwrap()]), a);
    // Restore refuses while a server holds the registry.
    assert!(
        !sixmesh(&["registry", "restore", backup.to_str().unwrap(), "--state-dir", reg_s]).status.success()
    );
    drop(serve);
}
