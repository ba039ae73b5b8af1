use super::tlv::{RawPacket, RawSubTlv, RawTlv, parse_raw};
use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn packet(body: &str) -> Vec<u8> {
    let body = hex(body);
    let mut p = vec![42, 2];
    p.extend((body.len() as u16).to_be_bytes());
    p.extend(body);
    p
}

fn v6(s: &str) -> IpNet {
    s.parse().unwrap()
}

const RID: RouterId = RouterId([2, 0, 0, 0, 0, 0, 0, 0x0a]);

/// Built by hand from RFC 8966 §4: Hello with timestamp, IHU (AE 3) with
/// timestamps, Router-Id, two Updates where the second is compressed
/// against the first, an Update that sets the router-id from its prefix.
const SAMPLE: &str = "
    04 0c 0000 1234 0190  03 04 deadbeef
    05 18 03 00 0060 04b0 021122fffe334455  03 08 01020304 05060708
    06 0a 0000 020000000000000a
    08 12 02 80 40 00 0640 0005 0060 20010db8000b0001
    08 0c 02 00 40 06 0640 0005 00c0 0002
    08 1a 02 40 80 00 0640 0007 0000 20010db8000b0003 1122334455667788
";

#[test]
fn decodes_hand_built_packet_with_compression_and_router_id_flag() {
    let d = decode(&packet(SAMPLE)).unwrap();
    assert_eq!(d.errors, 0);
    assert_eq!(
        d.messages,
        vec![
            Message::Hello { unicast: false, seqno: 0x1234, interval: 400, timestamp: Some(0xdeadbeef) },
            Message::Ihu {
                rxcost: 96,
                interval: 1200,
                addr: Some("fe80::211:22ff:fe33:4455".parse().unwrap()),
                timestamps: Some((0x01020304, 0x05060708)),
            },
            Message::Update {
                prefix: Some(v6("2001:db8:b:1::/64")),
                src: None,
                router_id: RID,
                next_hop: None,
                seqno: 5,
                metric: 96,
                interval: 1600,
            },
            Message::Update {
                prefix: Some(v6("2001:db8:b:2::/64")),
                src: None,
                router_id: RID,
                next_hop: None,
                seqno: 5,
                metric: 192,
                interval: 1600,
            },
            Message::Update {
                prefix: Some(v6("2001:db8:b:3:1122:3344:5566:7788/128")),
                src: None,
                router_id: RouterId([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]),
                next_hop: None,
                seqno: 7,
                metric: 0,
                interval: 1600,
            },
        ]
    );
}

#[test]
fn raw_layer_round_trips_byte_for_byte() {
    let bytes = packet(SAMPLE);
    let raw = parse_raw(&bytes).unwrap();
    assert_eq!(raw.emit().unwrap(), bytes);
}

#[test]
fn next_hop_and_source_prefix_apply() {
    let bytes = packet(
        "06 0a 0000 020000000000000a
         07 0a 03 00 0000000000000099
         08 11 02 00 00 00 0190 0001 0060  80 05 20 20010db8",
    );
    let d = decode(&bytes).unwrap();
    assert_eq!(d.errors, 0);
    assert_eq!(
        d.messages,
        vec![Message::Update {
            prefix: Some(v6("::/0")),
            src: Some(v6("2001:db8::/32")),
            router_id: RID,
            next_hop: Some("fe80::99".parse().unwrap()),
            seqno: 1,
            metric: 96,
            interval: 400,
        }]
    );
}

#[test]
fn unknown_mandatory_sub_tlv_drops_the_tlv_but_not_the_packet() {
    // Hello with mandatory sub-TLV 200, then a Hello with non-mandatory 99.
    let bytes = packet("04 09 0000 0001 0190 c8 01 00   04 09 0000 0002 0190 63 01 00");
    let d = decode(&bytes).unwrap();
    assert_eq!(d.errors, 1);
    assert_eq!(d.messages, vec![Message::Hello { unicast: false, seqno: 2, interval: 400, timestamp: None }]);
}

