//! Registry operations end to end on an in-memory database: enrollment,
//! renewal, revocation, expiry, tokens — and the prefix-allocation property.

use proptest::prelude::*;
use rusqlite::Connection;
use sixmesh_registry::ca::{self, CertInfo, Csr, KeyType};
use sixmesh_registry::prefix::Ipv6Prefix;
use sixmesh_registry::registry::{self as reg, Ctx, InitOptions, NodeKind, TokenOptions};
use sixmesh_registry::{Error, db};

const T0: i64 = 1_800_000_000;

fn setup(network: &str, node_len: u8) -> (Connection, Ctx) {
    let opts = InitOptions { node_prefix_len: node_len, ..InitOptions::new(Some(network.parse().unwrap())) };
    reg::in_memory(&opts, T0).unwrap()
}

fn csr(tunnel: Option<[u8; 32]>) -> Csr {
    let key = ca::generate_key(KeyType::EcdsaP256).unwrap();
    Csr::from_pem(&ca::make_csr(&key, tunnel.as_ref()).unwrap()).unwrap()
}

fn token(conn: &Connection, ctx: &Ctx, now: i64, len: Option<u8>) -> String {
    let opts =
        TokenOptions { email: Some("a@example.org".into()), prefix_len: len, expires_secs: 3600, count: 1 };
    reg::add_tokens(conn, ctx, now, &opts).unwrap().remove(0)
}

#[test]
fn enroll_renew_revoke() {
    let (conn, ctx) = setup("fd00:aa::/48", 64);
    let t = token(&conn, &ctx, T0, None);
    let e = reg::enroll(&conn, &ctx, T0, &t, &csr(Some([3; 32])), NodeKind::Sixmesh).unwrap();
    assert_eq!(e.prefix, "fd00:aa::/64");
    assert_eq!(e.mesh_address.to_string(), "fd00:aa::1");
    let info = CertInfo::from_pem(&e.certificate).unwrap();
    assert_eq!(info.cn, "fd00:aa::/64");
    assert_eq!(info.tunnel_key, Some([3; 32]));
    assert_eq!(info.not_after, T0 + 365 * 86400);

    // Single use.
    let again = reg::enroll(&conn, &ctx, T0, &t, &csr(None), NodeKind::Sixmesh);
    assert!(matches!(again, Err(Error::BadToken)), "{again:?}");
    // Expired token.
    let old = token(&conn, &ctx, T0, None);
    assert!(matches!(
        reg::enroll(&conn, &ctx, T0 + 3601, &old, &csr(None), NodeKind::Sixmesh),
        Err(Error::BadToken)
    ));
    assert!(matches!(
        reg::enroll(&conn, &ctx, T0, "nope", &csr(None), NodeKind::Sixmesh),
        Err(Error::BadToken)
    ));

    // Renewal keeps the prefix and the tunnel key, changes the serial.
    let r = reg::renew(&conn, &ctx, T0 + 100, &e.serial, &csr(None)).unwrap();
    assert_eq!(r.prefix, e.prefix);
    assert_ne!(r.serial, e.serial);
    assert_eq!(CertInfo::from_pem(&r.certificate).unwrap().tunnel_key, Some([3; 32]));
    // The superseded certificate cannot renew again.
    assert!(matches!(reg::renew(&conn, &ctx, T0 + 200, &e.serial, &csr(None)), Err(Error::Forbidden(_))));

    // Revoke by prefix: both unexpired certificates go to the CRL and the config.
    let rv = reg::revoke(&conn, &ctx, T0 + 300, "fd00:aa::/64", "test").unwrap();
    let mut want = vec![e.serial.clone(), r.serial.clone()];
    want.sort();
    assert_eq!(rv.serials, want);
    let (v, doc) = reg::current_config(&conn).unwrap();
    assert_eq!(v, rv.config_version);
    let cfg = doc.verify(ctx.ca.cert_der()).unwrap();
    assert_eq!(cfg.revoked_serials, want);
    assert!(matches!(reg::authenticate(&conn, &r.serial, T0 + 400), Err(Error::Forbidden(_))));
    // The prefix is free again and the next node gets it.
    let t2 = token(&conn, &ctx, T0, None);
    let e2 = reg::enroll(&conn, &ctx, T0 + 500, &t2, &csr(None), NodeKind::Sixmesh).unwrap();
    assert_eq!(e2.prefix, "fd00:aa::/64");
    // Audit has every issuance, renewal and revocation.
    let actions: Vec<String> = conn
        .prepare("SELECT action FROM audit ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for a in ["init", "token-add", "enroll", "renew", "revoke"] {
        assert!(actions.iter().any(|x| x == a), "audit lacks {a}: {actions:?}");
    }
    // Tokens are stored hashed.
    let clear: i64 =
        conn.query_row("SELECT COUNT(*) FROM tokens WHERE hash = ?1", [&t], |r| r.get(0)).unwrap();
    assert_eq!(clear, 0);
}

