//! The datapath under real traffic in a lab: IPv6 and ping, large transfers, established
//! connections across policy changes, spoofing, floods and counters, path MTU discovery.
//! Needs root. Every test has its own lab name, so they run in parallel, and a guard
//! that tears its lab down even when an assertion fails.

mod support;

use support::lab::{in_netns, ip, udp_recverr, Lab, NETPOL};
use support::manifests::{ALLOW_B_TO_A, DENY_X, PODS};
use support::packet;
use support::traffic::{connect, echo, ping, try_connect};

use std::process::Command;

use serde_json::Value;

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn ipv6_and_ping_are_enforced_like_ipv4() {
    let lab = Lab::up("six", &[("pods.yaml", PODS)], &[]);
    let (a, c) = (lab.pod_net("x/a"), lab.pod_net("y/c"));
    assert_eq!(lab.result_family(80, "TCP", "x/b", "x/a", 6), "connected");
    assert_eq!(lab.result_family(53, "UDP", "x/b", "x/a", 6), "connected");
    assert!(
        ping(&lab, "x/b", a.v4) && ping(&lab, "x/b", a.v6),
        "no policy: pings pass"
    );

    lab.write("deny.yaml", DENY_X);
    lab.write("allow.yaml", ALLOW_B_TO_A);
    lab.wait();
    assert_eq!(lab.result_family(80, "TCP", "x/b", "x/a", 6), "connected");
    assert_eq!(lab.result_family(80, "TCP", "y/c", "x/a", 6), "timeout");
    assert_eq!(lab.result_family(53, "UDP", "x/b", "x/a", 6), "timeout");
    assert_eq!(lab.result_family(53, "UDP", "x/a", "y/c", 6), "connected");
    // ICMP echo: no NetworkPolicy rule names ICMP, so an isolated pod cannot be pinged,
    // and a pod that is not isolated can (its replies pass by conntrack).
    assert!(!ping(&lab, "x/b", a.v4) && !ping(&lab, "x/b", a.v6));
    assert!(ping(&lab, "x/b", c.v4) && ping(&lab, "x/b", c.v6));
    assert!(lab.agent_count("dropped", "POLICY_DENIED", "ingress") >= 2);
}

const SERVER_ONLY_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ingress-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress: [{ports: [{port: 80}]}]
"#;

/// 8 MiB each way over IPv4 and IPv6 to a server whose egress is denied: every reply
/// segment passes by conntrack.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_large_transfer_passes_when_only_the_server_ingress_is_allowed() {
    let lab = Lab::up(
        "bulk",
        &[("pods.yaml", PODS), ("server.yaml", SERVER_ONLY_INGRESS)],
        &[],
    );
    lab.wait();
    let (a, c) = (lab.pod_net("x/a"), lab.pod_net("y/c"));
    for to in [a.v4, a.v6] {
        let started = std::time::Instant::now();
        let s = connect(&c.netns, to);
        const TOTAL: usize = 8 << 20;
        let mut writer = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let chunk = vec![0x5au8; 64 << 10];
            for _ in 0..TOTAL / chunk.len() {
                writer.write_all(&chunk).unwrap();
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut reader = s;
        reader
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut received = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|b| *b == 0x5a));
                    received += n;
                }
                Err(e) => panic!("after {received} bytes from {to}: {e}"),
            }
        }
        sender.join().unwrap();
        assert_eq!(received, TOTAL, "{to}");
        eprintln!("{to}: 8 MiB echoed in {:?}", started.elapsed());
    }
    assert_eq!(
        lab.result(80, "TCP", "x/a", "y/c"),
        "timeout",
        "the server cannot connect out"
    );
}

