//! Unit tests of the router's pieces. Multi-router behaviour (convergence,
//! loops, failures, restarts, RTT) is tested on virtual time in
//! `netsim/tests/babel_routing.rs`, which drives this same core.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::tables::Neighbour;
use super::*;

fn ll(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n)
}

fn router(now: Instant) -> Router {
    let mut r = Router::new(RouterId([2, 0, 0, 0, 0, 0, 0, 1]), 0, now);
    r.add_interface(now, 0, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    while r.poll_transmit().is_some() {}
    r
}

fn packet(msgs: &[Message]) -> Vec<u8> {
    wire::encode(msgs, 1400).remove(0)
}

#[test]
fn seqnos_compare_modulo_2_16() {
    assert!(seqno_newer(1, 0));
    assert!(seqno_newer(0, 65535));
    assert!(seqno_newer(100, 65000));
    assert!(!seqno_newer(65000, 100));
    assert!(!seqno_newer(5, 5));
    assert!(!seqno_newer(0, 32768) || !seqno_newer(32768, 0));
}

#[test]
fn metric_addition_saturates_at_infinity() {
    assert_eq!(add_metric(96, 96), 192);
    assert_eq!(add_metric(96, INFINITY), INFINITY);
    assert_eq!(add_metric(60000, 60000), INFINITY);
}

#[test]
fn two_out_of_three_and_late_hellos() {
    let now = Instant::now();
    let cfg = InterfaceConfig::new(LinkKind::Wired, ll(1));
    let mut n = Neighbour::new(0, ll(2), now);
    n.hello(now, 10, 400, None);
    assert_eq!(n.rxcost(&cfg), INFINITY, "one Hello is not enough");
    n.hello(now, 11, 400, None);
    assert_eq!(n.rxcost(&cfg), 96);
    // 13 arrives, 12 was lost: 2 of the last 3 still.
    n.hello(now, 13, 400, None);
    assert_eq!(n.rxcost(&cfg), 96);
    // Two more lost (16 arrives): 1 of the last 3.
    n.hello(now, 16, 400, None);
    assert_eq!(n.rxcost(&cfg), INFINITY);
    // Timer-counted misses are undone by a late Hello.
    let t = now + Duration::from_secs(4);
    let mut m = Neighbour::new(0, ll(3), t);
    m.hello(t, 1, 400, None);
    m.hello(t, 2, 400, None);
    m.expire(t + Duration::from_secs(7)); // deadline at +6 s: one miss counted
    m.hello(t + Duration::from_millis(7100), 3, 400, None); // ... but it was only late
    assert_eq!(m.rxcost(&cfg), 96);
}

/// The RTT penalty, computed with the sample, stops counting with it.
#[test]
fn rtt_penalty_counts_while_its_sample_does() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let cfg = InterfaceConfig::new(LinkKind::Tunnel, ll(1));
    let mut n = Neighbour::new(0, ll(2), t0);
    for seqno in 1..=3 {
        n.hello(t0, seqno, 400, None);
    }
    n.ihu(t0, 96, 400, Some(Duration::from_millis(65)), &cfg);
    // 96 + 96 × (65 − 10) / (120 − 10) for the 65 ms RTT.
    assert_eq!(n.cost(t0, &cfg), 96 + 48);
    // Hellos and IHUs without RTT samples keep it up; the sample ages.
    let mut t = t0;
    for seqno in 4..=53 {
        t += s(4);
        n.hello(t, seqno, 400, None);
        n.ihu(t, 96, 400, None, &cfg);
        let penalty = if t < t0 + s(180) { 48 } else { 0 };
        assert_eq!(n.cost(t, &cfg), 96 + penalty, "at {:?}", t - t0);
    }
}

#[test]
fn hello_gaps_at_the_edges_of_the_window() {
    // Regression (cargo fuzz): a gap of exactly 16 missed Hellos shifted a
    // u16 by 16.
    let now = Instant::now();
    let cfg = InterfaceConfig::new(LinkKind::Wired, ll(1));
    for (first, next) in [(0u16, 17u16), (0, 18), (100, 92), (100, 91), (65535, 16)] {
        let mut n = Neighbour::new(0, ll(2), now);
        n.hello(now, first, 400, None);
        n.hello(now, first.wrapping_add(1), 400, None);
        n.hello(now, next, 400, None);
        assert!(n.rxcost(&cfg) == INFINITY || n.rxcost(&cfg) == 96);
    }
}

#[test]
fn ihu_expiry_makes_the_link_unusable() {
    let now = Instant::now();
    let cfg = InterfaceConfig::new(LinkKind::Wired, ll(1));
    let mut n = Neighbour::new(0, ll(2), now);
    n.hello(now, 1, 400, None);
    n.hello(now, 2, 400, None);
    assert_eq!(n.cost(now, &cfg), INFINITY, "no IHU yet: unidirectional");
    n.ihu(now, 96, 1200, None, &cfg);
    assert_eq!(n.cost(now, &cfg), 96);
    // Hold time 3.5 × 12 s; keep the Hellos coming meanwhile.
    for s in 1..=43 {
        n.hello(now + Duration::from_secs(s), 2 + s as u16, 400, None);
    }
    n.expire(now + Duration::from_secs(43));
    assert_eq!(n.cost(now + Duration::from_secs(43), &cfg), INFINITY);
}

#[test]
fn feasibility_condition() {
    let now = Instant::now();
    let mut r = router(now);
    let key: RouteKey = ("fd00::/64".parse().unwrap(), None);
    let id = RouterId([2, 0, 0, 0, 0, 0, 0, 9]);
    assert!(r.feasible(&key, id, 5, 500), "no source entry: feasible");
    r.sources.insert((key, id), tables::Source { seqno: 5, metric: 200, used: now });
    assert!(r.feasible(&key, id, 5, 199));
    assert!(!r.feasible(&key, id, 5, 200));
    assert!(!r.feasible(&key, id, 4, 10), "older seqno");
    assert!(r.feasible(&key, id, 6, 5000), "newer seqno");
    assert!(r.feasible(&key, id, 4, INFINITY), "retractions are always feasible");
}

#[test]
fn ack_requests_are_answered_by_unicast() {
    let now = Instant::now();
    let mut r = router(now);
    r.handle_packet(now, 0, ll(2), &packet(&[Message::AckReq { opaque: 0xbeef, interval: 100 }]));
    let mut acked = false;
    while let Some(t) = r.poll_transmit() {
        if wire::decode(&t.payload).unwrap().messages.contains(&Message::Ack { opaque: 0xbeef }) {
            assert_eq!(t.dst, Destination::Unicast(ll(2)));
            acked = true;
        }
    }
    assert!(acked);
}

#[test]
fn ihus_about_other_routers_are_ignored() {
    let now = Instant::now();
    let mut r = router(now);
    let hello = |s| Message::Hello { unicast: false, seqno: s, interval: 400, timestamp: None };
    let ihu = |a| Message::Ihu { rxcost: 96, interval: 1200, addr: Some(IpAddr::V6(a)), timestamps: None };
    r.handle_packet(now, 0, ll(2), &packet(&[hello(1), ihu(ll(7))]));
    r.handle_packet(now, 0, ll(2), &packet(&[hello(2), ihu(ll(7))]));
    assert_eq!(r.neighbours(now)[0].txcost, INFINITY);
    r.handle_packet(now, 0, ll(2), &packet(&[hello(3), ihu(ll(1))]));
    assert_eq!(r.neighbours(now)[0].cost, 96);
    assert!(std::iter::from_fn(|| r.poll_event()).any(|e| matches!(e, Event::NeighbourUp { .. })));
}

