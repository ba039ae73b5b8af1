//! Feeds arbitrary bytes to the Babel codec and to a router: nothing may
//! panic, and whatever the raw layer parses must re-emit to bytes that
//! parse to the same TLVs.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sixmesh_routing::core::{InterfaceConfig, LinkKind, Router};
use sixmesh_routing::wire::{self, RouterId, tlv};

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode(data);
    if let Ok(raw) = tlv::parse_raw(data)
        && let Ok(bytes) = raw.emit()
    {
        assert_eq!(tlv::parse_raw(&bytes).as_ref(), Ok(&raw));
    }
    // The router must swallow anything, from a neighbour it knows or not.
    let now = epoch();
    let mut r = Router::new(RouterId([2, 0, 0, 0, 0, 0, 0, 1]), 0, now);
    r.add_interface(now, 1, InterfaceConfig::new(LinkKind::Tunnel, "fe80::1".parse().unwrap()));
    let peer = "fe80::2".parse().unwrap();
    r.handle_packet(now, 1, peer, data);
    r.handle_packet(now + Duration::from_millis(10), 1, peer, data);
    r.handle_timeout(now + Duration::from_secs(30));
    while r.poll_transmit().is_some() {}
    while r.poll_event().is_some() {}
});
