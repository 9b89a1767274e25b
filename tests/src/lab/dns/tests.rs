//! The server and the client against each other and against hickory's own messages.
use super::*;
use hickory_proto::rr::rdata::{CNAME, SOA};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// `query` answered by the server function and read back by the client's reader.
fn ask(
    records: &Records,
    query: &[u8],
    over: Transport,
    id: u16,
    q: &str,
    t: RecordType,
) -> Reading {
    let a = answer(records, query, over).expect("answered");
    read_answer(&a, id, &name(q), t).expect("our answer")
}

fn ask_for(id: u16, q: &str, ipv6: bool) -> Vec<u8> {
    let t = if ipv6 {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    query_message(id, &question_name(q).unwrap(), t)
}

fn web() -> Records {
    let mut records = Records::default();
    records.names.insert(
        "web.x.svc.cluster.local".into(),
        vec![ip("10.96.1.0"), ip("fd00::1")],
    );
    records
}

#[test]
fn a_query_round_trips_through_the_server_function() {
    let records = web();
    let q = ask_for(7, "Web.x.svc.cluster.local.", false);
    let r = ask(
        &records,
        &q,
        Transport::Udp,
        7,
        "web.x.svc.cluster.local",
        RecordType::A,
    );
    assert_eq!(r.result, Resolution::Answered);
    assert_eq!(r.addresses, vec![ip("10.96.1.0")]);
    assert!(!r.truncated);
    // The answer is a conforming response: AA, RD echoed, the question as asked.
    let m = Message::from_vec(&answer(&records, &q, Transport::Udp).unwrap()).unwrap();
    assert!(m.authoritative && m.recursion_desired && !m.recursion_available);
    assert_eq!(m.queries[0].name().to_ascii(), "Web.x.svc.cluster.local.");
    assert_eq!(m.answers[0].ttl, TTL);

    let q = ask_for(8, "web.x.svc.cluster.local", true);
    let r = ask(
        &records,
        &q,
        Transport::Tcp,
        8,
        "web.x.svc.cluster.local",
        RecordType::AAAA,
    );
    assert_eq!(
        (r.result, r.addresses),
        (Resolution::Answered, vec![ip("fd00::1")])
    );

    // A known name without records of the type: NOERROR, empty.
    let mut v4only = Records::default();
    v4only
        .names
        .insert("a.x.pod.cluster.local".into(), vec![ip("10.244.0.5")]);
    let q = ask_for(9, "a.x.pod.cluster.local", true);
    let r = ask(
        &v4only,
        &q,
        Transport::Udp,
        9,
        "a.x.pod.cluster.local",
        RecordType::AAAA,
    );
    assert_eq!((r.result, r.addresses), (Resolution::Answered, vec![]));

    let q = ask_for(10, "nope.x.svc.cluster.local", false);
    let r = ask(
        &records,
        &q,
        Transport::Udp,
        10,
        "nope.x.svc.cluster.local",
        RecordType::A,
    );
    assert_eq!(r.result, Resolution::Nxdomain);
    // Another id, or another question, is not our answer.
    let a = answer(&records, &q, Transport::Udp).unwrap();
    assert_eq!(
        read_answer(&a, 11, &name("nope.x.svc.cluster.local"), RecordType::A),
        None
    );
    assert_eq!(
        read_answer(&a, 10, &name("web.x.svc.cluster.local"), RecordType::A),
        None
    );
    assert_eq!(
        read_answer(&a, 10, &name("nope.x.svc.cluster.local"), RecordType::AAAA),
        None
    );

    // Garbage gets a FORMERR, not a panic; a response gets nothing.
    let bad = Message::from_vec(&answer(&records, &[1, 2, 3], Transport::Udp).unwrap()).unwrap();
    assert_eq!((bad.id, bad.response_code), (0x0102, ResponseCode::FormErr));
    assert_eq!(answer(&records, &a, Transport::Udp), None);
}

#[test]
fn the_server_answers_edns_with_edns_and_other_opcodes_with_notimp() {
    let records = web();
    let mut m = Message::new(3, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        name("web.x.svc.cluster.local."),
        RecordType::A,
    ));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns.clone());
    let a = Message::from_vec(&answer(&records, &m.to_vec().unwrap(), Transport::Udp).unwrap())
        .unwrap();
    assert_eq!(a.response_code, ResponseCode::NoError);
    assert_eq!(a.edns.as_ref().map(Edns::max_payload), Some(UDP_EDNS));
    edns.set_version(1);
    m.set_edns(edns);
    let a = Message::from_vec(&answer(&records, &m.to_vec().unwrap(), Transport::Udp).unwrap())
        .unwrap();
    // BADVERS is 16 (split between the header and OPT), which reads back as its
    // other name, BADSIG.
    assert_eq!(u16::from(a.response_code), 16);
    assert!(a.answers.is_empty() && a.edns.is_some());
    let mut m = Message::new(4, MessageType::Query, OpCode::Status);
    m.add_query(Query::query(
        name("web.x.svc.cluster.local."),
        RecordType::A,
    ));
    let a = Message::from_vec(&answer(&records, &m.to_vec().unwrap(), Transport::Udp).unwrap())
        .unwrap();
    assert_eq!(a.response_code, ResponseCode::NotImp);
}