#[test]
fn unknown_tlvs_and_ae4_are_skipped_and_counted() {
    let bytes = packet(
        "06 0a 0000 020000000000000a
         11 03 010203
         08 0e 04 00 20 00 0190 0001 0060 c0000201
         04 06 0000 0003 0190",
    );
    let d = decode(&bytes).unwrap();
    assert_eq!(d.unknown, 1);
    assert_eq!(d.errors, 1);
    assert_eq!(d.messages.len(), 1);
}

#[test]
fn update_without_router_id_is_an_error() {
    let bytes = packet("08 0e 02 00 40 00 0190 0001 0060 20010db8");
    // plen 64 needs 8 bytes but only 4 are there: too short
    assert_eq!(decode(&bytes).unwrap().errors, 1);
    let bytes = packet("08 12 02 00 40 00 0190 0001 0060 20010db800000001");
    let d = decode(&bytes).unwrap();
    assert_eq!((d.errors, d.messages.len()), (1, 0));
}

#[test]
fn truncated_tlv_keeps_what_came_before() {
    let mut bytes = packet("04 06 0000 0001 0190  04 06 0000 00");
    // Body length covers everything present; the second Hello claims more.
    let d = decode(&bytes).unwrap();
    assert_eq!(d.messages.len(), 1);
    assert_eq!(d.errors, 1);
    bytes[3] += 10; // body length now lies
    assert!(matches!(decode(&bytes), Err(WireError::BodyLength { .. })));
}

#[test]
fn bad_headers_are_errors() {
    assert_eq!(decode(&[]), Err(WireError::Truncated));
    assert_eq!(decode(&[43, 2, 0, 0]), Err(WireError::BadMagic(43)));
    assert_eq!(decode(&[42, 1, 0, 0]), Err(WireError::BadVersion(1)));
    // The trailer (bytes after the body) is ignored.
    assert_eq!(decode(&[42, 2, 0, 0, 1, 2, 3]).unwrap(), Decoded::default());
}

#[test]
fn wildcard_requests_and_retractions() {
    let bytes = packet("09 02 00 00  08 0a 00 00 00 00 0190 0000 ffff");
    let d = decode(&bytes).unwrap();
    assert_eq!(d.errors, 0);
    assert_eq!(d.messages[0], Message::RouteReq(RequestTarget::All));
    assert!(matches!(d.messages[1], Message::Update { prefix: None, metric: INFINITY, .. }));
    // An AE 0 update with a finite metric is invalid.
    assert_eq!(decode(&packet("08 0a 00 00 00 00 0190 0000 0060")).unwrap().errors, 1);
}

#[test]
fn builder_inserts_router_id_once_and_splits_at_mtu() {
    let updates: Vec<Message> = (0..100u16)
        .map(|i| Message::Update {
            prefix: Some(IpNet::V6(
                Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 0), 64).unwrap(),
            )),
            src: None,
            router_id: RID,
            next_hop: None,
            seqno: i,
            metric: 96,
            interval: 1600,
        })
        .collect();
    let packets = encode(&updates, 512);
    assert!(packets.len() > 1);
    let mut back = Vec::new();
    for p in &packets {
        assert!(p.len() <= 512, "packet of {} bytes", p.len());
        let raw = parse_raw(p).unwrap();
        let ids = raw.tlvs.iter().filter(|t| matches!(t, RawTlv::RouterId { .. })).count();
        assert_eq!(ids, 1, "one Router-Id per packet");
        back.extend(decode(p).unwrap().messages);
    }
    assert_eq!(back, updates);
}

#[test]
fn builder_never_puts_two_sub_tlvs_in_a_tlv() {
    let msgs = vec![
        Message::Hello { unicast: false, seqno: 1, interval: 400, timestamp: Some(5) },
        Message::Update {
            prefix: Some(v6("::/0")),
            src: Some(v6("2001:db8::/32")),
            router_id: RID,
            next_hop: None,
            seqno: 1,
            metric: 96,
            interval: 1600,
        },
    ];
    for p in encode(&msgs, 1400) {
        for t in parse_raw(&p).unwrap().tlvs {
            let subs = match t {
                RawTlv::Hello { subs, .. } | RawTlv::Update { subs, .. } => subs,
                _ => vec![],
            };
            assert!(subs.len() <= 1);
        }
    }
}