#[test]
fn a_drained_interface_is_expensive_both_ways_at_once() {
    let now = Instant::now();
    let mut r = router(now);
    r.add_interface(now, 1, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    while r.poll_transmit().is_some() {}
    let hello = |s| Message::Hello { unicast: false, seqno: s, interval: 400, timestamp: None };
    let ihu = Message::Ihu { rxcost: 96, interval: 1200, addr: Some(IpAddr::V6(ll(1))), timestamps: None };
    for (iface, peer) in [(0, ll(2)), (1, ll(3))] {
        for s in 1..=3 {
            r.handle_packet(now, iface, peer, &packet(&[hello(s), ihu.clone()]));
        }
    }
    while r.poll_transmit().is_some() {}
    let cost = |r: &Router, a| r.neighbours(now).iter().find(|n| n.addr == a).map(|n| n.cost);
    assert_eq!((cost(&r, ll(2)), cost(&r, ll(3))), (Some(96), Some(96)));

    r.drain_interface(now, 0, 4096);
    // Our way: at once, though the neighbour still says 96 ...
    assert_eq!((cost(&r, ll(2)), cost(&r, ll(3))), (Some(4096), Some(96)));
    // ... and theirs: an IHU saying so, sent now on that interface only.
    let mut told = Vec::new();
    while let Some(t) = r.poll_transmit() {
        for m in wire::decode(&t.payload).unwrap().messages {
            if let Message::Ihu { rxcost, addr, .. } = m {
                told.push((t.iface, rxcost, addr));
            }
        }
    }
    assert_eq!(told, vec![(0, 4096, Some(IpAddr::V6(ll(2))))]);
    // The neighbour's next IHU does not bring the cost back down.
    r.handle_packet(now, 0, ll(2), &packet(&[hello(4), ihu.clone()]));
    assert_eq!(cost(&r, ll(2)), Some(4096));
}

/// A router with interfaces 0, 1 and 2 and a neighbour on each (`ll(2)`,
/// `ll(3)`, `ll(4)`) whose link costs 96, 256 and 96.
fn three_neighbours(now: Instant) -> Router {
    let mut r = router(now);
    r.add_interface(now, 1, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    r.add_interface(now, 2, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    let hello = |s| Message::Hello { unicast: false, seqno: s, interval: 400, timestamp: None };
    for (iface, peer, rxcost) in [(0, ll(2), 96), (1, ll(3), 256), (2, ll(4), 96)] {
        let ihu = Message::Ihu { rxcost, interval: 1200, addr: Some(IpAddr::V6(ll(1))), timestamps: None };
        for s in 1..=3 {
            r.handle_packet(now, iface, peer, &packet(&[hello(s), ihu.clone()]));
        }
    }
    while r.poll_transmit().is_some() {}
    r
}

/// A tunnel peer may send from what the neighbours on its interface
/// advertise, and only that: not another interface's routes, not a
/// retracted one, not an unknown interface.
#[test]
fn advertised_sources_are_per_interface() {
    let now = Instant::now();
    let mut r = three_neighbours(now);
    let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    r.handle_packet(now, 0, ll(2), &packet(&[update("2001:db8:1::/64", 1, 96, 400)]));
    r.handle_packet(now, 1, ll(3), &packet(&[update("2001:db8:2::/48", 1, 96, 400)]));
    r.handle_packet(now, 2, ll(4), &packet(&[update("2001:db8:3::/64", 1, 96, 400)]));
    assert!(r.advertises(0, a("2001:db8:1::5")));
    assert!(r.advertises(1, a("2001:db8:2:7::1")));
    assert!(!r.advertises(1, a("2001:db8:1::5")), "another interface's route");
    assert!(!r.advertises(0, a("2001:db8:9::1")), "no route");
    assert!(!r.advertises(7, a("2001:db8:1::5")), "no such interface");
    // Interface 1's neighbour also has db8:1 now: both may send from it.
    r.handle_packet(now, 1, ll(3), &packet(&[update("2001:db8:1::/64", 1, 96, 400)]));
    assert!(r.advertises(0, a("2001:db8:1::5")) && r.advertises(1, a("2001:db8:1::5")));
    // Retracted on interface 2: no more.
    assert!(r.advertises(2, a("2001:db8:3::1")));
    r.handle_packet(now, 2, ll(4), &packet(&[update("2001:db8:3::/64", 2, INFINITY, 400)]));
    assert!(!r.advertises(2, a("2001:db8:3::1")));
}

/// What `r` sends within `d` from `t`: (iface, destination, message).
fn sent_within(r: &mut Router, t: Instant, d: Duration) -> Vec<(IfaceId, Destination, Message)> {
    let mut sent = Vec::new();
    let mut now = t;
    while now < t + d {
        now += Duration::from_millis(10);
        r.handle_timeout(now);
        while let Some(x) = r.poll_transmit() {
            for m in wire::decode(&x.payload).unwrap().messages {
                sent.push((x.iface, x.dst, m));
            }
        }
    }
    sent
}

fn seqnos_of(sent: &[(IfaceId, Destination, Message)], prefix: &str) -> Vec<u16> {
    let want: IpNet = prefix.parse().unwrap();
    sent.iter()
        .filter_map(|(_, _, m)| match m {
            Message::Update { prefix: Some(p), seqno, .. } if *p == want => Some(*seqno),
            _ => None,
        })
        .collect()
}

/// A seqno request for `fd00:1::/64` of router 7, 8 hops left.
fn seqno_request(seqno: u16) -> Message {
    Message::SeqnoReq {
        prefix: "fd00:1::/64".parse().unwrap(),
        src: None,
        seqno,
        hop_count: 8,
        router_id: RouterId([2, 0, 0, 0, 0, 0, 0, 7]),
    }
}

/// A new seqno alone is not flooded (babeld's `send_triggered_update`):
/// the periodic updates carry it, except to whoever asked for it, who
/// hears it at once.
#[test]
fn a_new_seqno_goes_at_once_only_to_who_asked() {
    let t0 = Instant::now();
    let mut r = three_neighbours(t0);
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 3000)]));
    let sent = sent_within(&mut r, t0, Duration::from_secs(1));
    assert!(seqnos_of(&sent, "fd00:1::/64").contains(&1), "a new route is sent at once");
    let t = t0 + Duration::from_secs(1);
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:1::/64", 2, 100, 3000)]));
    let sent = sent_within(&mut r, t, Duration::from_secs(2));
    assert_eq!(seqnos_of(&sent, "fd00:1::/64"), Vec::<u16>::new(), "seqno 2 alone: nothing sent");
    // Neighbour ll(4) asks for seqno 3: forwarded towards the source ...
    let t = t + Duration::from_secs(2);
    let req = seqno_request(3);
    r.handle_packet(t, 2, ll(4), &packet(&[req]));
    let sent = sent_within(&mut r, t, Duration::from_millis(100));
    let fwd: Vec<_> = sent
        .iter()
        .filter(|(_, _, m)| matches!(m, Message::SeqnoReq { seqno: 3, hop_count: 7, .. }))
        .map(|(i, d, _)| (*i, *d))
        .collect();
    assert_eq!(fwd, vec![(0, Destination::Unicast(ll(2)))]);
    // ... and its answer goes out at once.
    let t = t + Duration::from_millis(100);
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:1::/64", 3, 100, 3000)]));
    let sent = sent_within(&mut r, t, Duration::from_millis(100));
    assert!(seqnos_of(&sent, "fd00:1::/64").contains(&3), "the answer is sent: {sent:?}");
}

/// A request is answered on the requester's interface alone, once
/// (babeld's `send_update(neigh->ifp, 1, …)`: the other neighbours did
/// not ask); a new seqno that satisfies a request we passed on goes on
/// every interface, once (babeld's `urgent = 1`: a lost one is asked for
/// again). Answers used to go everywhere three times: about 60 times the
/// updates of babeld's answer in a mesh of 20 tunnels per node.
#[test]
fn requests_are_answered_where_they_came_from_once() {
    let t0 = Instant::now();
    let mut r = three_neighbours(t0);
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 3000)]));
    sent_within(&mut r, t0, Duration::from_secs(1));
    let with_seqno = |sent: &[(IfaceId, Destination, Message)], want: u16| -> Vec<IfaceId> {
        let prefix: IpNet = "fd00:1::/64".parse().unwrap();
        let mut v: Vec<IfaceId> = sent
            .iter()
            .filter(|(_, _, m)| matches!(m, Message::Update { prefix: Some(p), seqno, .. } if *p == prefix && *seqno == want))
            .map(|x| x.0)
            .collect();
        v.sort_unstable();
        v
    };
    // ll(4) asks for the seqno we have: the answer goes back to it alone.
    let t = t0 + Duration::from_secs(1);
    r.handle_packet(t, 2, ll(4), &packet(&[seqno_request(1)]));
    assert_eq!(with_seqno(&sent_within(&mut r, t, Duration::from_secs(1)), 1), vec![2]);
    // It asks for a newer one: passed on to the source's side; the new
    // seqno, when it comes, goes on every interface, once.
    let t = t + Duration::from_secs(1);
    r.handle_packet(t, 2, ll(4), &packet(&[seqno_request(2)]));
    sent_within(&mut r, t, Duration::from_millis(100));
    let t = t + Duration::from_millis(100);
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:1::/64", 2, 100, 3000)]));
    assert_eq!(with_seqno(&sent_within(&mut r, t, Duration::from_secs(1)), 2), vec![0, 1, 2]);
}