/// An established connection loses its allowing policy: its next packet is dropped as
/// POLICY_REVOKED; with --keep-established it keeps working while new ones are refused.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn an_established_connection_is_cut_when_its_policy_goes_and_kept_with_the_flag() {
    let one_sec = std::time::Duration::from_secs(1);
    for keep in [false, true] {
        let args: &[&str] = if keep { &["--keep-established"] } else { &[] };
        let lab = Lab::with_agent(
            if keep { "keep" } else { "cut" },
            &[
                ("pods.yaml", PODS),
                ("deny.yaml", DENY_X),
                ("allow.yaml", ALLOW_B_TO_A),
            ],
            args,
        );
        lab.wait();
        let (a, b) = (lab.pod_net("x/a"), lab.pod_net("x/b"));
        let mut v4 = connect(&b.netns, a.v4);
        let mut v6 = connect(&b.netns, a.v6);
        assert!(echo(&mut v4, b"before\n", one_sec) && echo(&mut v6, b"before\n", one_sec));

        let removed = std::time::Instant::now();
        lab.remove("allow.yaml");
        lab.wait();
        let applied = removed.elapsed();
        let revoked_before = lab.agent_count("dropped", "POLICY_REVOKED", "ingress");
        if keep {
            assert!(echo(&mut v4, b"after\n", one_sec), "kept (v4)");
            assert!(echo(&mut v6, b"after\n", one_sec), "kept (v6)");
            assert_eq!(
                lab.result(80, "TCP", "x/b", "x/a"),
                "timeout",
                "new connections are judged"
            );
            assert_eq!(revoked_before, 0);
        } else {
            assert!(!echo(&mut v4, b"after\n", one_sec), "cut (v4)");
            assert!(!echo(&mut v6, b"after\n", one_sec), "cut (v6)");
            assert!(
                lab.agent_count("dropped", "POLICY_REVOKED", "ingress") >= 2,
                "dropped as revoked"
            );
        }
        eprintln!("keep={keep}: policy removal enforced {applied:?} after the file went");
        assert!(applied < std::time::Duration::from_secs(5), "{applied:?}");
    }
}

/// A pod with a raw socket sends a datagram with another pod's source address: it is
/// dropped at the pod's veth (SPOOFED_SOURCE); its honest datagram after it arrives.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_spoofing_pod_is_stopped_at_its_veth() {
    let lab = Lab::up("spoof", &[("pods.yaml", PODS)], &[]);
    let (a, b, c) = (lab.pod_net("x/a"), lab.pod_net("x/b"), lab.pod_net("y/c"));
    let (std::net::IpAddr::V4(a4), std::net::IpAddr::V4(b4), std::net::IpAddr::V4(c4)) =
        (a.v4, b.v4, c.v4)
    else {
        unreachable!()
    };
    let receiver = in_netns(&c.netns, || {
        std::net::UdpSocket::bind("0.0.0.0:7777").unwrap()
    });
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let before = lab.agent_count("dropped", "SPOOFED_SOURCE", "egress");
    in_netns(&b.netns, move || {
        // IPPROTO_RAW: we write the IP header (the kernel fills in the checksum).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0);
        for (src, payload) in [(a4, b"spoofed"), (b4, b"honest!")] {
            let udp = packet::udp_payload(4444, 7777, payload);
            let p = packet::ip4(src.octets(), c4.octets(), udp, &packet::V4::default());
            let dst = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(c4.octets()),
                },
                sin_zero: [0; 8],
            };
            let n = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr() as *const _,
                    p.len(),
                    0,
                    &dst as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            assert_eq!(
                n,
                p.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        unsafe { libc::close(fd) };
    });
    // The honest datagram was sent after the spoofed one on the same path: it arriving
    // first means the spoofed one did not pass.
    let mut buf = [0u8; 64];
    let (n, from) = receiver
        .recv_from(&mut buf)
        .expect("the honest datagram arrives");
    assert_eq!((&buf[..n], from.ip()), (&b"honest!"[..], b.v4));
    assert_eq!(
        lab.agent_count("dropped", "SPOOFED_SOURCE", "egress"),
        before + 1
    );
}