// ---------- property tests ----------

fn arb_router_id() -> impl Strategy<Value = RouterId> {
    any::<[u8; 8]>().prop_map(RouterId).prop_filter("valid", RouterId::is_valid)
}

fn arb_v6net(min: u8) -> impl Strategy<Value = IpNet> {
    (any::<u128>(), min..=128u8)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()))
}

fn arb_v4net() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0..=32u8).prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc()))
}

fn arb_ll() -> impl Strategy<Value = IpAddr> {
    any::<u64>().prop_map(|id| {
        let mut o = [0u8; 16];
        o[0] = 0xfe;
        o[1] = 0x80;
        o[8..].copy_from_slice(&id.to_be_bytes());
        IpAddr::V6(Ipv6Addr::from(o))
    })
}

fn arb_message() -> impl Strategy<Value = Message> {
    let prefix = prop_oneof![arb_v6net(0), arb_v4net()];
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(opaque, interval)| Message::AckReq { opaque, interval }),
        any::<u16>().prop_map(|opaque| Message::Ack { opaque }),
        (any::<bool>(), any::<u16>(), any::<u16>(), any::<Option<u32>>()).prop_map(
            |(unicast, seqno, interval, timestamp)| Message::Hello { unicast, seqno, interval, timestamp }
        ),
        (any::<u16>(), any::<u16>(), proptest::option::of(arb_ll()), any::<Option<(u32, u32)>>()).prop_map(
            |(rxcost, interval, addr, timestamps)| Message::Ihu { rxcost, interval, addr, timestamps }
        ),
        (
            arb_v6net(0),
            proptest::option::of(arb_v6net(1)),
            arb_router_id(),
            proptest::option::of(arb_ll()),
            any::<u16>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(prefix, src, router_id, next_hop, seqno, metric, interval)| {
                Message::Update { prefix: Some(prefix), src, router_id, next_hop, seqno, metric, interval }
            }),
        (any::<u16>(), any::<u16>()).prop_map(|(seqno, interval)| Message::Update {
            prefix: None,
            src: None,
            router_id: RouterId::default(),
            next_hop: None,
            seqno,
            metric: INFINITY,
            interval,
        }),
        Just(Message::RouteReq(RequestTarget::All)),
        (prefix.clone(), proptest::option::of(arb_v6net(1))).prop_map(|(prefix, src)| Message::RouteReq(
            RequestTarget::Prefix { src: src.filter(|_| prefix.addr().is_ipv6()), prefix }
        )),
        (prefix, any::<u16>(), any::<u8>(), arb_router_id()).prop_map(
            |(prefix, seqno, hop_count, router_id)| {
                Message::SeqnoReq { prefix, src: None, seqno, hop_count, router_id }
            }
        ),
    ]
}

fn arb_sub() -> impl Strategy<Value = RawSubTlv> + Clone {
    prop_oneof![
        Just(RawSubTlv::Pad1),
        (0..8u8).prop_map(RawSubTlv::PadN),
        (2..=255u8, proptest::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(ty, body)| RawSubTlv::Other { ty, body }),
    ]
}

