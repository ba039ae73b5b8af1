//! A registry SIGKILLed in the middle of 200 concurrent enrollments restarts
//! with no duplicate prefix, no issued certificate missing from the
//! database, and no half-written row.

mod registry_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use registry_support::*;
use sixmesh_registry::registry::{self as reg, Registry};

#[test]
fn sigkill_during_200_enrollments_loses_nothing_handed_out() {
    let tmp = TempDir::new("kill");
    let dir = tmp.path().join("reg");
    init(&dir, &["--network", "fd00:99::/48"]);
    let toks = tokens(&dir, 200);
    let mut serve = Serve::start(&dir, false);
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let url = serve.url.clone();
    let pid = serve.child.id() as i32;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let issued = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in toks.clone() {
            let (url, ca, done) = (url.clone(), ca_pem.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let r = sixmesh_registry::client::enroll_ephemeral(&url, &ca, &t).await;
                if r.is_ok() {
                    // Kill the registry once 40 answers came back: the rest are in flight.
                    if done.fetch_add(1, Ordering::SeqCst) + 1 == 40 {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                r.ok().map(|(e, _)| (e.serial, e.prefix))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Some(x) = t.await.unwrap() {
                out.push(x);
            }
        }
        out
    });
    serve.kill();
    assert!(issued.len() >= 40, "only {} enrollments answered", issued.len());
    assert!(issued.len() < 200, "the kill came too late to test anything");

    // Every certificate a client received is in the database with its prefix.
    let r = Registry::open(&dir).unwrap();
    let ok: String = r.conn.query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
    assert_eq!(ok, "ok");
    reg::check_consistency(&r.conn, &r.ctx).unwrap();
    let nodes = reg::list_nodes(&r.conn).unwrap();
    let by_serial: std::collections::HashMap<_, _> =
        nodes.iter().map(|n| (n.serial.clone(), n.prefix.clone())).collect();
    for (serial, prefix) in &issued {
        assert_eq!(
            by_serial.get(serial),
            Some(prefix),
            "issued {serial} ({prefix}) is missing from the database"
        );
    }
    // No duplicate prefix.
    let prefixes: HashSet<_> = nodes.iter().map(|n| n.prefix.clone()).collect();
    assert_eq!(prefixes.len(), nodes.len(), "duplicate prefixes");
    // No half-written row: every used token has its node, every node its
    // certificate, every certificate its node.
    let q = |sql: &str| -> i64 { r.conn.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(q("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL AND used_by_node IS NULL"), 0);
    assert_eq!(q("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL"), nodes.len() as i64);
    assert_eq!(
        q(
            "SELECT COUNT(*) FROM nodes n LEFT JOIN certs c ON c.serial = n.current_serial WHERE c.serial IS NULL"
        ),
        0
    );
    assert_eq!(q("SELECT COUNT(*) FROM certs c LEFT JOIN nodes n ON n.id = c.node_id WHERE n.id IS NULL"), 0);
    assert_eq!(q("SELECT COUNT(*) FROM audit WHERE action = 'enroll'"), nodes.len() as i64);
    drop(r);

    // The registry restarts and goes on with the unused tokens.
    let serve = Serve::start(&dir, false);
    {
        let r = Registry::open(&dir).unwrap();
        let n = reg::list_tokens(&r.conn).unwrap().into_iter().filter(|t| t.used_at.is_none()).count();
        assert_eq!(n, 200 - nodes.len());
    }
    let more = rt.block_on(async {
        let mut n = 0;
        for t in &toks {
            if sixmesh_registry::client::enroll_ephemeral(&serve.url, &ca_pem, t).await.is_ok() {
                n += 1;
            }
        }
        n
    });
    assert_eq!(more, 200 - nodes.len(), "every unused token enrolls after the restart");
    let r = Registry::open(&dir).unwrap();
    reg::check_consistency(&r.conn, &r.ctx).unwrap();
    assert_eq!(reg::list_nodes(&r.conn).unwrap().len(), 200);
}
