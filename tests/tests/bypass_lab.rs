//! Attacks that need a lab: real frames from a pod's packet socket and the kernel's own
//! answer to them, a real agent's discovery and hooks (the crafted-frame attacks are in
//! `bypass.rs`). Each test failed on the code before its fix. Needs root; each lab has
//! its own name and is torn down when the test ends, failed or not.

mod support;

use support::lab::{signal_and_wait, Lab};
use support::packet::{arp, frame_between};

/// The post-DNAT hook (`to_remote` on `flannel.1`, where deferred Service egress meets
/// the client's policy) used to go with the agent: a clean exit or a rolling update
/// detached it, and DNATed packets to remote backends left unjudged until the next
/// agent attached it again. It stays, and a new agent replaces its program in place;
/// so does the hook on local delivery (`local_in`).
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn the_post_dnat_hook_stays_when_the_agent_exits() {
    let lab = Lab::cluster(
        "hook",
        2,
        &[(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )],
    );
    let node = lab.status()["nodes"][0].clone();
    let netns = node["netns"].as_str().unwrap().to_string();
    let hooked = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "tc",
                "filter",
                "show",
                "dev",
                "flannel.1",
                "egress",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("to_remote")
    };
    // The hook on local delivery: a link on the cgroup, held by its pin.
    let link = netpol_tests::lab::pin_root_of(&lab.name, 0).join("local_in_link");
    assert!(hooked(), "the agent hooks flannel.1");
    assert!(link.exists(), "the agent hooks local delivery");
    let pid = node["agent_pid"].as_i64().unwrap() as i32;
    signal_and_wait(pid, libc::SIGTERM);
    assert!(hooked(), "the hook outlives a clean exit of the agent");
    assert!(link.exists(), "so does the one on local delivery");
}

/// A sync that fails half-way (here the policy map fills up) used to leave the epoch
/// alone: connections judged against its partial entries kept current stamps for as
/// long as the retries failed. It bumps the epoch, so they are judged again.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_sync_that_fails_half_way_still_starts_a_new_epoch() {
    let lab = Lab::up(
        "hsync",
        &[("pods.yaml", support::manifests::PODS)],
        &["--agent-arg=--policy-capacity=8"],
    );
    lab.wait();
    let epoch = || {
        use aya::maps::{Array, Map, MapData};
        let path = netpol_tests::lab::pin_root_of(&lab.name, 0)
            .join(netpol_common::PIN_VERSION)
            .join("maps/NP_CONFIG");
        let map = Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap();
        let config: Array<MapData, netpol_common::Config> = Array::try_from(map).unwrap();
        config.get(&0, 0).unwrap().epoch
    };
    let before = epoch();
    // 40 ports, 40 entries or more: more than the map holds.
    let ports: Vec<String> = (1000..1040).map(|p| format!("{{port: {p}}}")).collect();
    lab.write(
        "many.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: many, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{ports: [{}]}}]}}\n",
            ports.join(", ")
        ),
    );
    // The agent's own account of the failure is the signal to look for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lab.logs().contains("datapath sync failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed sync:\n{}",
            lab.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        epoch() > before,
        "a new epoch after the failed sync (was {before})"
    );
}