#[test]
fn a_big_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let n = "big.x.svc.cluster.local";
    let mut records = Records::default();
    let all: Vec<IpAddr> = (0..40).map(|i| ip(&format!("10.244.1.{i}"))).collect();
    records.names.insert(n.into(), all.clone());
    let q = ask_for(21, n, false);

    let udp = answer(&records, &q, Transport::Udp).unwrap();
    assert!(udp.len() <= 512, "{}", udp.len());
    let r = read_answer(&udp, 21, &name(n), RecordType::A).unwrap();
    assert!(r.truncated);
    assert!(r.addresses.is_empty());

    let tcp = answer(&records, &q, Transport::Tcp).unwrap();
    assert!(tcp.len() > 512, "{}", tcp.len());
    let r = read_answer(&tcp, 21, &name(n), RecordType::A).unwrap();
    assert!(!r.truncated);
    assert_eq!((r.result, r.addresses), (Resolution::Answered, all.clone()));

    // A query advertising a larger EDNS payload gets it whole over UDP, up to that size.
    let with_edns = |payload: u16| {
        let mut m = Message::from_vec(&q).unwrap();
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        m.set_edns(edns);
        let a = answer(&records, &m.to_vec().unwrap(), Transport::Udp).unwrap();
        (
            a.len(),
            read_answer(&a, 21, &name(n), RecordType::A).unwrap(),
        )
    };
    let (len, r) = with_edns(1232);
    assert!(!r.truncated && len > 512 && len <= 1232, "{len}");
    assert_eq!(r.addresses, all);
    let (len, r) = with_edns(600);
    assert!(r.truncated && len <= 600, "{len}");
}

/// An answer as a recursive server (CoreDNS, say) makes it with hickory itself:
/// compressed names, CNAMEs, authority and additional records.
fn made_by_hickory(
    id: u16,
    qname: &str,
    answers: Vec<Record>,
    additionals: Vec<Record>,
) -> Vec<u8> {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.add_query(Query::query(name(qname), RecordType::A));
    m.add_answers(answers);
    m.add_authority(Record::from_rdata(
        name("cluster.local."),
        30,
        RData::SOA(SOA::new(
            name("ns.dns.cluster.local."),
            name("hostmaster.cluster.local."),
            1,
            7200,
            1800,
            86400,
            30,
        )),
    ));
    m.add_additionals(additionals);
    m.to_vec().unwrap()
}

fn a(owner: &str, addr: &str) -> Record {
    let IpAddr::V4(v4) = ip(addr) else { panic!() };
    Record::from_rdata(name(owner), 30, RData::A(A(v4)))
}

fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 30, RData::CNAME(CNAME(name(target))))
}