/// One pod floods another with denied datagrams: the counters count every one exactly,
/// the flooded endpoint's events are rate limited, and a drop at another pod is still
/// reported.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_flood_does_not_starve_events_of_other_pods_and_counters_stay_exact() {
    let lab = Lab::with_agent(
        "flood",
        &[("pods.yaml", PODS), ("deny.yaml", DENY_X)],
        &["--event-rate=20", "--event-burst=20"],
    );
    lab.wait();
    let (a, b) = (lab.pod_net("x/a"), lab.pod_net("x/b"));
    let drops = |lab: &Lab| lab.agent_count("dropped", "POLICY_DENIED", "ingress");
    let events = |lab: &Lab| {
        let e = lab.agent_counters().1;
        (
            e["sent"].as_u64().unwrap(),
            e["rate_limited"].as_u64().unwrap(),
        )
    };
    let (before, (sent0, limited0)) = (drops(&lab), events(&lab));
    let to = a.v4;
    // With IP_RECVERR a datagram the veth could not take fails the send (ENOBUFS)
    // instead of vanishing, so `sent` counts exactly what reached the veth.
    let socket = in_netns(&b.netns, udp_recverr);
    let mut sent = 0u64;
    let started = std::time::Instant::now();
    for _burst in 0..20 {
        for _ in 0..250 {
            if socket.send_to(b"flood", (to, 5555)).is_ok() {
                sent += 1;
            }
        }
        // Wait (bounded) until the classifier has judged every datagram sent so far.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while drops(&lab) - before < sent {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {sent} judged",
                drops(&lab) - before
            );
            std::thread::yield_now();
        }
    }
    let elapsed = started.elapsed();
    assert!(sent >= 4000, "{sent} sent");
    assert_eq!(
        drops(&lab) - before,
        sent,
        "every datagram counted exactly once"
    );
    let (sent1, limited1) = events(&lab);
    assert_eq!(
        (sent1 - sent0) + (limited1 - limited0),
        sent,
        "each drop reported or rate limited"
    );
    assert!(
        limited1 - limited0 >= sent - 200,
        "the flooded pod's events are limited"
    );
    eprintln!(
        "{sent} datagrams judged in {elapsed:?}; {} events sent, {} rate limited",
        sent1 - sent0,
        limited1 - limited0
    );

    // A drop at another pod is still reported.
    let mut observer = Command::new(NETPOL)
        .args([
            "observe",
            "--lab",
            &lab.name,
            "--verdict",
            "dropped",
            "--pod",
            "x/b",
            "--count",
            "1",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut done = false;
    for _ in 0..10 {
        assert_eq!(lab.result(80, "TCP", "y/c", "x/b"), "timeout");
        if observer.try_wait().unwrap().is_some() {
            done = true;
            break;
        }
    }
    if !done {
        let _ = observer.kill();
        panic!("no event for x/b after the flood of x/a\n{}", lab.logs());
    }
    let v: Value = serde_json::from_slice(&observer.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(
        (v["dst"].as_str(), v["reason"].as_str()),
        (Some("x/b"), Some("POLICY_DENIED"))
    );
}

/// `connect`, retried while the new links and neighbours settle (bounded).
fn connect_when_routed(netns: &str, to: std::net::IpAddr) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match try_connect(netns, to) {
            Ok(s) => return s,
            Err(_) if std::time::Instant::now() < deadline => continue,
            Err(e) => panic!("{to} unreachable from {netns}: {e}"),
        }
    }
}

/// Path MTU discovery under default deny, with node traffic not allowed either: a
/// client outside the node, behind a router, talks to a pod whose link to it has a
/// smaller MTU. The node sends "fragmentation needed" to the pod; that error, about a
/// tracked connection, must pass (RELATED) or the transfer stalls.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn path_mtu_discovery_works_under_default_deny() {
    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-outside, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{ipBlock: {cidr: 10.98.0.0/24}}, {ipBlock: {cidr: "fd02::/64"}}], ports: [{port: 80}]}]