#[test]
fn a_retried_enrollment_with_the_same_key_gets_the_same_certificate() {
    let (conn, ctx) = setup("fd00:dd::/48", 64);
    let key = ca::generate_key(KeyType::EcdsaP256).unwrap();
    let same = || Csr::from_pem(&ca::make_csr(&key, None).unwrap()).unwrap();
    let t = token(&conn, &ctx, T0, None);
    let first = reg::enroll(&conn, &ctx, T0, &t, &same(), NodeKind::Sixmesh).unwrap();
    let retry = reg::enroll(&conn, &ctx, T0 + 5, &t, &same(), NodeKind::Sixmesh).unwrap();
    assert_eq!(
        (retry.serial.as_str(), retry.prefix.as_str()),
        (first.serial.as_str(), first.prefix.as_str())
    );
    assert_eq!(reg::list_nodes(&conn).unwrap().len(), 1, "nothing new was issued");
    // Another key with the used token gets nothing.
    assert!(matches!(
        reg::enroll(&conn, &ctx, T0 + 6, &t, &csr(None), NodeKind::Sixmesh),
        Err(Error::BadToken)
    ));
    // Once revoked, the retry path is closed too.
    reg::revoke(&conn, &ctx, T0 + 7, &first.prefix, "test").unwrap();
    assert!(matches!(reg::enroll(&conn, &ctx, T0 + 8, &t, &same(), NodeKind::Sixmesh), Err(Error::BadToken)));
}

#[test]
fn a_retried_renewal_with_the_same_key_gets_the_same_certificate() {
    let (conn, ctx) = setup("fd00:ee::/48", 64);
    let t = token(&conn, &ctx, T0, None);
    let e = reg::enroll(&conn, &ctx, T0, &t, &csr(None), NodeKind::Sixmesh).unwrap();
    let key = ca::generate_key(KeyType::EcdsaP256).unwrap();
    let same = || Csr::from_pem(&ca::make_csr(&key, None).unwrap()).unwrap();
    let r1 = reg::renew(&conn, &ctx, T0 + 10, &e.serial, &same()).unwrap();
    // The node never got r1 and retries with its old certificate and the same new key.
    let r2 = reg::renew(&conn, &ctx, T0 + 20, &e.serial, &same()).unwrap();
    assert_eq!(r2.serial, r1.serial);
    // Another key with the superseded certificate gets nothing.
    assert!(matches!(reg::renew(&conn, &ctx, T0 + 30, &e.serial, &csr(None)), Err(Error::Forbidden(_))));
    let certs: i64 = conn.query_row("SELECT COUNT(*) FROM certs", [], |r| r.get(0)).unwrap();
    assert_eq!(certs, 2, "the retry issued nothing");
}

#[test]
fn tunnel_parameters_change_the_signed_config() {
    let (conn, ctx) = setup("fd00:cc::/48", 64);
    let (v0, _) = reg::current_config(&conn).unwrap();
    let (v, p) =
        reg::set_tunnel_params(&conn, &ctx, T0, &["port=4000".into(), "tunnel.client_count=4".into()], "t")
            .unwrap();
    assert_eq!(v, v0 + 1);
    assert_eq!((p.port, p.client_count), (4000, 4));
    let cfg = reg::current_config(&conn).unwrap().1.verify(ctx.ca.cert_der()).unwrap();
    assert_eq!(cfg.tunnel, p);
    for bad in ["port=0", "nope=1", "port=x", "mtu=1000", "client_count=99"] {
        assert!(reg::set_tunnel_params(&conn, &ctx, T0, &[bad.into()], "t").is_err(), "{bad} accepted");
    }
    assert_eq!(reg::current_config(&conn).unwrap().0, v, "refused changes sign nothing");
}