#[test]
fn the_client_follows_a_cname_chain_to_the_addresses() {
    let q = "www.x.svc.cluster.local.";
    let msg = made_by_hickory(
        5,
        q,
        vec![
            cname("WWW.x.svc.cluster.local.", "front.y.svc.cluster.local."),
            // Out of order, as a server may send them.
            a("web.z.svc.cluster.local.", "10.96.7.7"),
            cname("front.y.svc.cluster.local.", "web.z.svc.cluster.local."),
            a("web.z.svc.cluster.local.", "10.96.7.8"),
            // Not on the chain: ignored.
            a("other.z.svc.cluster.local.", "10.96.9.9"),
        ],
        vec![a("ns.dns.cluster.local.", "10.96.0.10")],
    );
    let r = read_answer(&msg, 5, &name(q), RecordType::A).unwrap();
    assert_eq!(r.result, Resolution::Answered);
    assert_eq!(r.addresses, vec![ip("10.96.7.7"), ip("10.96.7.8")]);

    // A CNAME loop ends, without addresses.
    let msg = made_by_hickory(
        6,
        q,
        vec![
            cname(q, "loop.x.svc.cluster.local."),
            cname("loop.x.svc.cluster.local.", q),
        ],
        vec![],
    );
    let r = read_answer(&msg, 6, &name(q), RecordType::A).unwrap();
    assert_eq!((r.result, r.addresses), (Resolution::Answered, vec![]));
}

#[test]
fn the_client_reads_a_compressed_answer_made_by_hickory() {
    let q = "db.x.svc.cluster.local.";
    let msg = made_by_hickory(
        9,
        q,
        vec![a(q, "10.96.3.1"), a(q, "10.96.3.2"), a(q, "10.96.3.3")],
        vec![a("db-0.db.x.svc.cluster.local.", "10.244.0.9")],
    );
    // The owner names after the question's are pointers (0b11 in the top bits).
    let question_end = 12 + q.len() + 1 + 4;
    assert_eq!(msg[question_end] & 0xc0, 0xc0, "compressed");
    let r = read_answer(&msg, 9, &name(q), RecordType::A).unwrap();
    assert_eq!(r.result, Resolution::Answered);
    assert_eq!(
        r.addresses,
        vec![ip("10.96.3.1"), ip("10.96.3.2"), ip("10.96.3.3")]
    );
    // SERVFAIL (from hickory too) is a failure, not an empty answer.
    let mut m = Message::from_vec(&msg).unwrap();
    m.metadata.response_code = ResponseCode::ServFail;
    m.answers.clear();
    let r = read_answer(&m.to_vec().unwrap(), 9, &name(q), RecordType::A).unwrap();
    assert_eq!(r.result, Resolution::Failed);
}

/// Over loopback (no root): `lookup` asks over UDP, gets TC, asks again over TCP.
#[test]
fn lookup_retries_a_truncated_answer_over_tcp() {
    let dir = std::env::temp_dir().join(format!("netpol-dns-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("records.json");
    let mut records = web();
    let all: Vec<IpAddr> = (0..40).map(|i| ip(&format!("10.244.2.{i}"))).collect();
    records
        .names
        .insert("big.x.svc.cluster.local".into(), all.clone());
    std::fs::write(&path, serde_json::to_vec(&records).unwrap()).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // UDP and TCP on one port: the first free port both can take.
    let (udp, tcp) = rt.block_on(async {
        loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        }
    });
    let server = udp.local_addr().unwrap();
    let serving = std::thread::spawn(move || rt.block_on(serve(path, udp, tcp)));
    let t = Duration::from_secs(2);

    let l = lookup(server, "web.x.svc.cluster.local", false, false, t).unwrap();
    assert_eq!(
        (l.result, l.addresses),
        (Resolution::Answered, vec![ip("10.96.1.0")])
    );
    assert_eq!((l.transport.as_str(), l.truncated), ("udp", false));

    let l = lookup(server, "big.x.svc.cluster.local", false, false, t).unwrap();
    assert_eq!((l.result, l.addresses), (Resolution::Answered, all));
    assert_eq!((l.transport.as_str(), l.truncated), ("udp→tcp", true));

    let l = lookup(server, "nope.x.svc.cluster.local", false, true, t).unwrap();
    assert_eq!(
        (l.result, l.transport.as_str()),
        (Resolution::Nxdomain, "tcp")
    );

    assert!(lookup(server, "a..b", false, false, t).is_err());
    assert!(!serving.is_finished());
    let _ = std::fs::remove_dir_all(&dir);
}