fn arb_raw_tlv() -> impl Strategy<Value = RawTlv> {
    let subs = proptest::collection::vec(arb_sub(), 0..3);
    prop_oneof![
        Just(RawTlv::Pad1),
        (0..16u8).prop_map(RawTlv::PadN),
        (any::<u16>(), any::<u16>(), any::<u16>(), subs.clone())
            .prop_map(|(flags, seqno, interval, subs)| RawTlv::Hello { flags, seqno, interval, subs }),
        (0..=3u8, any::<u16>(), any::<u16>(), any::<[u8; 16]>(), subs.clone()).prop_map(
            |(ae, rxcost, interval, a, subs)| {
                let addr = a[..tlv::ae_addr_len(ae).unwrap()].to_vec();
                RawTlv::Ihu { ae, reserved: 0, rxcost, interval, addr, subs }
            }
        ),
        (0..=128u8, any::<u8>(), any::<u16>(), any::<[u8; 16]>(), subs.clone()).prop_map(
            |(plen, omitted, metric, p, subs)| {
                let n = tlv::prefix_bytes(plen);
                let omitted = if n == 0 { 0 } else { omitted % n as u8 };
                RawTlv::Update {
                    ae: 2,
                    flags: 0,
                    plen,
                    omitted,
                    interval: 400,
                    seqno: 1,
                    metric,
                    prefix: p[..n - omitted as usize].to_vec(),
                    subs,
                }
            }
        ),
        (11..=255u8, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(ty, body)| RawTlv::Unknown { ty, body }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn messages_round_trip_through_packets(msgs in proptest::collection::vec(arb_message(), 0..40), mtu in 128usize..1500) {
        let packets = encode(&msgs, mtu);
        let mut back = Vec::new();
        for p in &packets {
            prop_assert!(p.len() <= mtu);
            let d = decode(p).unwrap();
            prop_assert_eq!(d.errors, 0);
            back.extend(d.messages);
        }
        prop_assert_eq!(back, msgs);
    }

    #[test]
    fn raw_packets_round_trip(tlvs in proptest::collection::vec(arb_raw_tlv(), 0..20), trailer in proptest::collection::vec(any::<u8>(), 0..8)) {
        let p = RawPacket { tlvs, trailer };
        let bytes = p.emit().unwrap();
        prop_assert_eq!(parse_raw(&bytes).unwrap(), p);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes);
        let _ = parse_raw(&bytes);
    }

    #[test]
    fn mutated_packets_never_panic(idx in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut bytes = packet(SAMPLE);
        let i = idx.index(bytes.len());
        bytes[i] = val;
        // keep the header plausible so the TLV parser is exercised
        bytes[0] = 42;
        bytes[1] = 2;
        let _ = decode(&bytes);
        let n = cut.index(bytes.len());
        let _ = decode(&bytes[..n]);
    }

    /// A reused buffer decodes each packet as a fresh one would: nothing
    /// of the previous packet (messages, counts) is left.
    #[test]
    fn decoding_into_a_reused_buffer_is_decoding_afresh(
        first in proptest::collection::vec(any::<u8>(), 0..300),
        idx in any::<prop::sample::Index>(),
        val in any::<u8>(),
    ) {
        let mut second = packet(SAMPLE);
        let i = idx.index(second.len());
        second[i] = val;
        let mut buf = Decoded::default();
        let _ = decode_into(&packet(SAMPLE), &mut buf);
        let _ = decode_into(&first, &mut buf);
        match decode(&second) {
            Ok(fresh) => {
                prop_assert!(decode_into(&second, &mut buf).is_ok());
                prop_assert_eq!(buf, fresh);
            }
            Err(_) => prop_assert!(decode_into(&second, &mut buf).is_err()),
        }
    }
}

proptest! {
    /// The builder's fast path for plain IPv6 updates writes the same bytes
    /// as the generic path, mixed with any other messages.
    #[test]
    fn plain_update_fast_path_matches_the_generic_encoder(
        msgs in proptest::collection::vec(arb_message(), 1..40),
        mtu in 128usize..1500,
    ) {
        let mut fast = PacketBuilder::new(mtu);
        let mut slow = PacketBuilder::new(mtu);
        // Few router-ids, so that runs of one cross packet boundaries.
        let msgs = msgs.into_iter().map(|mut m| {
            if let Message::Update { router_id, seqno, .. } = &mut m {
                *router_id = RouterId([(*seqno % 2) as u8; 8]);
            }
            m
        });
        for m in msgs {
            let m = &m;
            fast.push(m);
            slow.push_generic(m);
        }
        prop_assert_eq!(fast.finish(), slow.finish());
    }
}

proptest! {
    /// Hellos and IHUs, written straight into the packet, are the bytes the
    /// generic path writes, whatever the IHU's address (none, IPv4,
    /// link-local, global) and mixed with updates that need a Router-Id.
    #[test]
    fn hello_and_ihu_fast_paths_match_the_generic_encoder(
        msgs in proptest::collection::vec(
            prop_oneof![
                (any::<bool>(), any::<u16>(), any::<u16>(), any::<Option<u32>>()).prop_map(
                    |(unicast, seqno, interval, timestamp)| Message::Hello { unicast, seqno, interval, timestamp }
                ),
                (
                    any::<u16>(),
                    any::<u16>(),
                    proptest::option::of(prop_oneof![
                        arb_ll(),
                        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(b.into())),
                        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(b.into())),
                    ]),
                    any::<Option<(u32, u32)>>(),
                )
                    .prop_map(|(rxcost, interval, addr, timestamps)| Message::Ihu {
                        rxcost,
                        interval,
                        addr,
                        timestamps
                    }),
                arb_message(),
            ],
            1..60,
        ),
        mtu in 128usize..400,
    ) {
        let mut fast = PacketBuilder::new(mtu);
        let mut slow = PacketBuilder::new(mtu);
        for m in &msgs {
            fast.push(m);
            slow.push_generic(m);
        }
        prop_assert_eq!(fast.finish(), slow.finish());
    }
}