"#;
    let lab = Lab::with_agent(
        "pmtu",
        &[("pods.yaml", PODS), ("policy.yaml", policy)],
        &["--deny-host-traffic"],
    );
    lab.wait();
    let node = lab.status()["nodes"][0]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    // Named under the lab's prefix: `lab down` (the guard) removes them too.
    let (router, outside) = (
        format!("np-{}-zrouter", lab.name),
        format!("np-{}-zoutside", lab.name),
    );
    ip(&["netns", "add", &router]);
    ip(&["netns", "add", &outside]);
    // Routers before their links come up, so the links start in router mode.
    for ns in [&node, &router] {
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            ip(&["netns", "exec", ns, "sysctl", "-qw", key]);
        }
    }
    // node up0 (MTU 1280) ── dn0 router ex0 ── eth0 outside (MTU 1500)
    ip(&[
        "-n", &node, "link", "add", "up0", "mtu", "1280", "type", "veth", "peer", "name", "dn0",
        "netns", &router, "mtu", "1280",
    ]);
    ip(&[
        "-n", &router, "link", "add", "ex0", "type", "veth", "peer", "name", "eth0", "netns",
        &outside,
    ]);
    for (ns, dev, v4, v6) in [
        (&node, "up0", "10.99.0.1/30", "fd01::1/64"),
        (&router, "dn0", "10.99.0.2/30", "fd01::2/64"),
        (&router, "ex0", "10.98.0.1/24", "fd02::1/64"),
        (&outside, "eth0", "10.98.0.2/24", "fd02::2/64"),
    ] {
        ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
        ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    ip(&["-n", &router, "link", "set", "lo", "up"]);
    ip(&["-n", &outside, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &node,
        "route",
        "add",
        "10.98.0.0/24",
        "via",
        "10.99.0.2",
    ]);
    ip(&["-n", &node, "route", "add", "fd02::/64", "via", "fd01::2"]);
    ip(&[
        "-n",
        &router,
        "route",
        "add",
        "10.244.0.0/24",
        "via",
        "10.99.0.1",
    ]);
    ip(&["-n", &router, "route", "add", "fd00::/96", "via", "fd01::1"]);
    ip(&[
        "-n",
        &outside,
        "route",
        "add",
        "default",
        "via",
        "10.98.0.1",
    ]);
    ip(&["-n", &outside, "route", "add", "default", "via", "fd02::1"]);
    let a = lab.pod_net("x/a");
    for to in [a.v4, a.v6] {
        let related_before = lab.agent_count("allowed", "RELATED", "ingress");
        let mut s = connect_when_routed(&outside, to);
        // 1 MiB each way in 64 KiB writes: the server's full-size segments do not fit
        // the node's uplink, so it must learn the path MTU from the node's ICMP error
        // (fragmentation needed / packet too big).
        let mut writer = s.try_clone().unwrap();
        const TOTAL: usize = 1 << 20;
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let chunk = vec![0x42u8; 64 << 10];
            for _ in 0..TOTAL / chunk.len() {
                writer.write_all(&chunk).unwrap();
            }
        });
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut got = vec![0u8; TOTAL];
        std::io::Read::read_exact(&mut s, &mut got).unwrap_or_else(|e| {
            panic!(
                "{to}: the echo stalled ({e}): path MTU discovery failed; counters: {:?}",
                lab.agent_counters().0
            )
        });
        sender.join().unwrap();
        assert!(got.iter().all(|b| *b == 0x42));
        let related = lab.agent_count("allowed", "RELATED", "ingress") - related_before;
        assert!(
            related >= 1,
            "{to}: the node's ICMP error passed as RELATED"
        );
        eprintln!(
            "{to}: 1 MiB echoed over a 1280-byte hop; {related} ICMP errors passed as RELATED"
        );
    }
}