/// The attack as a pod runs it, on a lab node: pod x/a sends pod y/c a gratuitous ARP
/// (its raw socket, unicast to c's MAC) saying that x/b's address is at a's MAC. c used
/// to take it, and its traffic for b then went to a. Dropped at a's veth; c's entry
/// stays.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_gratuitous_arp_claiming_another_pods_address_moves_no_neighbour_entry() {
    use support::lab::ip;
    use support::raw::{mac_of, send_frame};
    let lab = Lab::up("harp", &[("pods.yaml", support::manifests::PODS)], &[]);
    lab.wait();
    let (attacker, _) = lab.pod("x/a");
    let (victim, victim_ip) = lab.pod("x/b");
    let (third, _) = lab.pod("y/c");
    let v4 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v) => v.octets(),
        _ => unreachable!(),
    };
    let (a_mac, b_mac, c_mac) = (mac_of(&attacker), mac_of(&victim), mac_of(&third));
    let hex = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    // c knows b (a gratuitous ARP updates a known entry, whatever its lock time).
    let b = victim_ip.to_string();
    ip(&[
        "-n",
        &third,
        "neigh",
        "replace",
        &b,
        "lladdr",
        &hex(b_mac),
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    let entry = || {
        let v: serde_json::Value = serde_json::from_str(&ip(&[
            "-n", &third, "-j", "neigh", "show", &b, "dev", "eth0",
        ]))
        .unwrap();
        v[0]["lladdr"].as_str().unwrap_or_default().to_string()
    };
    let dropped = || lab.agent_count("dropped", "SPOOFED_SOURCE", "egress");
    let before = dropped();
    let spoof = arp(1, (a_mac, v4(victim_ip)), ([0; 6], v4(victim_ip)));
    send_frame(&attacker, frame_between(c_mac, a_mac, 0x0806, spoof));
    // Whichever comes first: the drop counted, or c's entry moved.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while dropped() == before {
        assert_ne!(entry(), hex(a_mac), "c's entry for b moved to the attacker");
        assert!(
            std::time::Instant::now() < deadline,
            "the spoofed reply was never judged"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(entry(), hex(b_mac), "c's entry for b is b's");
}

/// A pod (NET_ADMIN in its own namespace) adds another pod's address to its interface.
/// Discovery used to move that pod's endpoint onto the newer port and detach the
/// programs of both: the victim, default-denied, was open to everyone. Now the victim
/// stays enforced on its own port, the impostor's port is held (drops), and the
/// conflict shows in `netpol status`.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_pod_claiming_another_pods_address_moves_no_endpoint() {
    use support::lab::ip;
    use support::manifests::{ALLOW_B_TO_A, DENY_X, PODS};
    let lab = Lab::up(
        "hclaim",
        &[
            ("pods.yaml", PODS),
            ("deny.yaml", DENY_X),
            ("allow.yaml", ALLOW_B_TO_A),
        ],
        &[],
    );
    lab.wait();
    // b knows a's MAC (the impostor will answer ARP for a's address too).
    assert_eq!(lab.probe("x/b", "x/a", 80, "TCP"), "connected");
    assert_eq!(
        lab.probe("x/b", "x/a", 53, "UDP"),
        "timeout",
        "a allows b on 80 only"
    );
    let (impostor, _) = lab.pod("y/c");
    let (_, victim_ip) = lab.pod("x/a");
    ip(&[
        "-n",
        &impostor,
        "addr",
        "add",
        &format!("{victim_ip}/32"),
        "dev",
        "eth0",
    ]);
    // Whichever comes first: the conflict reported, or a open to b beyond its policy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let conflicts = loop {
        let s: serde_json::Value = serde_json::from_str(&lab.agent_request("status")).unwrap();
        if let Some(c) = s["conflicts"].as_array().filter(|c| !c.is_empty()) {
            break c.clone();
        }
        assert_eq!(
            lab.probe("x/b", "x/a", 53, "UDP"),
            "timeout",
            "a lost its filters to c's claim"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no conflict reported:\n{}",
            lab.logs()
        );
    };
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["pods"], serde_json::json!(["x/a", "y/c"]));
    // a is still itself, enforced; c's port drops what c sends.
    assert_eq!(lab.probe("x/b", "x/a", 80, "TCP"), "connected");
    assert_eq!(lab.probe("x/b", "x/a", 53, "UDP"), "timeout");
    let held = || lab.agent_count("dropped", "PENDING_ENDPOINT", "egress");
    let before = held();
    assert_eq!(lab.probe("y/c", "x/b", 80, "TCP"), "timeout");
    assert!(held() > before, "c's SYN dropped by the hold");
    // The claim withdrawn, c is c again.
    ip(&[
        "-n",
        &impostor,
        "addr",
        "del",
        &format!("{victim_ip}/32"),
        "dev",
        "eth0",
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while lab.probe("x/a", "y/c", 80, "TCP") != "connected" {
        assert!(
            std::time::Instant::now() < deadline,
            "c not back:\n{}",
            lab.logs()
        );
    }
}

const SHARE_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
---
apiVersion: v1
kind: Pod
metadata: {name: v, namespace: x, labels: {app: v}}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {name: w, namespace: x, labels: {app: w}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: y, labels: {app: f}}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {name: s, namespace: y, labels: {app: s}}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: w-from-v, namespace: x}
spec:
  podSelector: {matchLabels: {app: w}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: v}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: f-udp-out, namespace: y}
spec:
  podSelector: {matchLabels: {app: f}}
  policyTypes: [Egress]
  egress: [{ports: [{protocol: UDP}]}]
"#;

