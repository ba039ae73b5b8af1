//! Golden packets captured from real babeld 1.12.1 (see `golden/README.md`):
//! every one parses, re-emits byte for byte at the raw layer, and decodes to
//! the fields babeld meant.

use std::path::PathBuf;

use ipnet::IpNet;
use sixmesh_routing::wire::tlv::parse_raw;
use sixmesh_routing::wire::{self, Decoded, INFINITY, Message, RequestTarget, RouterId};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let hex: String = text.split_whitespace().collect();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn decode(name: &str) -> Decoded {
    wire::decode(&load(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rid(last: u8) -> RouterId {
    RouterId([2, 0, 0, 0, 0, 0, 0, last])
}

fn updates(d: &Decoded) -> Vec<(Option<IpNet>, Option<IpNet>, RouterId, u16)> {
    d.messages
        .iter()
        .filter_map(|m| match m {
            Message::Update { prefix, src, router_id, metric, .. } => {
                Some((*prefix, *src, *router_id, *metric))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_golden_packet_parses_and_re_emits_byte_for_byte() {
    let mut count = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "hex") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let bytes = load(&name);
        let raw = parse_raw(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(raw.emit().unwrap(), bytes, "{name} does not round-trip");
        let d = decode(&name);
        // AE 4 (v4-via-v6) updates are skipped on purpose; everything else is clean.
        let expected_errors = if name.starts_with("v4-via-v6") { 2 } else { 0 };
        assert_eq!(d.errors, expected_errors, "{name}: {d:?}");
        if name.starts_with("mac-") {
            assert!(d.unknown > 0, "{name}: MAC/PC TLVs are not interpreted");
        } else {
            assert_eq!(d.unknown, 0, "{name}");
        }
        count += 1;
    }
    assert!(count >= 20, "only {count} golden packets found");
}

#[test]
fn startup_dump_with_prefix_compression() {
    let d = decode("wired-startup-dump-compressed.hex");
    assert_eq!(
        updates(&d),
        vec![
            (None, None, RouterId::default(), INFINITY),
            (Some(net("2001:db8:b::1/128")), None, rid(0x0b), 0),
            (Some(net("2001:db8:b:1::/64")), None, rid(0x0b), 0),
            (Some(net("2001:db8:b:2::/64")), None, rid(0x0b), 0),
        ]
    );
    assert!(d.messages.contains(&Message::RouteReq(RequestTarget::All)));
    assert!(matches!(
        d.messages[0],
        Message::Hello { unicast: false, seqno: 61160, interval: 100, timestamp: None }
    ));
}

#[test]
fn router_id_taken_from_prefix_without_router_id_tlv() {
    let d = decode("tunnel-dump-router-id-flag.hex");
    let u = updates(&d);
    assert_eq!(u[1], (Some(net("2001:db8:b:0:200::b/128")), None, rid(0x0b), 0));
    // The /64s compress against it and inherit its router-id.
    assert!(u[2..].iter().all(|(p, _, r, _)| p.unwrap().prefix_len() == 64 && *r == rid(0x0b)), "{u:?}");
}

#[test]
fn source_specific_updates_and_requests() {
    let d = decode("source-specific-updates.hex");
    let src = Some(net("2001:db8:b::/48"));
    let u = updates(&d);
    assert!(u.contains(&(Some(net("2001:db8:c::/48")), src, rid(0x0b), 0)), "{u:?}");
    assert!(u.contains(&(Some(net("::/0")), src, rid(0x0b), 0)), "{u:?}");
    let d = decode("source-specific-route-requests.hex");
    assert!(
        d.messages.iter().any(|m| matches!(m, Message::RouteReq(RequestTarget::Prefix { src: Some(_), .. })))
    );
}

#[test]
fn timestamps_in_hello_and_ihu() {
    let d = decode("tunnel-hello-ihu-timestamps.hex");
    assert!(matches!(d.messages[0], Message::Hello { timestamp: Some(_), .. }));
    let Message::Ihu { rxcost, addr, timestamps, .. } = &d.messages[1] else { panic!("{d:?}") };
    assert!(timestamps.is_some());
    assert_eq!(*addr, Some("fe80::b".parse().unwrap()));
    assert!(*rxcost == 96 || *rxcost == INFINITY);
}

#[test]
fn seqno_request_and_unicast_hello() {
    let d = decode("seqno-request-retraction.hex");
    assert!(matches!(d.messages[0], Message::SeqnoReq { hop_count: 127, .. }), "{d:?}");
    let d = decode("unicast-hello-ihu-timestamps.hex");
    assert!(matches!(d.messages[0], Message::Hello { unicast: true, interval: 0, .. }), "{d:?}");
}

#[test]
fn compressed_retractions_with_no_prefix_bytes() {
    let d = decode("wired-retractions-omitted-16-and-8.hex");
    let u = updates(&d);
    assert!(u.len() >= 4);
    assert!(u.iter().all(|(p, ..)| p.is_some()));
    assert!(u.iter().filter(|(.., m)| *m == INFINITY).count() >= 3, "{u:?}");
}

#[test]
fn ipv4_updates_use_the_ipv4_next_hop() {
    let d = decode("ipv4-next-hop-ae1-updates.hex");
    let v4: Vec<_> = d
        .messages
        .iter()
        .filter_map(|m| match m {
            Message::Update { prefix: Some(IpNet::V4(p)), next_hop, .. } => Some((*p, *next_hop)),
            _ => None,
        })
        .collect();
    assert!(!v4.is_empty());
    assert!(v4.iter().all(|(_, nh)| *nh == Some("192.0.2.11".parse().unwrap())), "{v4:?}");
}

/// Inputs that once crashed the fuzz target (`fuzz/regressions/`) go
/// through the codec and a router without panicking.
#[test]
fn fuzz_regressions_do_not_panic() {
    use sixmesh_routing::core::{InterfaceConfig, LinkKind, Router};
    use std::time::{Duration, Instant};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let _ = wire::decode(&data);
        let now = Instant::now();
        let mut r = Router::new(rid(1), 0, now);
        r.add_interface(now, 1, InterfaceConfig::new(LinkKind::Tunnel, "fe80::1".parse().unwrap()));
        let peer = "fe80::2".parse().unwrap();
        r.handle_packet(now, 1, peer, &data);
        r.handle_packet(now + Duration::from_millis(10), 1, peer, &data);
        r.handle_timeout(now + Duration::from_secs(30));
        n += 1;
    }
    assert!(n >= 1);
}