#[test]
fn re6st_enrollment_uses_re6st_cn() {
    let (conn, ctx) = setup("2001:db8:42::/48", 64);
    let t1 = token(&conn, &ctx, T0, None);
    let t2 = token(&conn, &ctx, T0, None);
    reg::enroll(&conn, &ctx, T0, &t1, &csr(None), NodeKind::Sixmesh).unwrap();
    let e = reg::enroll(&conn, &ctx, T0, &t2, &csr(None), NodeKind::Re6st).unwrap();
    assert_eq!(CertInfo::from_pem(&e.certificate).unwrap().cn, "1/16");
    assert_eq!(e.prefix, "2001:db8:42:1::/64");
    assert_eq!(reg::find_node(&conn, &ctx, "1/16").unwrap(), reg::find_node(&conn, &ctx, &e.serial).unwrap());
}

#[test]
fn expiry_frees_prefix_after_grace_and_tokens_delete() {
    let (conn, ctx) = setup("fd00:bb::/48", 64);
    let t = token(&conn, &ctx, T0, None);
    let e = reg::enroll(&conn, &ctx, T0, &t, &csr(None), NodeKind::Sixmesh).unwrap();
    let grace = i64::from(ctx.settings.grace_days) * 86400;
    assert_eq!(reg::sweep(&conn, &ctx, e.not_after + 10).unwrap(), 0, "kept during the grace period");
    // Not usable for anything but renewal once expired.
    assert!(matches!(reg::authenticate(&conn, &e.serial, e.not_after + 10), Err(Error::Forbidden(_))));
    // Past the grace period it cannot renew either.
    assert!(matches!(
        reg::renew(&conn, &ctx, e.not_after + grace + 1, &e.serial, &csr(None)),
        Err(Error::Forbidden(_))
    ));
    // Renewal within the grace period keeps the prefix.
    let r = reg::renew(&conn, &ctx, e.not_after + 10, &e.serial, &csr(None)).unwrap();
    assert_eq!(r.prefix, e.prefix);
    let e = r;
    assert_eq!(reg::sweep(&conn, &ctx, e.not_after + grace + 10).unwrap(), 1);
    assert_eq!(db::tree_rows(&conn).unwrap(), vec![(String::new(), false)]);
    let t = token(&conn, &ctx, T0, None);
    let id = reg::list_tokens(&conn).unwrap().into_iter().find(|k| k.used_at.is_none()).unwrap().id;
    assert_eq!(reg::delete_token(&conn, T0, &id).unwrap(), 1);
    assert!(matches!(reg::enroll(&conn, &ctx, T0, &t, &csr(None), NodeKind::Sixmesh), Err(Error::BadToken)));
}

#[derive(Debug, Clone)]
enum Op {
    Enroll(u8),
    Revoke(usize),
    Expire(usize),
    Renew(usize),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4).prop_map(Op::Enroll),
        1 => any::<usize>().prop_map(Op::Revoke),
        1 => any::<usize>().prop_map(Op::Expire),
        1 => any::<usize>().prop_map(Op::Renew),
        1 => Just(Op::Sweep),
    ]
}