/// One pod opening flows without end (300,000 UDP flows) used to turn the node's whole
/// conntrack table over, and a quiet allowed connection of two other pods lost its
/// state: its server (egress default-denied) could no longer answer. The flooder holds
/// its share and no more (here a quarter of a table of 65,536); the quiet connection,
/// idle for 10 s across the flood, still answers.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_flood_of_new_flows_from_one_pod_leaves_other_pods_connections_their_state() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    use support::lab::{in_netns, udp_recverr};
    const FLOWS: u32 = 300_000;
    let lab = Lab::up(
        "hshare",
        &[("cluster.yaml", SHARE_CLUSTER)],
        &["--agent-arg=--conntrack-capacity=65536"],
    );
    lab.wait();
    let (v_ns, _) = lab.pod("x/v");
    let (_, w) = lab.pod("x/w");
    let (f_ns, _) = lab.pod("y/f");
    let (_, s) = lab.pod("y/s");
    // v's connection to w: the greeting read, then quiet.
    let mut conn = in_netns(&v_ns, move || {
        let mut c = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(w, 80),
            Duration::from_secs(2),
        )
        .expect("v connects to w");
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut greeting = [0u8; 64];
        assert!(c.read(&mut greeting).unwrap() > 0, "w's greeting");
        c
    });
    let quiet_since = Instant::now();
    // f: 300,000 new flows (five source ports, every destination port of s), each
    // datagram sent until the veth took it.
    let sent = in_netns(&f_ns, move || {
        let sockets: Vec<_> = (0..5).map(|_| udp_recverr()).collect();
        let mut n = 0u32;
        'all: for sock in &sockets {
            for port in 1..=u16::MAX {
                if n == FLOWS {
                    break 'all;
                }
                while sock.send_to(b"f", (s, port)).is_err() {}
                n += 1;
            }
        }
        n
    });
    assert_eq!(sent, FLOWS);
    let counters: serde_json::Value = serde_json::from_str(&lab.agent_request("counters")).unwrap();
    let untracked = counters["events"]["conntrack_share_full"].as_u64().unwrap();
    assert!(
        untracked >= (FLOWS - 65_536 / 4) as u64,
        "f held no more than its share: {untracked} flows untracked"
    );
    // The idle time of the scenario, not a wait for readiness.
    if let Some(rest) = Duration::from_secs(10).checked_sub(quiet_since.elapsed()) {
        std::thread::sleep(rest);
    }
    conn.write_all(b"still there?").unwrap();
    let mut echo = [0u8; 12];
    conn.read_exact(&mut echo)
        .expect("w answers on its quiet connection after the flood");
    assert_eq!(&echo, b"still there?");
}

/// Ones' complement sum of 16-bit words (the IP and TCP checksums).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The issue's first attack, with real frames: pod x/a, default-denied like x/b, sends
/// x/b a TCP SYN inside two priority tags (802.1Q, VID 0) from its raw socket. The veth
/// moves the outer tag into the skb's metadata before TC; the classifier used to see an
/// unknown ethertype and pass it, the bridge forwarded it, b's stack stripped the tags
/// and answered (a half-open connection from a on b's port 80). Dropped at a's veth as
/// `UNKNOWN_L3`.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_syn_in_two_vlan_tags_from_a_pods_raw_socket_reaches_no_pod() {
    use std::time::{Duration, Instant};
    use support::lab::ip;
    use support::manifests::{DENY_X, PODS};
    use support::raw::{mac_of, send_frame};
    let lab = Lab::up("hvlan", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)], &[]);
    lab.wait();
    let (a_ns, a) = lab.pod("x/a");
    let (b_ns, b) = lab.pod("x/b");
    let v4 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v) => v.octets(),
        _ => unreachable!(),
    };
    let (src, dst) = (v4(a), v4(b));
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&4242u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = [&src[..], &dst, &[0, 6], &20u16.to_be_bytes()].concat();
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip4 = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip4.extend_from_slice(&src);
    ip4.extend_from_slice(&dst);
    let c = checksum(&[&ip4]);
    ip4[10..12].copy_from_slice(&c.to_be_bytes());
    let tags = [0x81, 0x00, 0, 0, 0x81, 0x00, 0, 0];
    let frame = [
        &mac_of(&b_ns)[..],
        &mac_of(&a_ns),
        &tags,
        &[0x08, 0x00],
        &ip4,
        &tcp,
    ]
    .concat();
    let dropped = || lab.agent_count("dropped", "UNKNOWN_L3", "egress");
    let before = dropped();
    send_frame(&a_ns, frame);
    // (b's server socket is dual-stack: a shows as [::ffff:a]:4242.)
    let half_open = || {
        let ss = ip(&["netns", "exec", &b_ns, "ss", "-Htn", "state", "syn-recv"]);
        ss.contains(&format!("{a}:4242")) || ss.contains(&format!("{a}]:4242"))
    };
    // Whichever comes first: the drop counted at a's veth, or b answering.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dropped() == before {
        assert!(!half_open(), "b answered a SYN in VLAN tags");
        assert!(Instant::now() < deadline, "the tagged SYN was never judged");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!half_open());
}
