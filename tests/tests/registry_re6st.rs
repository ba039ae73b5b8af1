//! Interoperability with the real re6st client: PyPI `re6stnet`'s
//! `re6st-conf` enrolls through the legacy plain-HTTP endpoints of a
//! registry initialised with `--key rsa2048`, and its certificate verifies.
//!
//! `./scripts/test` makes a venv with re6stnet in `target/re6st-venv` and
//! points `SIXMESH_RE6ST_CONF` at its `re6st-conf`. Without it the test is
//! skipped, except under `CI=true`, where it fails.

mod registry_support;

use std::path::PathBuf;
use std::process::Command;

use registry_support::*;

fn re6st_conf() -> Option<PathBuf> {
    let p = std::env::var_os("SIXMESH_RE6ST_CONF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/re6st-venv/bin/re6st-conf")
    });
    if p.exists() {
        return Some(p);
    }
    let msg = format!(
        "re6st-conf not found at {}: run ./scripts/test (it installs PyPI re6stnet in target/re6st-venv) or set SIXMESH_RE6ST_CONF",
        p.display()
    );
    if sixmesh_tests::in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED re6st interop: {msg}");
    None
}

#[test]
fn re6st_conf_from_pypi_enrolls_over_the_legacy_listener() {
    let Some(conf) = re6st_conf() else { return };
    let tmp = TempDir::new("re6st");
    let reg = tmp.path().join("reg");
    let fp = init(&reg, &["--network", "2001:db8:42::/48", "--key", "rsa2048"]);
    let serve = Serve::start(&reg, true);
    let legacy = serve.legacy.clone().unwrap();
    // A sixmesh node first, so the re6st node gets the second prefix (CN 1/16).
    let toks = tokens(&reg, 2);
    let node = tmp.path().join("node");
    ok(&[
        "join",
        "--registry",
        &serve.url,
        "--token",
        &toks[0],
        "--ca-fingerprint",
        &fp,
        "--state-dir",
        node.to_str().unwrap(),
    ]);

    let d = tmp.path().join("re6st");
    std::fs::create_dir_all(&d).unwrap();
    let out = Command::new(&conf)
        .args([
            "--registry",
            &legacy,
            "--token",
            &toks[1],
            "--fingerprint",
            &fp,
            "--dir",
            d.to_str().unwrap(),
        ])
        .output()
        .expect("run re6st-conf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "re6st-conf failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Your subnet: 2001:db8:42:1::/64 (CN=1/16)"), "{stdout}");
    let v = run(
        "openssl",
        &["verify", "-CAfile", d.join("ca.crt").to_str().unwrap(), d.join("cert.crt").to_str().unwrap()],
    );
    assert!(v.contains(": OK"), "{v}");
    // The key re6st-conf made stayed on its side and is RSA 2048 like the CA.
    let key = run("openssl", &["pkey", "-in", d.join("cert.key").to_str().unwrap(), "-noout", "-text"]);
    assert!(key.contains("2048 bit"), "{key}");
    // The registry lists it as a re6st node; its token is spent.
    let list = ok(&["registry", "list", "--state-dir", reg.to_str().unwrap()]);
    assert!(list.contains("1/16"), "{list}");
    // Re-run with the same key (re6st-conf reuses cert.key): the same
    // certificate again, as after a lost answer.
    let first = std::fs::read_to_string(d.join("cert.crt")).unwrap();
    let again = Command::new(&conf)
        .args(["--registry", &legacy, "--token", &toks[1], "--dir", d.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read_to_string(d.join("cert.crt")).unwrap(), first);
    // Another node (another key) with the used token gets nothing.
    let d2 = tmp.path().join("re6st2");
    std::fs::create_dir_all(&d2).unwrap();
    let other = Command::new(&conf)
        .args(["--registry", &legacy, "--token", &toks[1], "--dir", d2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!other.status.success(), "a used token must not enroll another node");
    assert!(String::from_utf8_lossy(&other.stderr).contains("invalid or expired token"));
    assert!(!d2.join("cert.crt").exists());
}