/// The decoder with and without its plain-update fast path, on `bytes`.
fn decoded_both_ways(bytes: &[u8]) -> (Result<Decoded, WireError>, Result<Decoded, WireError>) {
    let (mut fast, mut slow) = (Decoded::default(), Decoded::default());
    let f = decode_with(bytes, &mut fast, true).map(|()| fast);
    let s = decode_with(bytes, &mut slow, false).map(|()| slow);
    (f, s)
}

/// Raw TLVs weighted towards the Updates the fast path takes and the ones
/// it must leave alone: any AE and flags, compressed prefixes, sub-TLVs,
/// prefix lengths past 128, with Router-Ids (valid or not, with sub-TLVs
/// or not) and Next Hops between them.
fn arb_update_heavy_tlv() -> impl Strategy<Value = RawTlv> {
    let subs = proptest::collection::vec(arb_sub(), 0..2);
    let update = (
        prop_oneof![Just(2u8), 0..=4u8],
        prop_oneof![Just(0u8), any::<u8>()],
        prop_oneof![0..=128u8, Just(64u8), any::<u8>()],
        any::<u8>(),
        any::<[u8; 3]>(),
        any::<[u8; 32]>(),
        prop_oneof![3 => Just(Vec::new()), 1 => subs],
    )
        .prop_map(|(ae, flags, plen, omitted, [i, s, m], p, subs)| {
            let n = tlv::prefix_bytes(plen);
            let omitted = omitted % (n as u8 + 2);
            RawTlv::Update {
                ae,
                flags,
                plen,
                omitted,
                interval: u16::from(i) * 7,
                seqno: u16::from(s),
                metric: u16::from(m) * 257,
                prefix: p[..n.saturating_sub(omitted as usize)].to_vec(),
                subs,
            }
        });
    prop_oneof![
        6 => update,
        1 => (prop_oneof![4 => any::<[u8; 8]>(), 1 => Just([0; 8]), 1 => Just([0xff; 8])], any::<u16>(), prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(arb_sub(), 0..2)])
            .prop_map(|(router_id, reserved, subs)| RawTlv::RouterId { reserved, router_id, subs }),
        1 => (prop_oneof![Just(2u8), 1..=3u8], any::<[u8; 16]>()).prop_map(|(ae, a)| RawTlv::NextHop {
            ae,
            reserved: 0,
            addr: a[..tlv::ae_addr_len(ae).unwrap()].to_vec(),
            subs: Vec::new(),
        }),
        1 => arb_raw_tlv(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The fast paths for plain updates and Router-Ids decode exactly what
    /// the general parse decodes — the same messages, errors and unknown counts, in the
    /// same order — for packets of updates of every shape, the router's own
    /// output, and any single byte changed or packet cut short.
    #[test]
    fn plain_update_fast_path_matches_the_general_decoder(
        tlvs in proptest::collection::vec(arb_update_heavy_tlv(), 0..24),
        msgs in proptest::collection::vec(arb_message(), 0..24),
        idx in any::<prop::sample::Index>(),
        val in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let raw = RawPacket { tlvs, trailer: Vec::new() }.emit().unwrap();
        let mut packets = vec![raw];
        packets.extend(encode(&msgs, 1400));
        for p in packets {
            let mut mutated = p.clone();
            let i = idx.index(mutated.len());
            mutated[i] = val;
            let short = &p[..cut.index(p.len())];
            for bytes in [&p[..], &mutated[..], short] {
                let (fast, slow) = decoded_both_ways(bytes);
                prop_assert_eq!(fast, slow);
            }
        }
    }
}

/// Packets leave room for a driver's IPv6 and UDP headers (48 bytes) and
/// a Hello's stays small: it is in flight by the thousand in a simulation.
#[test]
fn packets_have_spare_room_and_small_ones_stay_small() {
    let hello = Message::Hello { unicast: false, seqno: 1, interval: 50, timestamp: Some(7) };
    let ihu = Message::Ihu {
        rxcost: 96,
        interval: 150,
        addr: Some("fe80::2".parse().unwrap()),
        timestamps: Some((1, 2)),
    };
    let small = encode(&[hello, ihu], 1232);
    assert_eq!(small.len(), 1);
    assert!(
        small[0].capacity() >= small[0].len() + 48 && small[0].capacity() <= 512,
        "{}",
        small[0].capacity()
    );
    let updates = numbered_updates(200, 3);
    let mut b = PacketBuilder::new(1232);
    updates.iter().for_each(|m| b.push(m));
    for packets in [b.clone().finish(), b.finish()] {
        assert!(packets.len() > 2);
        for p in &packets {
            assert!(p.len() <= 1232 && p.capacity() >= p.len() + 48, "{} of {}", p.len(), p.capacity());
        }
    }
}

/// A buffer given back is the next packet's, emptied first; too small or
/// too large ones are not kept.
#[test]
fn recycled_buffers_start_the_next_packets() {
    let hello = Message::Hello { unicast: false, seqno: 1, interval: 50, timestamp: Some(7) };
    let fresh = encode(std::slice::from_ref(&hello), 1232);
    // Leftover bytes in a buffer must not leak into the next packet.
    let mut used = vec![0xee; 700];
    used.reserve_exact(100);
    let ptr = used.as_ptr();
    recycle(used);
    let reused = encode(std::slice::from_ref(&hello), 1232);
    assert_eq!(reused[0].as_ptr(), ptr, "the buffer given back is reused");
    assert_eq!(reused, fresh);
    assert!(reused[0].capacity() >= reused[0].len() + 48);
    // Last given back, first taken.
    let (a, b) = (Vec::<u8>::with_capacity(400), Vec::<u8>::with_capacity(400));
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    recycle(a);
    recycle(b);
    assert_eq!(encode(std::slice::from_ref(&hello), 1232)[0].as_ptr(), pb);
    assert_eq!(encode(std::slice::from_ref(&hello), 1232)[0].as_ptr(), pa);
    let pooled = || POOL.with(|p| p.borrow().len());
    let before = pooled();
    for cap in [16, 100_000] {
        recycle(Vec::with_capacity(cap));
        assert_eq!(pooled(), before, "a buffer of {cap} bytes is not kept");
    }
    // Nor more than a few dozen.
    (0..2 * POOLED).for_each(|_| recycle(Vec::with_capacity(400)));
    assert_eq!(pooled(), POOLED);
}

#[test]
fn finish_each_gives_what_finish_gives() {
    let msgs = numbered_updates(120, 5);
    for n in [0, 1, 40, 120] {
        let mut b = PacketBuilder::new(600);
        msgs[..n].iter().for_each(|m| b.push(m));
        let mut each = Vec::new();
        b.clone().finish_each(|p| each.push(p));
        assert_eq!(each, b.finish(), "{n} messages");
    }
}

/// `n` updates for 2001:db8:i::/64, from `sources` router-ids in turn.
fn numbered_updates(n: u16, sources: u16) -> Vec<Message> {
    (0..n)
        .map(|i| Message::Update {
            prefix: Some(format!("2001:db8:{i:x}::/64").parse().unwrap()),
            src: None,
            router_id: RouterId([2, 0, 0, 0, 0, 0, 0, (i % sources) as u8]),
            next_hop: None,
            seqno: i,
            metric: 96,
            interval: 3000,
        })
        .collect()
}