/// The counters tell the seqno requests we originate from those we pass
/// on, and count the bumps of our own seqno that requests cause.
#[test]
fn seqno_requests_and_bumps_are_counted() {
    let t0 = Instant::now();
    let mut r = three_neighbours(t0);
    let counts = |r: &Router| {
        let s = r.stats();
        (s.seqno_requests_sent, s.seqno_requests_forwarded, s.seqno_bumps)
    };
    // A neighbour's request for a newer seqno than ours is passed on.
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 3000)]));
    sent_within(&mut r, t0, Duration::from_secs(1));
    let t = t0 + Duration::from_secs(1);
    r.handle_packet(t, 2, ll(4), &packet(&[seqno_request(2)]));
    assert_eq!(counts(&r), (0, 1, 0));
    // Another destination, through ll(2) (196, sent on, so that is our
    // feasibility distance) and ll(3) (200 + 256, not feasible: 200 >
    // 196). Retracted by ll(2): we starve and ask for a new seqno, once.
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:2::/64", 1, 100, 3000)]));
    r.handle_packet(t, 1, ll(3), &packet(&[update("fd00:2::/64", 1, 200, 3000)]));
    sent_within(&mut r, t, Duration::from_secs(1));
    let t = t + Duration::from_secs(1);
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:2::/64", 1, INFINITY, 3000)]));
    let asked: Vec<_> = sent_within(&mut r, t, Duration::from_millis(100))
        .into_iter()
        .filter(|(_, _, m)| matches!(m, Message::SeqnoReq { seqno: 2, .. }))
        .map(|(i, d, _)| (i, d))
        .collect();
    assert_eq!(asked, vec![(1, Destination::Unicast(ll(3)))]);
    assert_eq!(counts(&r), (1, 1, 0));
    // A request for our own prefix with a newer seqno bumps ours; one for
    // the seqno we have does not.
    let ours: Ipv6Net = "fd00:9::/64".parse().unwrap();
    r.announce(t, ours, None);
    let req = |seqno| Message::SeqnoReq {
        prefix: IpNet::V6(ours),
        src: None,
        seqno,
        hop_count: 8,
        router_id: r.id(),
    };
    let (now_seqno, next) = (req(r.seqno()), req(r.seqno().wrapping_add(1)));
    r.handle_packet(t, 2, ll(4), &packet(&[now_seqno]));
    assert_eq!(counts(&r).2, 0);
    r.handle_packet(t, 2, ll(4), &packet(&[next]));
    assert_eq!(counts(&r), (1, 1, 1));
}

/// A seqno request not yet answered follows the route: when the selected
/// route moves to another neighbour, that one is asked too; an answer
/// through a drained interface does not count.
#[test]
fn a_pending_request_follows_the_route_and_ignores_drained_answers() {
    let t0 = Instant::now();
    let mut r = three_neighbours(t0);
    // Through ll(2): 100 + 96; through ll(3): 50 + 256, feasible too.
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 3000)]));
    r.handle_packet(t0, 1, ll(3), &packet(&[update("fd00:1::/64", 1, 50, 3000)]));
    sent_within(&mut r, t0, Duration::from_secs(1));
    let key: RouteKey = ("fd00:1::/64".parse().unwrap(), None);
    assert_eq!(r.selected(&key).map(|s| (s.0, s.2)), Some((0, 196)));
    let t = t0 + Duration::from_secs(1);
    let req = seqno_request(2);
    r.handle_packet(t, 2, ll(4), &packet(&[req]));
    let asked = |sent: &[(IfaceId, Destination, Message)]| -> Vec<IfaceId> {
        sent.iter().filter(|(_, _, m)| matches!(m, Message::SeqnoReq { seqno: 2, .. })).map(|x| x.0).collect()
    };
    assert_eq!(asked(&sent_within(&mut r, t, Duration::from_millis(50))), vec![0]);
    // Interface 0 drained: the route moves to ll(3), which is asked now.
    let t = t + Duration::from_millis(50);
    r.drain_interface(t, 0, 4096);
    r.handle_packet(t, 1, ll(3), &packet(&[update("fd00:1::/64", 1, 50, 3000)]));
    assert_eq!(r.selected(&key).map(|s| s.0), Some(1));
    assert_eq!(asked(&sent_within(&mut r, t, Duration::from_millis(50))), vec![1]);
    // ll(3) loses its route for a moment, and the source's answer comes
    // first through the drained tunnel: the route takes it (the only one
    // left), but that is not the answer whoever asked us needs.
    let t = t + Duration::from_millis(50);
    r.handle_packet(t, 1, ll(3), &packet(&[update("fd00:1::/64", 1, INFINITY, 3000)]));
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:1::/64", 2, 0, 3000)]));
    assert_eq!(r.selected(&key).map(|s| s.0), Some(0));
    let sent = sent_within(&mut r, t, Duration::from_millis(50));
    assert!(!seqnos_of(&sent, "fd00:1::/64").contains(&2), "{sent:?}");
    // The answer along the route (seqno 2 through ll(3)) is passed on.
    let t = t + Duration::from_millis(50);
    r.handle_packet(t, 1, ll(3), &packet(&[update("fd00:1::/64", 2, 50, 3000)]));
    assert_eq!(r.selected(&key).map(|s| s.0), Some(1));
    let sent = sent_within(&mut r, t, Duration::from_millis(50));
    assert!(seqnos_of(&sent, "fd00:1::/64").contains(&2), "{sent:?}");
}

/// Urgent updates (here retractions of lost routes) wait about 10 ms, as
/// babeld's urgent buffers do: the changes of a burst of packets share
/// datagrams, first sends and repetitions alike, instead of a datagram per
/// packet on every interface.
#[test]
fn urgent_updates_of_a_burst_share_datagrams() {
    let t0 = Instant::now();
    let mut r = three_neighbours(t0);
    let prefixes = ["fd00:1::/64", "fd00:2::/64"];
    for p in prefixes {
        r.handle_packet(t0, 0, ll(2), &packet(&[update(p, 1, 100, 3000)]));
    }
    sent_within(&mut r, t0, Duration::from_secs(1));
    // Both routes are lost, by two packets 2 ms apart.
    let t = t0 + Duration::from_secs(1);
    for (k, p) in prefixes.iter().enumerate() {
        let at = t + Duration::from_millis(2 * k as u64);
        r.handle_timeout(at);
        r.handle_packet(at, 0, ll(2), &packet(&[update(p, 1, INFINITY, 3000)]));
    }
    // Every datagram on interface 1 within a second: (ms after t, prefixes retracted).
    let mut datagrams = Vec::new();
    let mut now = t + Duration::from_millis(2);
    loop {
        while let Some(x) = r.poll_transmit() {
            let retracted: Vec<String> = wire::decode(&x.payload)
                .unwrap()
                .messages
                .iter()
                .filter_map(|m| match m {
                    Message::Update { prefix: Some(p), metric: INFINITY, .. } => Some(p.to_string()),
                    _ => None,
                })
                .collect();
            if x.iface == 1 && !retracted.is_empty() {
                datagrams.push(((now - t).as_millis(), retracted));
            }
        }
        now += Duration::from_millis(1);
        if now > t + Duration::from_secs(1) {
            break;
        }
        r.handle_timeout(now);
    }
    assert_eq!(datagrams.len(), URGENT_REPEAT as usize, "{datagrams:?}");
    for (ms, retracted) in &datagrams {
        assert_eq!(retracted, &prefixes.map(String::from).to_vec(), "at {ms} ms: {datagrams:?}");
    }
    assert!((5..=20).contains(&datagrams[0].0), "first sent {} ms after the first loss", datagrams[0].0);
}