fn live(conn: &Connection) -> Vec<(String, String, Ipv6Prefix)> {
    reg::list_nodes(conn)
        .unwrap()
        .into_iter()
        .filter(|n| n.status == "active")
        .map(|n| (n.prefix.clone(), n.serial.clone(), n.prefix.parse().unwrap()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    /// Across random sequences of allocate / revoke / expire / renew / free,
    /// no two live nodes ever hold overlapping prefixes, allocation fails
    /// only when no aligned free block of the wanted size exists, and freed
    /// space is reused: once every node is gone the tree is one free row.
    #[test]
    fn prefixes_never_overlap_and_freed_space_is_reused(ops in proptest::collection::vec(op(), 1..60)) {
        // A /56 network with /58../64 nodes: small enough to run out.
        let (conn, ctx) = setup("fd00:1:2:3300::/56", 64);
        let the_csr = csr(None);
        let grace = i64::from(ctx.settings.grace_days) * 86400;
        let mut now = T0;
        for op in ops {
            now += 10;
            match op {
                Op::Enroll(i) => {
                    let len = 58 + 2 * i;
                    let t = token(&conn, &ctx, now, Some(len));
                    match reg::enroll(&conn, &ctx, now, &t, &the_csr, NodeKind::Sixmesh) {
                        Ok(e) => prop_assert_eq!(e.prefix.parse::<Ipv6Prefix>().unwrap().len, len),
                        Err(Error::Exhausted(l)) => {
                            prop_assert_eq!(l, len);
                            // No aligned block of that size is free of live nodes.
                            let lv = live(&conn);
                            let base = u128::from(ctx.settings.network.prefix.addr);
                            for k in 0..(1u128 << (len - 56)) {
                                let cand = Ipv6Prefix { addr: (base | (k << (128 - u32::from(len)))).into(), len };
                                prop_assert!(lv.iter().any(|(_, _, p)| p.overlaps(&cand)),
                                    "{} was free but allocation failed", cand);
                            }
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("enroll: {e}"))),
                    }
                }
                Op::Revoke(i) | Op::Expire(i) | Op::Renew(i) => {
                    let lv = live(&conn);
                    if lv.is_empty() { continue; }
                    let (prefix, serial, _) = &lv[i % lv.len()];
                    match op {
                        Op::Revoke(_) => { reg::revoke(&conn, &ctx, now, prefix, "test").unwrap(); }
                        Op::Renew(_) => { reg::renew(&conn, &ctx, now, serial, &the_csr).unwrap(); }
                        _ => {
                            // This node's certificate ran out long ago.
                            conn.execute("UPDATE nodes SET not_after = ?1 WHERE current_serial = ?2",
                                rusqlite::params![now - grace - 1, serial]).unwrap();
                        }
                    }
                }
                Op::Sweep => { reg::sweep(&conn, &ctx, now).unwrap(); }
            }
            reg::check_consistency(&conn, &ctx).unwrap();
            let lv = live(&conn);
            for (i, a) in lv.iter().enumerate() {
                for b in &lv[i + 1..] {
                    prop_assert!(!a.2.overlaps(&b.2), "{} overlaps {}", a.0, b.0);
                }
            }
        }
        reg::sweep(&conn, &ctx, now).unwrap();
        for (prefix, _, _) in live(&conn) {
            reg::revoke(&conn, &ctx, now, &prefix, "test").unwrap();
        }
        prop_assert_eq!(db::tree_rows(&conn).unwrap(), vec![(String::new(), false)]);
        // The whole space is usable again: four /58s fit.
        for _ in 0..4 {
            let t = token(&conn, &ctx, now, Some(58));
            reg::enroll(&conn, &ctx, now, &t, &the_csr, NodeKind::Sixmesh).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    /// Untrusted input never panics the parsers the API runs before any
    /// authentication: CSRs, certificates, query strings, prefixes.
    #[test]
    fn hostile_input_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..600), text in ".{0,200}") {
        let as_text = String::from_utf8_lossy(&bytes).into_owned();
        let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{text}\n-----END CERTIFICATE REQUEST-----\n");
        // Random text is never a validly signed CSR, random bytes never a certificate.
        prop_assert!(Csr::from_pem(&pem).is_err());
        prop_assert!(Csr::from_pem(&as_text).is_err());
        prop_assert!(CertInfo::from_der(&bytes).is_err());
        let _ = sixmesh_registry::server::query_param(&text, "token");
        let _ = text.parse::<Ipv6Prefix>();
        let _ = sixmesh_registry::prefix::Network::bits_from_re6st_cn(&text);
        let _ = sixmesh_registry::netconfig::SignedConfig::from_json(&text);
        let _ = ca::parse_tunnel_key(&text);
    }
}
