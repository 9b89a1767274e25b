//! A flood in a lab: one pod floods denied datagrams while another's drops must all
//! reach `observe` and every counter stays exact. Needs root; the lab has its own name
//! and a guard that tears it down even when an assertion fails.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::lab::{in_netns, ip, strings, udp_recverr, Lab, Observer, SECOND};

const FLOOD_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: flood, namespace: x, labels: {app: flood}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: target, namespace: x, labels: {app: target}}
spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 5555, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flood-no-egress, namespace: x}
spec: {podSelector: {matchLabels: {app: flood}}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: target-no-ingress, namespace: x}
spec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress]}
"#;

/// Packets `eth0` of `netns` has sent: the interface's own counter.
fn tx_packets(netns: &str) -> u64 {
    let v: Value = serde_json::from_str(&ip(&[
        "-n", netns, "-s", "-j", "link", "show", "dev", "eth0",
    ]))
    .unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

/// Counts the frames other than IPv4 that leave `eth0` of a pod (ARP, IPv6 neighbour
/// discovery and MLD: what the classifier lets by unjudged), as the kernel sends them:
/// a packet socket whose filter takes only those, read through PACKET_STATISTICS.
struct Tap(std::os::fd::OwnedFd);

impl Tap {
    fn open(netns: &str) -> Tap {
        use std::os::fd::FromRawFd;
        const SO_ATTACH_FILTER: libc::c_int = 26;
        const PACKET_OUTGOING: u32 = 4;
        const ETH_P_IP: u32 = 0x0800;
        let fd = in_netns(netns, || unsafe {
            // Protocol 0: no frame is queued before the filter and the bind are in place.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let pkttype = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;
            let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
            let filter = [
                op(0x30, 0, 0, pkttype),         // ldb pkttype
                op(0x15, 0, 3, PACKET_OUTGOING), // jeq outgoing, else drop
                op(0x28, 0, 0, 12),              // ldh ethertype
                op(0x15, 1, 0, ETH_P_IP),        // jeq IPv4: drop
                op(0x06, 0, 0, 0xffff),          // ret take
                op(0x06, 0, 0, 0),               // ret drop
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            let size = std::mem::size_of_val(&prog) as libc::socklen_t;
            let ok = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_ATTACH_FILTER,
                &prog as *const _ as *const _,
                size,
            );
            assert_eq!(
                ok,
                0,
                "SO_ATTACH_FILTER: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            let size = std::mem::size_of_val(&sll) as libc::socklen_t;
            let ok = libc::bind(fd, &sll as *const _ as *const libc::sockaddr, size);
            assert_eq!(ok, 0, "bind: {}", std::io::Error::last_os_error());
            fd
        });
        // SAFETY: a socket we own from here on.
        Tap(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// Frames taken since the last call.
    fn take(&self) -> u64 {
        use std::os::fd::AsRawFd;
        const PACKET_STATISTICS: libc::c_int = 6;
        let mut stats = [0u32; 2]; // struct tpacket_stats: packets, drops
        let mut size = std::mem::size_of_val(&stats) as libc::socklen_t;
        let ok = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                stats.as_mut_ptr() as *mut _,
                &mut size,
            )
        };
        assert_eq!(
            ok,
            0,
            "PACKET_STATISTICS: {}",
            std::io::Error::last_os_error()
        );
        stats[0] as u64
    }
}

/// Sends `total` datagrams to `to` from inside `netns`, at most `rate` per second;
/// a datagram the veth refused (ENOBUFS, reported thanks to IP_RECVERR) is sent again,
/// so exactly `total` leave.
fn flood(netns: &str, to: std::net::SocketAddr, total: u64, rate: u64) -> Duration {
    in_netns(netns, move || {
        let s = udp_recverr();
        s.connect(to).unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            if s.send(b"flood").is_ok() {
                sent += 1;
            }
            // Pacing, not readiness: never ahead of `rate`.
            if sent.is_multiple_of(1000) {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        started.elapsed()
    })
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_flood_of_denied_datagrams_costs_other_pods_no_drop_report_and_counters_stay_exact() {
    const FLOOD: u64 = 200_000;
    const CONNECTIONS: usize = 20;
    let lab = Lab::up("flood", &[("cluster.yaml", FLOOD_CLUSTER)], &[]);
    let (flood_ns, _) = lab.pod("x/flood");
    let (client_ns, _) = lab.pod("x/client");
    let (target_ns, target) = lab.pod("x/target");
    // The flood leaves at once, not behind an ARP resolution that could drop some of it
    // after `send` succeeded: a permanent neighbour.
    let link: Value = serde_json::from_str(&ip(&[
        "-n", &target_ns, "-j", "link", "show", "dev", "eth0",
    ]))
    .unwrap();
    let mac = link[0]["address"].as_str().unwrap().to_string();
    let target_ip = target.to_string();
    ip(&[
        "-n",
        &flood_ns,
        "neigh",
        "replace",
        &target_ip,
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    // What else the flooder's eth0 sends meanwhile (IPv6 housekeeping) is not judged.
    let tap = Tap::open(&flood_ns);

    let clients = Observer::start(
        &lab,
        &[
            "--pod",
            "x/client",
            "--verdict",
            "dropped",
            "--count",
            &CONNECTIONS.to_string(),
            "-o",
            "json",
        ],
    );
    let flooded = Observer::start(&lab, &["--pod", "x/flood"]);
    let c0 = lab.counters();
    tap.take();
    let tx0 = tx_packets(&flood_ns);

    let flooder = {
        let ns = flood_ns.clone();
        std::thread::spawn(move || flood(&ns, (target, 5555).into(), FLOOD, 100_000))
    };
    // Meanwhile the client tries CONNECTIONS times: one SYN each (it gives up long
    // before the first retransmission at 1 s), each dropped at the target's ingress.
    for _ in 0..CONNECTIONS {
        let to = (target, 80).into();
        let r = in_netns(&client_ns, move || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200))
        });
        assert!(r.is_err(), "the target's ingress is denied");
    }
    let took = flooder.join().unwrap();
    let tx = tx_packets(&flood_ns) - tx0;
    let unjudged = tap.take();
    let sent = tx - unjudged;
    let dropped = |c: &Value, dir: &str| {
        lab.count(c, "dropped", "POLICY_DENIED", dir)
            - lab.count(&c0, "dropped", "POLICY_DENIED", dir)
    };
    // The classifier works through the veth's backlog after the sender returns: wait
    // (bounded) for its count to reach what the interface sent.
    let deadline = Instant::now() + 10 * SECOND;
    let c1 = loop {
        let c = lab.counters();
        if dropped(&c, "egress") >= sent || Instant::now() > deadline {
            break c;
        }
        std::thread::yield_now();
    };
    eprintln!(
        "{FLOOD} datagrams in {took:?} ({:.0}/s); eth0 sent {tx} packets, {unjudged} of them \
         not IPv4",
        FLOOD as f64 / took.as_secs_f64()
    );
    assert_eq!(sent, FLOOD, "eth0 sent exactly the flood");
    assert_eq!(dropped(&c1, "egress"), sent, "every datagram counted once");
    assert_eq!(
        dropped(&c1, "ingress"),
        CONNECTIONS as u64,
        "every SYN of the client counted once"
    );
    let events = |c: &Value, k: &str| c["events"][k].as_u64().unwrap();
    let reported = ["sent", "rate_limited", "ring_full"]
        .iter()
        .map(|k| events(&c1, k) - events(&c0, k))
        .sum::<u64>();
    assert_eq!(
        reported,
        sent + CONNECTIONS as u64,
        "each drop reported or rate limited"
    );

    // Every drop of the client reached observe, despite the flood beside it.
    let v = clients.take(CONNECTIONS, 10 * SECOND);
    assert_eq!(v.len(), CONNECTIONS, "drops of x/client observed: {v:?}");
    let mut ports: Vec<u64> = v.iter().map(|v| v["sport"].as_u64().unwrap()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), CONNECTIONS, "one drop per connection");
    for v in &v {
        assert_eq!(
            (&v["src"], &v["dst"], &v["direction"]),
            (&"x/client".into(), &"x/target".into(), &"ingress".into())
        );
        assert_eq!(strings(&v["policies"]), ["x/target-no-ingress"]);
    }
    // The flood's suppressed events are reported, not silently lost.
    let note = flooded
        .note("more like this", 5 * SECOND)
        .unwrap_or_else(|| panic!("no \"more like this\" note\n{}", lab.logs()));
    let n: u64 = note
        .trim_start_matches("... ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n > 0, "{note}");
}