#[test]
fn garbage_and_non_link_local_sources_are_counted_not_fatal() {
    let now = Instant::now();
    let mut r = router(now);
    r.handle_packet(now, 0, ll(2), &[1, 2, 3]);
    r.handle_packet(now, 0, "2001:db8::1".parse().unwrap(), &packet(&[Message::Ack { opaque: 1 }]));
    r.handle_packet(now, 9, ll(2), &packet(&[Message::Ack { opaque: 1 }]));
    assert_eq!(r.stats().packets_dropped, 3);
    assert!(r.neighbours(now).is_empty());
}

#[test]
fn announced_prefix_is_sent_with_our_id_and_metric_0() {
    let now = Instant::now();
    let mut r = router(now);
    r.announce(now, "fd00:1::/64".parse().unwrap(), None);
    let sent: Vec<Message> = std::iter::from_fn(|| r.poll_transmit())
        .flat_map(|t| wire::decode(&t.payload).unwrap().messages)
        .collect();
    assert!(sent.iter().any(|m| matches!(m,
        Message::Update { prefix: Some(p), metric: 0, router_id, .. }
            if *p == "fd00:1::/64".parse::<IpNet>().unwrap() && *router_id == r.id())));
}

/// A slot's packed neighbour ids follow its entries through pushes and
/// swap-removes, inline and past the inline part.
#[test]
fn slot_finds_every_neighbour_through_pushes_and_removals() {
    use super::tables::{Expiry, RouteEntry, Slot, Ticks};
    let now = Instant::now();
    let entry = |nbr: u32| RouteEntry {
        nbr,
        router_id: RouterId([0; 8]),
        seqno: 0,
        refmetric: 0,
        metric: 0,
        expires: Expiry::at(Ticks::ceil(now, now)),
    };
    // Every third neighbour's entry has a next hop of its own (its address
    // is `ll(nbr)`; the other hop `ll(1000 + nbr)`).
    let own = |nbr: u32| ll(1000 + nbr as u16);
    let addr = |nbr: u32| ll(nbr as u16);
    let mut slot = Slot::default();
    let mut model: Vec<u32> = Vec::new();
    let mut x = 7u32;
    for step in 0..2000 {
        // A deterministic mix of adds (up to 40 neighbours) and removals.
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let nbr = (x >> 16) % 40;
        if model.contains(&nbr) {
            assert!(slot.remove_nbr(nbr), "step {step}");
            model.retain(|&n| n != nbr);
        } else {
            slot.push(entry(nbr));
            let hop = if nbr.is_multiple_of(3) { own(nbr) } else { addr(nbr) };
            slot.set_next_hop(nbr, hop, addr(nbr));
            model.push(nbr);
        }
        assert_eq!(slot.entries.len(), model.len());
        for n in 0..40 {
            match slot.position(n) {
                Some(i) => {
                    assert_eq!(slot.entries[i].nbr, n, "step {step}");
                    let hop = if n.is_multiple_of(3) { own(n) } else { addr(n) };
                    assert_eq!(slot.next_hop(n, addr(n)), hop, "step {step}: next hop of {n}");
                }
                None => assert!(!model.contains(&n), "step {step}: {n} lost"),
            }
        }
    }
    assert!(!slot.remove_nbr(99));
}

/// Route expiry times round up (an entry never expires early) and
/// comparisons against a rounded-down now see it expired once due.
#[test]
fn ticks_never_expire_an_entry_early() {
    use super::tables::Ticks;
    let epoch = Instant::now();
    for ms in [0u64, 1, 249, 250, 251, 999, 1000, 123_456] {
        let due = epoch + Duration::from_millis(ms);
        let expires = Ticks::ceil(epoch, due);
        for before in [1u64, 10, 100, 249] {
            if let Some(t) = due.checked_sub(Duration::from_millis(before))
                && t >= epoch
            {
                assert!(expires > Ticks::floor(epoch, t), "{ms} ms: expired {before} ms early");
            }
        }
        assert!(expires <= Ticks::floor(epoch, due + Duration::from_millis(250)), "{ms} ms: late by a tick");
    }
    // Far in the future: saturates instead of wrapping.
    let far = epoch + Duration::from_secs(200 * 365 * 86_400);
    assert!(Ticks::ceil(epoch, far) >= Ticks::floor(epoch, far));
}

/// A router holds one entry per destination per neighbour: keep it small.
#[test]
fn route_entries_stay_small() {
    assert!(std::mem::size_of::<super::tables::RouteEntry>() <= 24);
    // One per destination, in the hash table's buckets (see `Slot`).
    assert!(std::mem::size_of::<super::tables::Slot>() <= 144);
}

/// Drives `r` to `until` in steps, running its timers; returns the
/// updates it sent on `iface` (on every interface if `None`).
fn run_until(r: &mut Router, from: Instant, until: Instant, iface: Option<IfaceId>) -> Vec<Message> {
    let mut sent = Vec::new();
    let mut t = from;
    while t < until {
        t += Duration::from_millis(100);
        r.handle_timeout(t);
        while let Some(x) = r.poll_transmit() {
            if iface.is_none_or(|i| i == x.iface) {
                let msgs = wire::decode(&x.payload).unwrap().messages;
                sent.extend(msgs.into_iter().filter(|m| matches!(m, Message::Update { .. })));
            }
        }
    }
    sent
}

/// A neighbour that says Hello every 2 s and hears us (cost 96).
struct Peer {
    addr: Ipv6Addr,
    seqno: u16,
}

impl Peer {
    fn hello(&mut self, r: &mut Router, now: Instant) {
        self.seqno += 1;
        let hello = Message::Hello { unicast: false, seqno: self.seqno, interval: 200, timestamp: None };
        let ihu = Message::Ihu { rxcost: 96, interval: 600, addr: None, timestamps: None };
        r.handle_packet(now, 0, self.addr, &packet(&[hello, ihu]));
    }

    /// Runs `r` for `d` from `t`, saying Hello every 2 s; returns the
    /// updates `r` sent on `iface` (every one if `None`) and the new time.
    fn run(
        &mut self,
        r: &mut Router,
        t: Instant,
        d: Duration,
        iface: Option<IfaceId>,
    ) -> (Vec<Message>, Instant) {
        let mut sent = Vec::new();
        let mut t = t;
        let end = t + d;
        while t < end {
            let next = t + Duration::from_secs(2);
            sent.extend(run_until(r, t, next, iface));
            self.hello(r, next);
            t = next;
        }
        (sent, t)
    }
}

fn update(prefix: &str, seqno: u16, metric: u16, interval: u16) -> Message {
    Message::Update {
        prefix: Some(prefix.parse().unwrap()),
        src: None,
        router_id: RouterId([2, 0, 0, 0, 0, 0, 0, 7]),
        next_hop: None,
        seqno,
        metric,
        interval,
    }
}

/// An entry that is not refreshed goes after 3.5 of the intervals its
/// neighbour announced, even when an earlier sweep found nothing due (the
/// sweep skips the table until the earliest expiry it knows of, and a
/// newer entry with a shorter interval must move that earlier).
#[test]
fn unrefreshed_routes_expire_even_after_empty_sweeps() {
    let t0 = Instant::now();
    let mut r = router(t0);
    let mut p = Peer { addr: ll(2), seqno: 0 };
    for _ in 0..3 {
        p.hello(&mut r, t0);
    }
    // Held 105 s; then, 20 s later, one held 7 s.
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 3000)]));
    let (_, t) = p.run(&mut r, t0, Duration::from_secs(20), None);
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:2::/64", 1, 100, 200)]));
    let key1: RouteKey = ("fd00:1::/64".parse().unwrap(), None);
    let key2: RouteKey = ("fd00:2::/64".parse().unwrap(), None);
    assert!(r.selected(&key2).is_some());
    // Hellos keep the neighbour; only the updates stop.
    let (_, t) = p.run(&mut r, t, Duration::from_secs(30), None);
    assert!(r.selected(&key2).is_none(), "held 7 s, gone 30 s later");
    assert!(r.selected(&key1).is_some(), "held 105 s: still there");
    p.run(&mut r, t, t0 + Duration::from_secs(120) - t, None);
    assert!(r.selected(&key1).is_none(), "held 105 s, gone after 120 s");
}

