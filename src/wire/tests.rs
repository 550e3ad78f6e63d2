//! Wire tests, with hickory-proto as the oracle. The builders here are shared with the cache and
//! handler tests.

use super::*;
use hickory_proto::op::{Edns as HEdns, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use proptest::prelude::*;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A query for `name`/`qtype` with an optional EDNS payload and DO bit.
pub(crate) fn query(id: u16, name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some((size, dnssec)) = edns {
        let mut e = HEdns::new();
        e.set_max_payload(size);
        e.set_dnssec_ok(dnssec);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn reply_to(q: &[u8]) -> Message {
    let qm = Message::from_vec(q).unwrap();
    let mut m = Message::response(qm.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = qm.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(qm.queries[0].clone());
    m
}

/// A positive reply to `q` with one A record per TTL, plus an OPT as upstreams send.
pub(crate) fn a_reply(q: &[u8], ttls: &[u32]) -> Vec<u8> {
    let mut m = reply_to(q);
    let name = m.queries[0].name().clone();
    for (i, &ttl) in ttls.iter().enumerate() {
        m.add_answer(Record::from_rdata(
            name.clone(),
            ttl,
            RData::A(A(Ipv4Addr::new(10, 0, 0, i as u8 + 1))),
        ));
    }
    let mut e = HEdns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    m.to_vec().unwrap()
}

/// A negative reply (NXDOMAIN or NODATA) with an SOA of the given TTL and MINIMUM, or none.
pub(crate) fn negative_reply(q: &[u8], nxdomain: bool, soa: Option<(u32, u32)>) -> Vec<u8> {
    let mut m = reply_to(q);
    if nxdomain {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    if let Some((ttl, minimum)) = soa {
        let zone = Name::from_str("cluster.local.").unwrap();
        let rdata = SOA::new(
            Name::from_str("ns.dns.cluster.local.").unwrap(),
            Name::from_str("hostmaster.cluster.local.").unwrap(),
            1,
            7200,
            1800,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(zone, ttl, RData::SOA(rdata)));
    }
    m.to_vec().unwrap()
}

pub(crate) fn t0() -> Instant {
    Instant::now()
}

fn policy() -> TtlPolicy {
    TtlPolicy::default()
}

fn ttls_of(msg: &[u8]) -> Vec<u32> {
    let m = Message::from_vec(msg).unwrap();
    m.answers
        .iter()
        .chain(m.authorities.iter())
        .chain(m.additionals.iter())
        .map(|r| r.ttl)
        .collect()
}

#[test]
fn scan_reads_header_question_and_edns() {
    let q = query(
        0xBEEF,
        "Svc-1.Default.svc.cluster.local.",
        RecordType::AAAA,
        Some((4096, true)),
    );
    let v = scan_query(&q).unwrap();
    assert_eq!(v.id, 0xBEEF);
    assert_eq!(v.key.qtype, 28);
    assert_eq!(v.key.qclass, 1);
    assert_eq!(
        name_to_string(v.key.name()),
        "svc-1.default.svc.cluster.local."
    );
    assert_eq!(
        v.edns,
        Some(Edns {
            udp_payload: 4096,
            version: 0,
            dnssec_ok: true
        })
    );
    assert_eq!(v.key.bits, 1);
    assert!(v.recursion_desired());
    // The question keeps the client's spelling.
    assert!(v.question.windows(5).any(|w| w == b"Svc-1"));
}

#[test]
fn scan_rejects_what_is_not_a_query() {
    assert_eq!(scan_query(&[0; 5]).unwrap_err(), WireError::TooShort);
    let q = query(1, "a.b.", RecordType::A, None);
    let mut r = q.clone();
    r[2] |= 0x80;
    assert_eq!(scan_query(&r).unwrap_err(), WireError::NotAQuery);
    let mut two = q.clone();
    two[5] = 2;
    assert_eq!(scan_query(&two).unwrap_err(), WireError::QuestionCount(2));
    let cut = &q[..q.len() - 2];
    assert_eq!(scan_query(cut).unwrap_err(), WireError::BadQuestion);
    // A compression pointer in the question is malformed.
    let mut ptr = q[..12].to_vec();
    ptr.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
    assert_eq!(scan_query(&ptr).unwrap_err(), WireError::BadQuestion);
    // An additional count that points past the end.
    let mut ar = q.clone();
    ar[11] = 1;
    assert_eq!(scan_query(&ar).unwrap_err(), WireError::BadRecord);
}

#[test]
fn key_ignores_case_but_not_type_do_or_cd() {
    let a = scan_query(&query(1, "A.Example.", RecordType::A, None))
        .unwrap()
        .key;
    let b = scan_query(&query(2, "a.example.", RecordType::A, None))
        .unwrap()
        .key;
    assert_eq!(a.name(), b.name());
    assert_eq!(a.bits, b.bits);
    let c = scan_query(&query(2, "a.example.", RecordType::A, Some((1232, true))))
        .unwrap()
        .key;
    assert_ne!(a.bits, c.bits);
    let mut cd = query(2, "a.example.", RecordType::A, None);
    cd[3] |= 0x10;
    assert_eq!(scan_query(&cd).unwrap().key.bits, 2);
}

#[test]
fn render_echoes_id_and_case_and_ages_ttls() {
    let t = t0();
    let q1 = query(7, "svc.ns.svc.cluster.local.", RecordType::A, None);
    let v1 = scan_query(&q1).unwrap();
    let up = a_reply(&build_q(&v1, 999), &[20, 25]);
    let resp = Response::from_upstream(&up, 999, &v1, &policy(), t).unwrap();
    assert_eq!(resp.kind, Kind::Positive);
    assert_eq!(resp.lifetime(), Duration::from_secs(20));

    let q2 = query(4242, "SVC.ns.Svc.cluster.LOCAL.", RecordType::A, None);
    let v2 = scan_query(&q2).unwrap();
    let mut out = Vec::new();
    render(&resp, &v2, t + Duration::from_millis(3500), 512, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.queries[0].name().to_string(), "SVC.ns.Svc.cluster.LOCAL.");
    // 20 and min(25, lifetime 20), aged 3 whole seconds.
    assert_eq!(ttls_of(&out), vec![17, 17]);
    assert!(m.edns.is_none(), "no OPT without one in the query");
    // Never below zero.
    render(&resp, &v2, t + Duration::from_secs(100), 512, &mut out);
    assert_eq!(ttls_of(&out), vec![0, 0]);
}

fn build_q(v: &QueryView<'_>, id: u16) -> Vec<u8> {
    let mut out = Vec::new();
    build_upstream_query(v, id, &mut out);
    out
}

#[test]
fn upstream_query_is_valid_with_do_and_1232() {
    let q = query(7, "Example.COM.", RecordType::MX, Some((4096, true)));
    let v = scan_query(&q).unwrap();
    let up = build_q(&v, 0x1234);
    let m = Message::from_vec(&up).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.queries[0].name().to_string(), "Example.COM.");
    assert_eq!(m.queries[0].query_type(), RecordType::MX);
    let e = m.edns.unwrap();
    assert_eq!(e.max_payload(), 1232);
    assert!(e.flags().dnssec_ok);
    assert!(m.metadata.recursion_desired);
}

#[test]
fn opt_in_reply_iff_in_query() {
    let t = t0();
    let q = query(1, "a.example.", RecordType::A, Some((1232, false)));
    let v = scan_query(&q).unwrap();
    let resp =
        Response::from_upstream(&a_reply(&build_q(&v, 5), &[60]), 5, &v, &policy(), t).unwrap();
    let mut out = Vec::new();
    render(&resp, &v, t, v.udp_limit(), &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    assert_eq!(m.answers.len(), 1);
    let q0 = query(2, "a.example.", RecordType::A, None);
    let v0 = scan_query(&q0).unwrap();
    render(&resp, &v0, t, v0.udp_limit(), &mut out);
    assert!(Message::from_vec(&out).unwrap().edns.is_none());
}

#[test]
fn ad_bit_only_for_clients_that_ask_for_it() {
    // RFC 6840 §5.8: AD=1 from upstream (fetched for a client that set AD, as dig does) goes only
    // to clients that set AD or DO; AD=0 and AD=1 queries without DO share the cache key.
    let t = t0();
    let mut q_ad = query(1, "signed.example.", RecordType::A, None);
    q_ad[3] |= 0x20;
    let v_ad = scan_query(&q_ad).unwrap();
    let mut up = a_reply(&build_q(&v_ad, 5), &[60]);
    up[3] |= 0x20; // upstream validated it
    let resp = Response::from_upstream(&up, 5, &v_ad, &policy(), t).unwrap();
    let ad = |q: &[u8]| {
        let v = scan_query(q).unwrap();
        let mut out = Vec::new();
        render(&resp, &v, t, 4096, &mut out);
        Message::from_vec(&out).unwrap().metadata.authentic_data
    };
    assert!(ad(&q_ad), "a client that set AD keeps it");
    let plain = query(2, "signed.example.", RecordType::A, None);
    assert_eq!(
        scan_query(&plain).unwrap().key.bits,
        v_ad.key.bits,
        "same cache key"
    );
    assert!(!ad(&plain), "a client that set neither AD nor DO gets AD=0");
    let with_do = query(3, "signed.example.", RecordType::A, Some((1232, true)));
    assert!(ad(&with_do), "a DO client keeps it");
}

#[test]
fn too_big_for_udp_sets_tc_with_question_only() {
    let t = t0();
    let q = query(3, "big.example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let ttls = vec![60; 40];
    let resp =
        Response::from_upstream(&a_reply(&build_q(&v, 5), &ttls), 5, &v, &policy(), t).unwrap();
    assert!(resp.bytes().len() > 512);
    let mut out = Vec::new();
    render(&resp, &v, t, v.udp_limit(), &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert!(m.metadata.truncation);
    assert_eq!(m.metadata.id, 3);
    assert_eq!(m.queries.len(), 1);
    assert!(m.answers.is_empty());
    // Over TCP the whole answer.
    render(&resp, &v, t, 65535, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    // With a large EDNS size, the whole answer over UDP, with the OPT.
    let qe = query(4, "big.example.", RecordType::A, Some((4096, false)));
    let ve = scan_query(&qe).unwrap();
    render(&resp, &ve, t, ve.udp_limit(), &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    assert!(m.edns.is_some());
}

#[test]
fn negative_ttl_is_min_of_soa_ttl_minimum_and_cap() {
    let t = t0();
    let q = query(1, "nope.cluster.local.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let p = TtlPolicy {
        max_negative_ttl: Duration::from_secs(3600),
        ..policy()
    };
    let r = Response::from_upstream(
        &negative_reply(&build_q(&v, 9), true, Some((300, 60))),
        9,
        &v,
        &p,
        t,
    )
    .unwrap();
    assert_eq!((r.kind, r.rcode), (Kind::Negative, rcode::NXDOMAIN));
    assert_eq!(r.lifetime(), Duration::from_secs(60));
    let r = Response::from_upstream(
        &negative_reply(&build_q(&v, 9), true, Some((30, 60))),
        9,
        &v,
        &p,
        t,
    )
    .unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(30));
    // Capped by --max-negative-ttl, and the SOA served carries the negative TTL.
    let r = Response::from_upstream(
        &negative_reply(&build_q(&v, 9), true, Some((300, 60))),
        9,
        &v,
        &policy(),
        t,
    )
    .unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(5));
    let mut out = Vec::new();
    render(&r, &v, t + Duration::from_secs(2), 512, &mut out);
    assert_eq!(ttls_of(&out), vec![3]);
    // NODATA is negative too; without SOA nothing is cached.
    let r = Response::from_upstream(
        &negative_reply(&build_q(&v, 9), false, Some((300, 60))),
        9,
        &v,
        &policy(),
        t,
    )
    .unwrap();
    assert_eq!((r.kind, r.rcode), (Kind::Negative, rcode::NOERROR));
    let r = Response::from_upstream(
        &negative_reply(&build_q(&v, 9), true, None),
        9,
        &v,
        &policy(),
        t,
    )
    .unwrap();
    assert_eq!(r.lifetime(), Duration::ZERO);
}

#[test]
fn positive_ttl_clamped_to_min_and_max() {
    let t = t0();
    let q = query(1, "a.example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let p = TtlPolicy {
        min_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(30),
        ..policy()
    };
    let r = Response::from_upstream(&a_reply(&build_q(&v, 1), &[3600]), 1, &v, &p, t).unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(30));
    let r = Response::from_upstream(&a_reply(&build_q(&v, 1), &[2]), 1, &v, &p, t).unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(10));
    // The record's own TTL is never raised.
    let mut out = Vec::new();
    render(&r, &v, t, 512, &mut out);
    assert_eq!(ttls_of(&out), vec![2]);
}

#[test]
fn servfail_truncated_and_refused_kinds() {
    let t = t0();
    let q = query(1, "a.example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let mut m = reply_to(&build_q(&v, 1));
    m.metadata.response_code = ResponseCode::ServFail;
    let r = Response::from_upstream(&m.to_vec().unwrap(), 1, &v, &policy(), t).unwrap();
    assert_eq!((r.kind, r.lifetime()), (Kind::ServFail, Duration::ZERO));
    let p = TtlPolicy {
        servfail_ttl: Duration::from_secs(2),
        ..policy()
    };
    let r = Response::from_upstream(&m.to_vec().unwrap(), 1, &v, &p, t).unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(2));
    m.metadata.response_code = ResponseCode::Refused;
    let r = Response::from_upstream(&m.to_vec().unwrap(), 1, &v, &policy(), t).unwrap();
    assert_eq!(r.kind, Kind::Uncacheable);
    let mut tc = a_reply(&build_q(&v, 1), &[60]);
    tc[2] |= 0x02;
    let r = Response::from_upstream(&tc, 1, &v, &policy(), t).unwrap();
    assert_eq!(r.kind, Kind::Uncacheable);
}

#[test]
fn upstream_reply_must_match() {
    let t = t0();
    let q = query(1, "a.example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let up = a_reply(&build_q(&v, 77), &[60]);
    assert_eq!(
        Response::from_upstream(&up, 78, &v, &policy(), t).unwrap_err(),
        ResponseError::IdMismatch
    );
    let other = query(1, "b.example.", RecordType::A, None);
    let vo = scan_query(&other).unwrap();
    assert_eq!(
        Response::from_upstream(&up, 77, &vo, &policy(), t).unwrap_err(),
        ResponseError::QuestionMismatch
    );
    assert!(matches!(
        Response::from_upstream(&up[..up.len() - 3], 77, &v, &policy(), t),
        Err(ResponseError::Malformed(_))
    ));
    // Upstream may change case (0x20): still ours.
    let upper = query(1, "A.EXAMPLE.", RecordType::A, None);
    let vu = scan_query(&upper).unwrap();
    assert!(Response::from_upstream(&up, 77, &vu, &policy(), t).is_ok());
}

#[test]
fn opt_in_the_middle_is_handled() {
    let t = t0();
    let q = query(1, "a.example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let mut bytes = a_reply(&build_q(&v, 5), &[60]);
    // a_reply ends with its OPT (ARCOUNT 1); put an A record after it, whose name is a compression
    // pointer to the question (offset 12), so the OPT sits in the middle of the additional section.
    let opt = [0u8, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0];
    assert_eq!(&bytes[bytes.len() - opt.len()..], &opt);
    bytes.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 40, 0, 4, 1, 2, 3, 4]);
    bytes[10..12].copy_from_slice(&2u16.to_be_bytes());
    let parsed = Message::from_vec(&bytes).unwrap();
    assert_eq!((parsed.additionals.len(), parsed.edns.is_some()), (1, true));

    let resp = Response::from_upstream(&bytes, 5, &v, &policy(), t).unwrap();
    let mut out = Vec::new();
    render(&resp, &v, t, 65535, &mut out);
    let mm = Message::from_vec(&out).unwrap();
    assert_eq!(mm.additionals.len(), 1, "the A after the OPT is kept");
    assert_eq!(mm.additionals[0].name.to_string(), "a.example.");
    assert!(mm.edns.is_none(), "the upstream OPT is stripped");
    // Answer 60 and additional 40, both lowered to the 30 s lifetime.
    assert_eq!(ttls_of(&out), vec![30, 30]);
}

#[test]
fn error_replies_parse() {
    let q = query(9, "Mixed.Case.", RecordType::A, Some((1232, true)));
    let v = scan_query(&q).unwrap();
    let mut out = Vec::new();
    render_error(&v, rcode::SERVFAIL.into(), &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.metadata.id, 9);
    assert_eq!(m.queries[0].name().to_string(), "Mixed.Case.");
    assert!(m.edns.is_some());
    render_error(&v, rcode::BADVERS, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(u16::from(m.metadata.response_code), rcode::BADVERS);
    render_formerr_header(9, 0x0100, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
}

fn arb_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9][a-zA-Z0-9_-]{0,19}", 1..6).prop_map(|ls| ls.join(".") + ".")
}

proptest! {
    /// The fast scanner and hickory agree on every generated query.
    #[test]
    fn scanner_agrees_with_hickory(
        name in arb_name(),
        qtype in prop::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::PTR, RecordType::TXT, RecordType::MX]),
        id in any::<u16>(),
        edns in prop::option::of((512u16..=4096, any::<bool>())),
    ) {
        let q = query(id, &name, qtype, edns);
        let v = scan_query(&q).unwrap();
        let m = Message::from_vec(&q).unwrap();
        prop_assert_eq!(v.id, m.metadata.id);
        prop_assert_eq!(v.key.qtype, u16::from(m.queries[0].query_type()));
        prop_assert_eq!(v.key.qclass, u16::from(DNSClass::IN));
        prop_assert_eq!(name_to_string(v.key.name()), m.queries[0].name().to_lowercase().to_string());
        prop_assert_eq!(v.edns.map(|e| (e.udp_payload, e.dnssec_ok)), m.edns.as_ref().map(|e| (e.max_payload().max(512), e.flags().dnssec_ok)));
    }

    /// Rendering from a stored response gives what hickory would: same records, aged TTLs.
    #[test]
    fn render_agrees_with_hickory(name in arb_name(), ttls in prop::collection::vec(0u32..100_000, 1..8), age in 0u64..40, id in any::<u16>()) {
        let t = t0();
        let q = query(1, &name, RecordType::A, Some((1232, false)));
        let v = scan_query(&q).unwrap();
        let up = a_reply(&build_q(&v, 5), &ttls);
        let resp = Response::from_upstream(&up, 5, &v, &policy(), t).unwrap();
        let q2 = query(id, &name.to_uppercase(), RecordType::A, None);
        let v2 = scan_query(&q2).unwrap();
        let mut out = Vec::new();
        render(&resp, &v2, t + Duration::from_secs(age), 65535, &mut out);
        let m = Message::from_vec(&out).unwrap();
        let src = Message::from_vec(&up).unwrap();
        prop_assert_eq!(m.metadata.id, id);
        prop_assert_eq!(m.answers.len(), src.answers.len());
        let life = (*ttls.iter().min().unwrap()).min(30);
        for (a, b) in m.answers.iter().zip(src.answers.iter()) {
            prop_assert_eq!(&a.data, &b.data);
            prop_assert_eq!(u64::from(a.ttl), u64::from(b.ttl.min(life)).saturating_sub(age));
        }
    }

    /// Arbitrary bytes never panic the scanner, and a scanned view renders errors that parse.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(v) = scan_query(&bytes) {
            let mut out = Vec::new();
            render_error(&v, 2, &mut out);
            prop_assert!(out.len() >= HEADER_LEN);
        }
    }
}

#[test]
fn response_is_three_cache_lines() {
    assert!(
        std::mem::size_of::<Response>() <= 192,
        "Response grew to {} bytes",
        std::mem::size_of::<Response>()
    );
}

/// Small responses live inside the `Response` (no heap block), large ones in a shared block; both
/// serve the same bytes, TTL offsets and key. Record counts around the inline size are all tried, so
/// the boundary itself is covered.
#[test]
fn inline_and_shared_storage_serve_alike() {
    let t = t0();
    let q = query(9, "Storage.Example.", RecordType::A, None);
    let v = scan_query(&q).unwrap();
    let (mut inline, mut shared) = (0, 0);
    for n in 1..=16usize {
        let ttls: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
        let resp =
            Response::from_upstream(&a_reply(&build_q(&v, 5), &ttls), 5, &v, &policy(), t).unwrap();
        let heap = resp.weight() - std::mem::size_of::<Response>();
        if heap == 0 {
            inline += 1;
        } else {
            shared += 1;
            assert!(heap >= resp.bytes().len(), "n={n}: heap {heap}");
        }
        assert!(resp.answers(&v.key), "n={n}");
        assert_eq!(resp.ttl_offsets().count(), n, "n={n}");
        let mut out = Vec::new();
        render(&resp, &v, t + Duration::from_secs(3), 65535, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 9);
        assert_eq!(m.queries[0].name().to_ascii(), "Storage.Example.");
        let got: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        let want: Vec<u32> = ttls.iter().map(|t| (*t).min(30) - 3).collect();
        assert_eq!(got, want, "n={n}");
    }
    assert!(inline > 0 && shared > 0, "inline {inline}, shared {shared}");
}