/// Full updates are built once and reused on every interface, but a
/// change of a selected route shows in the very next one.
#[test]
fn reused_full_updates_carry_route_changes() {
    let t0 = Instant::now();
    let mut r = router(t0);
    r.add_interface(t0, 1, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    let mut p = Peer { addr: ll(2), seqno: 0 };
    for _ in 0..3 {
        p.hello(&mut r, t0);
    }
    r.handle_packet(t0, 0, ll(2), &packet(&[update("fd00:1::/64", 1, 100, 1600)]));
    let metrics = |msgs: &[Message]| -> Vec<u16> {
        let want: IpNet = "fd00:1::/64".parse().unwrap();
        msgs.iter()
            .filter_map(|m| match m {
                Message::Update { prefix: Some(p), metric, .. } if *p == want => Some(*metric),
                _ => None,
            })
            .collect()
    };
    // Both interfaces' periodic full updates (every 16 s) say 196.
    let (sent, t) = p.run(&mut r, t0, Duration::from_secs(34), None);
    let m = metrics(&sent);
    assert!(m.len() >= 2 && m.iter().all(|&x| x == 196), "{m:?}");
    // The route gets worse (with a new seqno: else it is unfeasible):
    // every later update on either interface says so.
    r.handle_packet(t, 0, ll(2), &packet(&[update("fd00:1::/64", 2, 300, 1600)]));
    let (sent, _) = p.run(&mut r, t, Duration::from_secs(34), None);
    let m = metrics(&sent);
    assert!(m.len() >= 2 && m.iter().all(|&x| x == 396), "{m:?}");
}

/// A Hello that moves its neighbour's deadline (1.5 s ahead, a Hello a
/// second) leaves no wake-up behind for the old one: a driver that sleeps
/// until `poll_timeout` is woken by the sweeps, not once per Hello heard
/// (and the neighbour stays up).
#[test]
fn moved_neighbour_deadlines_wake_nobody() {
    let t0 = Instant::now();
    let mut r = Router::new(RouterId([2, 0, 0, 0, 0, 0, 0, 1]), 0, t0);
    let mut c = InterfaceConfig::new(LinkKind::Wired, ll(1));
    c.hello_interval = Duration::from_secs(600);
    c.update_interval = Duration::from_secs(600);
    r.add_interface(t0, 0, c);
    let (mut wakeups, mut hellos) = (0, 0);
    let mut next_hello = t0;
    let end = t0 + Duration::from_secs(60);
    while next_hello < end {
        match r.poll_timeout() {
            Some(t) if t < next_hello => {
                r.handle_timeout(t);
                wakeups += 1;
            }
            _ => {
                hellos += 1;
                let hello = Message::Hello { unicast: false, seqno: hellos, interval: 100, timestamp: None };
                let ihu = Message::Ihu { rxcost: 96, interval: 300, addr: None, timestamps: None };
                r.handle_packet(next_hello, 0, ll(2), &packet(&[hello, ihu]));
                next_hello += Duration::from_secs(1);
            }
        }
        while r.poll_transmit().is_some() {}
    }
    assert_eq!(hellos, 60);
    // The route sweeps (every 10 s) and the source collection (60 s).
    assert!(wakeups <= 10, "{wakeups} wake-ups for {hellos} Hellos");
    assert_eq!(r.neighbours(next_hello).iter().filter(|n| n.cost < INFINITY).count(), 1);
}

/// Neighbours keep their own deadlines (outside the timer heap): on six
/// interfaces (one with an id too large to be stored in place), two
/// neighbours fall silent at different times; each loses its link within
/// 2.5 Hello intervals and is forgotten later, the others never blink, and
/// a newcomer on a silent one's interface (taking its freed id) is heard.
#[test]
fn silent_neighbours_are_noticed_each_at_its_own_deadline() {
    let t0 = Instant::now();
    let mut r = Router::new(RouterId([2, 0, 0, 0, 0, 0, 0, 1]), 0, t0);
    let ifaces = [0, 1, 2, 3, 4, 70_000];
    for &i in &ifaces {
        r.add_interface(t0, i, InterfaceConfig::new(LinkKind::Wired, ll(1)));
    }
    let step = Duration::from_millis(10);
    // (iface, address, first Hello at, silent from)
    let mut peers: Vec<(IfaceId, Ipv6Addr, Duration, Option<Duration>)> = ifaces
        .iter()
        .enumerate()
        .map(|(k, &i)| (i, ll(10 + k as u16), Duration::from_millis(130 * k as u64), None))
        .collect();
    peers[1].3 = Some(Duration::from_secs(10));
    peers[5].3 = Some(Duration::from_millis(15_500));
    let mut seqno = vec![0u16; peers.len()];
    let mut down_at: Vec<Option<Duration>> = vec![None; peers.len()];
    let mut newcomer = false;
    let mut t = Duration::ZERO;
    while t < Duration::from_secs(60) {
        let now = t0 + t;
        while r.poll_timeout().is_some_and(|d| d <= now) {
            r.handle_timeout(now);
        }
        for (k, (iface, addr, first, silent)) in peers.iter().enumerate() {
            let talking = silent.is_none_or(|s| t < s);
            let phase = t.saturating_sub(*first).as_millis() % 1000;
            if talking && t >= *first && phase == 0 {
                seqno[k] = seqno[k].wrapping_add(1);
                let hello =
                    Message::Hello { unicast: false, seqno: seqno[k], interval: 100, timestamp: None };
                let ihu = Message::Ihu { rxcost: 96, interval: 300, addr: None, timestamps: None };
                r.handle_packet(now, *iface, *addr, &packet(&[hello, ihu]));
            }
        }
        while r.poll_transmit().is_some() {}
        let info = r.neighbours(now);
        for (k, (iface, addr, first, _)) in peers.iter().enumerate() {
            let up = info.iter().any(|n| n.iface == *iface && n.addr == *addr && n.cost < INFINITY);
            if t > *first + Duration::from_secs(3) && !up && down_at[k].is_none() {
                down_at[k] = Some(t);
            }
        }
        if t == Duration::from_secs(40) {
            // Forgotten by now (16 intervals of silence), and replaced.
            assert!(!info.iter().any(|n| n.addr == peers[1].1), "{info:?}");
            peers.push((1, ll(99), t + Duration::from_millis(10), None));
            seqno.push(0);
            down_at.push(None);
            newcomer = true;
        }
        t += step;
    }
    assert!(newcomer);
    for (k, d) in down_at.iter().enumerate() {
        match (peers[k].3, d) {
            (Some(silent), Some(d)) => {
                let late = *d - silent;
                assert!(
                    late <= Duration::from_millis(2500) && late >= Duration::from_millis(500),
                    "{k}: {late:?}"
                );
            }
            (None, None) => {}
            (s, d) => panic!("neighbour {k}: silent from {s:?}, down at {d:?}"),
        }
    }
    let info = r.neighbours(t0 + t);
    assert!(info.iter().any(|n| n.iface == 1 && n.addr == ll(99) && n.cost < INFINITY), "{info:?}");
    assert_eq!(info.iter().filter(|n| n.cost < INFINITY).count(), 5, "{info:?}");
}

/// A node's tunnels share one Hello timer: twenty interfaces added at
/// scattered moments soon send their Hellos at the same instants (one
/// wake-up per interval, not twenty), and none ever waits longer than its
/// interval between two Hellos (they may only come early).
#[test]
fn interfaces_of_one_interval_share_hello_wakeups() {
    shared_periodic_wakeups(true);
}

#[test]
fn interfaces_of_one_interval_share_full_update_wakeups() {
    shared_periodic_wakeups(false);
}

/// Twenty interfaces added 37 ms apart: after 10 s, every instant that
/// sends a Hello (`hello`) or a full update sends it on all of them, none
/// is ever later than its interval after the last, and the timers they
/// replaced do not wake the router. From 14 s, five are removed, the one
/// whose timer fired for the others first: the others go on.
fn shared_periodic_wakeups(hello: bool) {
    let t0 = Instant::now();
    let h = Duration::from_millis(500);
    let mut r = Router::new(RouterId([2, 0, 0, 0, 0, 0, 0, 1]), 0, t0);
    // Something to put in full updates.
    r.announce(t0, "2001:db8:1::/64".parse().unwrap(), None);
    let ms = Duration::from_millis;
    let mut last: HashMap<IfaceId, Instant> = HashMap::new();
    let mut instants: Vec<(Instant, usize, usize)> = Vec::new();
    let mut now = t0;
    let end = t0 + Duration::from_secs(20);
    let mut added = 0;
    let mut late_wakeups = 0;
    let mut removals = vec![2, 10, 1, 19, 0];
    let mut present = 0;
    while now < end {
        // An interface every 37 ms for the first 20 (0.74 s).
        let next_add = t0 + ms(37) * added;
        let next_removal = t0 + ms(14_000 + 350 * (5 - removals.len() as u64));
        let next = r.poll_timeout().expect("timers are due");
        if !removals.is_empty() && next_removal <= next {
            now = next_removal;
            r.remove_interface(now, removals.pop().expect("one"));
            present -= 1;
        } else if added < 20 && next_add <= next {
            now = next_add;
            let mut c = InterfaceConfig::new(LinkKind::Tunnel, ll(1));
            // The other kind rarely.
            (c.hello_interval, c.update_interval) = if hello { (h, ms(600_000)) } else { (ms(60_000), h) };
            r.add_interface(now, added, c);
            added += 1;
            present += 1;
        } else {
            now = next;
            r.handle_timeout(now);
            if now >= t0 + Duration::from_secs(10) {
                late_wakeups += 1;
            }
        }
        let mut sent = 0;
        while let Some(t) = r.poll_transmit() {
            let msgs = wire::decode(&t.payload).expect("our own packet").messages;
            let ours = |m: &Message| match m {
                Message::Hello { .. } => hello,
                Message::Update { metric: 0, .. } => !hello,
                _ => false,
            };
            if msgs.iter().any(ours) {
                sent += 1;
                if let Some(prev) = last.insert(t.iface, now) {
                    assert!(now - prev <= h, "iface {}: {:?} between sends", t.iface, now - prev);
                }
            }
        }
        if sent > 0 {
            instants.push((now, sent, present));
        }
    }
    // In the last 10 s, every instant sends on all of them.
    let late: Vec<_> = instants.iter().filter(|(t, ..)| *t >= t0 + Duration::from_secs(10)).collect();
    assert!(late.len() >= 20, "{} instants in 10 s", late.len());
    assert!(late.iter().all(|(_, n, present)| n == present), "{late:?}");
    assert_eq!(late.last().map(|l| l.2), Some(15));
    // Nor do the timers they replaced wake the router (the route sweeps
    // do, every 2 s).
    assert!(late_wakeups <= late.len() + 6, "{late_wakeups} wake-ups for {} instants", late.len());
}

/// A full update is encoded once per MTU and copied to the next
/// interface: every queue gives the bytes a fresh encoding of its messages
/// gives, with the full update alone or between other messages, on
/// interfaces of two MTUs, and again from the copy in a later flush; the
/// interfaces where it is alone share one copy of its datagrams.
#[test]
fn shared_full_updates_encode_as_fresh_ones_do() {
    let t0 = Instant::now();
    let mut r = router(t0);
    for (iface, mtu) in [(1, 1400), (2, 1400), (3, 1400), (5, 300)] {
        let mut c = InterfaceConfig::new(LinkKind::Wired, ll(1));
        c.mtu = mtu;
        r.add_interface(t0, iface, c);
    }
    let mut p = Peer { addr: ll(2), seqno: 0 };
    for _ in 0..3 {
        p.hello(&mut r, t0);
    }
    let updates: Vec<Message> = (0..150).map(|i| update(&format!("fd00:{i:x}::/64"), 1, 100, 1600)).collect();
    for chunk in updates.chunks(40) {
        r.handle_packet(t0, 0, ll(2), &packet(chunk));
    }
    while r.poll_transmit().is_some() {}
    let other = |n: u32| Message::AckReq { opaque: n as u16, interval: 100 };
    let fresh = |r: &Router| -> Vec<Transmit> {
        let mut queues: std::collections::BTreeMap<(IfaceId, Destination), Vec<&Queued>> = Default::default();
        for (k, _, q) in &r.out {
            queues.entry(*k).or_default().push(q);
        }
        let mut all = Vec::new();
        for ((iface, dst), queued) in queues {
            let mut b = PacketBuilder::new(r.ifaces[&iface].cfg.mtu);
            for q in queued {
                match q {
                    Queued::Msg(m) => b.push(m),
                    Queued::Shared(msgs) => msgs.iter().for_each(|m| b.push(m)),
                }
            }
            all.extend(b.finish().into_iter().map(|payload| Transmit {
                iface,
                dst,
                payload: payload.into(),
            }));
        }
        all
    };
    for round in 0..2 {
        let t = t0 + Duration::from_secs(1 + round);
        r.flush_at = None;
        let multi = Destination::Multicast;
        r.send_full_update(t, 1, multi);
        r.queue(2, multi, other(1));
        r.send_full_update(t, 2, multi);
        r.queue(2, multi, other(2));
        r.send_full_update(t, 5, multi);
        r.send_full_update(t, 3, multi);
        r.send_full_update(t, 0, Destination::Unicast(ll(2)));
        r.queue(0, Destination::Unicast(ll(2)), other(3));
        let want = fresh(&r);
        r.flush(t);
        let got: Vec<Transmit> = std::iter::from_fn(|| r.poll_transmit()).collect();
        assert_eq!(got, want, "round {round}");
        let packets_on = |i: IfaceId| got.iter().filter(|x| x.iface == i).count();
        assert!(packets_on(1) >= 2 && packets_on(5) > packets_on(1), "spans packets: {}", got.len());
        assert!(r.encoded.is_some());
        // Where the full update is all there is, the datagrams are one
        // copy shared by those interfaces.
        let on = |i: IfaceId| got.iter().filter(|x| x.iface == i).map(|x| &x.payload).collect::<Vec<_>>();
        assert_eq!(on(1).len(), on(3).len());
        for (a, b) in on(1).into_iter().zip(on(3)) {
            assert!(
                matches!((a, b), (Payload::Shared(a), Payload::Shared(b)) if Arc::ptr_eq(a, b)),
                "round {round}"
            );
        }
        assert!(on(2).iter().all(|p| matches!(p, Payload::Own(_))));
    }
}

proptest::proptest! {
    /// The interval and expiry arithmetic in u64 gives what the plain
    /// 128-bit formulas gave.
    #[test]
    fn time_arithmetic_in_u64_matches_the_128_bit_formulas(
        secs in proptest::prop_oneof![0u64..1000, 0u64..(1 << 40)],
        nanos in 0u32..1_000_000_000,
    ) {
        let d = Duration::new(secs, nanos);
        let c = (d.as_millis() / 10).min(u128::from(u16::MAX)) as u16;
        proptest::prop_assert_eq!(centis(d), c);
        let epoch = Instant::now();
        if let Some(t) = epoch.checked_add(d) {
            let ticks = u32::try_from(d.as_nanos().div_ceil(250_000_000)).unwrap_or(u32::MAX);
            proptest::prop_assert_eq!(tables::Ticks::ceil(epoch, t), tables::Ticks(ticks));
        }
    }
}

/// A small deterministic generator for the equivalence test (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One route a simulated neighbour announces (`None`: retracted).
#[derive(Clone, Copy)]
struct Announced {
    router_id: RouterId,
    seqno: u16,
    metric: u16,
}

/// A neighbour of the equivalence test: its address, interface, table
/// (prefix index -> route) and the interval its updates announce.
struct Talker {
    iface: IfaceId,
    addr: Ipv6Addr,
    hello_seqno: u16,
    table: Vec<(usize, Option<Announced>)>,
    interval: u16,
    /// The last route changed, as it was before.
    undo: Option<(usize, Option<Announced>)>,
}

const OWN_ID: RouterId = RouterId([2, 0, 0, 0, 0, 0, 0, 1]);

fn talker_update(i: usize, a: Option<Announced>, interval: u16) -> Message {
    let (router_id, seqno, metric) = match a {
        Some(a) => (a.router_id, a.seqno, a.metric),
        None => (RouterId([3, 0, 0, 0, 0, 0, 0, i as u8]), 0, INFINITY),
    };
    Message::Update {
        prefix: Some(format!("fd00:{i:x}::/64").parse().unwrap()),
        // Every seventh destination is source-specific.
        src: (i % 7 == 3).then(|| "fd99::/48".parse().unwrap()),
        router_id,
        next_hop: None,
        seqno,
        metric,
        interval,
    }
}

impl Talker {
    /// Its full update: the announced routes, in table order.
    fn full(&self) -> Vec<Vec<u8>> {
        let msgs: Vec<Message> = self
            .table
            .iter()
            .filter(|(_, a)| a.is_some())
            .map(|&(i, a)| talker_update(i, a, self.interval))
            .collect();
        if msgs.is_empty() { Vec::new() } else { wire::encode(&msgs, 1000) }
    }

    fn hello(&mut self, rxcost: u16) -> Vec<u8> {
        self.hello_ihu(rxcost, None)
    }

    /// A Hello and an IHU with RFC 9616 timestamps that make the router
    /// measure an RTT of `rtt_us` (`clock_us`: the router's clock, in
    /// microseconds since its epoch).
    fn hello_rtt(&mut self, rxcost: u16, clock_us: u32, rtt_us: u32) -> Vec<u8> {
        // Our Hello was stamped `rtt_us` ago and answered at once.
        let origin = clock_us.saturating_sub(rtt_us).max(1);
        self.hello_ihu(rxcost, Some((origin, 5000)))
    }

    /// A Hello (timestamped 5000 when the IHU carries timestamps) and an IHU.
    fn hello_ihu(&mut self, rxcost: u16, timestamps: Option<(u32, u32)>) -> Vec<u8> {
        self.hello_seqno = self.hello_seqno.wrapping_add(1);
        let timestamp = timestamps.map(|_| 5000);
        let hello = Message::Hello { unicast: false, seqno: self.hello_seqno, interval: 200, timestamp };
        let ihu = Message::Ihu { rxcost, interval: 600, addr: None, timestamps };
        packet(&[hello, ihu])
    }
}

/// Everything a router shows outside, but the repeated-update count.
fn observable(r: &mut Router, now: Instant) -> String {
    let transmits: Vec<Transmit> = std::iter::from_fn(|| r.poll_transmit()).collect();
    let events: Vec<Event> = std::iter::from_fn(|| r.poll_event()).collect();
    let mut stats = r.stats();
    stats.updates_repeated = 0;
    format!(
        "routes {:?}\nneighbours {:?}\ntransmits {transmits:?}\nevents {events:?}\nstats {stats:?}\ntimeout {:?}",
        r.routes(),
        r.neighbours(now),
        r.poll_timeout()
    )
}

/// Refreshing repeated datagrams and chunks by their groups changes
/// nothing a router shows: two routers, one with the shortcut and one
/// without, hear the same random sequences of full updates (repeated byte
/// for byte, or with routes changed, announced by a triggered update or
/// only by the next full update, retracted, reordered, re-timed, our own
/// routes echoed), Hellos with changing link costs, losses and silences
/// long enough to expire routes and neighbours, and must give the same
/// routes, neighbours, packets, events, statistics and timers after every
/// step. The shortcut must also have been taken.
#[test]
fn repeated_updates_refreshed_by_groups_change_nothing() {
    let (mut repeated, mut handled) = (0, 0);
    for seed in 0..12u64 {
        let mut rng = Rng(seed);
        let t0 = Instant::now();
        let mut t = t0;
        // Tunnels: their link cost has an RTT penalty, which also goes
        // when its sample gets old, with no packet heard.
        let tunnels = |t0| {
            let mut r = Router::new(OWN_ID, 0, t0);
            for iface in [0, 1] {
                r.add_interface(t0, iface, InterfaceConfig::new(LinkKind::Tunnel, ll(1)));
            }
            while r.poll_transmit().is_some() {}
            r
        };
        let (mut fast, mut slow) = (tunnels(t0), tunnels(t0));
        slow.repeat_shortcut = false;
        let clock = |t: Instant| (t - t0).as_micros() as u32;
        let mut talkers: Vec<Talker> = (0..3)
            .map(|p| Talker {
                iface: if p == 2 { 1 } else { 0 },
                addr: ll(2 + p as u16),
                hello_seqno: 0,
                // Destinations 0..60, each heard from one or two neighbours,
                // all from the same originator whichever way.
                table: (p * 12..p * 12 + 36)
                    .map(|i| {
                        let router_id =
                            if i == 5 { OWN_ID } else { RouterId([3, 0, 0, 0, 0, 0, 0, i as u8]) };
                        (i, Some(Announced { router_id, seqno: 1, metric: 96 + 32 * (p as u16) }))
                    })
                    .collect(),
                interval: 400,
                undo: None,
            })
            .collect();
        let deliver = |fast: &mut Router, slow: &mut Router, t, iface, addr, bytes: &[u8], step: &str| {
            fast.handle_packet(t, iface, addr, bytes);
            slow.handle_packet(t, iface, addr, bytes);
            let (a, b) = (observable(fast, t), observable(slow, t));
            assert_eq!(a, b, "seed {seed}, {step}");
        };
        for p in &mut talkers {
            for _ in 0..3 {
                let h = p.hello(96);
                deliver(&mut fast, &mut slow, t, p.iface, p.addr, &h, "first hellos");
            }
        }
        for step in 0..300 {
            let p = rng.below(3) as usize;
            let what = rng.below(100);
            let talker = &mut talkers[p];
            let label = format!("step {step}, talker {p}, op {what}");
            match what {
                // The full update, every datagram or all but one.
                0..=54 => {
                    let lose = (rng.below(8) == 0).then(|| rng.below(4) as usize);
                    for (k, d) in talker.full().iter().enumerate() {
                        if lose != Some(k) {
                            deliver(&mut fast, &mut slow, t, talker.iface, talker.addr, d, &label);
                        }
                    }
                }
                // A route changes, and a triggered update says so.
                55..=69 => {
                    // Often back to what it was before the last change (the
                    // same chunks come again, their entries changed since).
                    let (k, back) = match talker.undo.take() {
                        Some((k, before)) if rng.below(2) == 0 => (k, Some(before)),
                        _ => (rng.below(talker.table.len() as u64) as usize, None),
                    };
                    let (i, a) = talker.table[k];
                    talker.undo = Some((k, a));
                    let new = back.unwrap_or_else(|| match (a, rng.below(5)) {
                        (None, _) => Some(Announced {
                            router_id: RouterId([3, 0, 0, 0, 0, 0, 0, i as u8]),
                            seqno: rng.below(4) as u16,
                            metric: 96,
                        }),
                        (Some(_), 0) => None,
                        (Some(a), 1) => Some(Announced { seqno: a.seqno.wrapping_add(1), ..a }),
                        (Some(a), 2) => {
                            Some(Announced { router_id: RouterId([4, 0, 0, 0, 0, 0, 0, i as u8]), ..a })
                        }
                        (Some(a), _) => Some(Announced { metric: 32 + rng.below(600) as u16, ..a }),
                    });
                    talker.table[k].1 = new;
                    // Or silently: the next full update carries the change
                    // (a new seqno mostly does), in a chunk whose other
                    // updates repeat.
                    if rng.below(3) != 0 {
                        let u = packet(&[talker_update(i, new, talker.interval)]);
                        deliver(&mut fast, &mut slow, t, talker.iface, talker.addr, &u, &label);
                    }
                }
                // The table in another order.
                70..=74 => {
                    let n = talker.table.len();
                    for k in 0..n {
                        let j = k + rng.below((n - k) as u64) as usize;
                        talker.table.swap(k, j);
                    }
                }
                // A tunnel drained (or back), its cost raised both ways.
                75 => {
                    let cost = [4096, 96][rng.below(2) as usize];
                    let iface = talker.iface;
                    fast.drain_interface(t, iface, cost);
                    slow.drain_interface(t, iface, cost);
                    let (a, b) = (observable(&mut fast, t), observable(&mut slow, t));
                    assert_eq!(a, b, "seed {seed}, {label}");
                }
                // Another interval.
                76..=77 => talker.interval = [200, 400, 1000][rng.below(3) as usize],
                // A Hello, the link cost with it (another rxcost, an RTT).
                78..=89 => {
                    let rxcost = if rng.below(3) == 0 { 96 + rng.below(300) as u16 } else { 96 };
                    let h = match rng.below(3) {
                        0 => talker.hello_rtt(rxcost, clock(t), rng.below(150_000) as u32),
                        _ => talker.hello(rxcost),
                    };
                    deliver(&mut fast, &mut slow, t, talker.iface, talker.addr, &h, &label);
                }
                // Time passes, timers run; the neighbours say Hello (or not).
                _ => {
                    let ms = [300, 2000, 9000, 40000][rng.below(4) as usize];
                    let end = t + Duration::from_millis(ms);
                    let quiet = rng.below(4) == 0;
                    while t < end {
                        t = (t + Duration::from_millis(250)).min(end);
                        fast.handle_timeout(t);
                        slow.handle_timeout(t);
                        let (a, b) = (observable(&mut fast, t), observable(&mut slow, t));
                        assert_eq!(a, b, "seed {seed}, {label}, waiting");
                        if !quiet && (t - t0).as_millis() % 2000 < 250 {
                            for p in &mut talkers {
                                // The full update may come before the Hello
                                // (an RTT sample may have got old since the last).
                                let mut said = vec![p.hello(96)];
                                match rng.below(4) {
                                    0 | 1 => said.extend(p.full()),
                                    2 => said.splice(0..0, p.full()).for_each(drop),
                                    _ => {}
                                }
                                for d in said {
                                    deliver(&mut fast, &mut slow, t, p.iface, p.addr, &d, &label);
                                }
                            }
                        }
                    }
                }
            }
        }
        repeated += fast.stats().updates_repeated;
        handled += fast.stats().updates_in;
    }
    // The shortcut was taken (else this test shows nothing), not always.
    assert!(repeated * 5 > handled && repeated < handled, "{repeated} of {handled} updates repeated");
}

/// A route changed by a triggered update and restored by the next leaves
/// the group its full update's chunk formed: when that chunk comes again
/// (the same bytes as before the change), its entry is refreshed as well,
/// and does not expire while the neighbour keeps announcing it.
#[test]
fn a_changed_then_restored_route_is_refreshed_by_its_chunk() {
    let t0 = Instant::now();
    let (mut fast, mut slow) = (router(t0), router(t0));
    slow.repeat_shortcut = false;
    let mut talker = Talker {
        iface: 0,
        addr: ll(2),
        hello_seqno: 0,
        table: (0..36)
            .map(|i| {
                (
                    i,
                    Some(Announced {
                        router_id: RouterId([3, 0, 0, 0, 0, 0, 0, i as u8]),
                        seqno: 1,
                        metric: 96,
                    }),
                )
            })
            .collect(),
        interval: 400,
        undo: None,
    };
    let mut t = t0;
    let mut send = |t: Instant, bytes: &[u8]| {
        for r in [&mut fast, &mut slow] {
            r.handle_timeout(t);
            r.handle_packet(t, 0, ll(2), bytes);
        }
        let (a, b) = (observable(&mut fast, t), observable(&mut slow, t));
        assert_eq!(a, b, "at {:?}", t - t0);
    };
    for _ in 0..3 {
        send(t, &talker.hello(96));
    }
    let (i, before) = talker.table[9];
    let changed = Some(Announced { metric: 300, ..before.unwrap() });
    for round in 0..40 {
        send(t, &talker.hello(96));
        for d in talker.full() {
            send(t, &d);
        }
        if round == 4 {
            send(t, &packet(&[talker_update(i, changed, talker.interval)]));
            send(t, &packet(&[talker_update(i, before, talker.interval)]));
        }
        t += Duration::from_secs(1);
    }
    let s = fast.stats();
    assert!(s.updates_repeated > s.updates_in / 2, "{s:?}");
    assert!(fast.selected(&(format!("fd00:{i:x}::/64").parse().unwrap(), None)).is_some());
    // Groups left behind are reused: one per chunk of 8 of the first
    // datagram (the second is too short to repeat by groups).
    assert!(fast.repeats.in_use() <= 5, "{} groups", fast.repeats.in_use());
}

/// An interface's neighbour list keeps every neighbour through pushes and
/// removals, whichever is in the first place.
#[test]
fn iface_neighbours_survive_pushes_and_removals() {
    let mut n = IfaceNbrs::default();
    assert_eq!(n.len(), 0);
    for id in 1..=4 {
        n.push(id, ll(id as u16));
    }
    assert_eq!(n.iter().map(|(id, _)| id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    n.remove(1);
    n.remove(3);
    assert_eq!(n.iter().collect::<Vec<_>>(), [(2, ll(2)), (4, ll(4))]);
    n.remove(7);
    assert_eq!(n.len(), 2);
    n.remove(2);
    n.remove(4);
    assert_eq!((n.len(), n.iter().count()), (0, 0));
    n.push(9, ll(9));
    assert_eq!(n.iter().collect::<Vec<_>>(), [(9, ll(9))]);
}

/// A burst of datagrams (a full update on many tunnels) does not keep its
/// queue's room once sent.
#[test]
fn an_emptied_transmit_queue_gives_its_room_back() {
    let mut r = router(Instant::now());
    for k in 0..2000 {
        r.transmits.push_back(Transmit {
            iface: 0,
            dst: Destination::Multicast,
            payload: vec![k as u8].into(),
        });
    }
    assert!(r.transmits.capacity() >= 2000);
    let mut sent = 0;
    while r.poll_transmit().is_some() {
        sent += 1;
    }
    assert_eq!(sent, 2000);
    assert!(r.transmits.capacity() <= 256, "{}", r.transmits.capacity());
}

/// A link hint names the neighbour heard on the interface (none before
/// one is, nor for an unknown interface); prefetching with any hint,
/// stale or out of range, changes nothing.
#[test]
fn link_hints_name_the_interfaces_neighbour() {
    let now = Instant::now();
    let fresh = router(now);
    assert_eq!(fresh.link_hint(0), u32::MAX, "nobody heard yet");
    let r = three_neighbours(now);
    let hints: Vec<u32> = (0..3).map(|i| r.link_hint(i)).collect();
    let mut ids: Vec<u32> = r.neighbours.iter().map(|(id, _)| id).collect();
    ids.sort_unstable();
    let mut sorted = hints.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ids, "one neighbour per interface: {hints:?}");
    for (i, h) in hints.iter().enumerate() {
        assert_eq!(r.neighbours.get(h).map(|n| n.iface), Some(i as IfaceId));
    }
    assert_eq!(r.link_hint(9), u32::MAX, "unknown interface");
    let before = (r.neighbours(now), r.routes());
    for (iface, hint) in [(0, hints[0]), (1, hints[0]), (9, 7), (70_000, u32::MAX), (2, 1 << 30)] {
        r.prefetch_link(iface, hint);
    }
    assert_eq!((r.neighbours(now), r.routes()), before);
}
