//! The troubleshooting guides' mistakes, made on purpose in a lab: each breaks
//! something the way the guides describe, a probe shows it, `netpol observe` must
//! attribute the drop (or the surprising allow) to the right policies and rule, and
//! live `netpol explain` must agree with the probe and print the right "did you mean".
//! Then a flood: one pod floods denied datagrams while another's drops must all reach
//! `observe` and every counter stays exact. Needs root; labs have their own names and
//! guards that tear them down even when an assertion fails.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::lab::{in_netns, ip, udp_recverr, Lab, Observer};

const SECOND: Duration = Duration::from_secs(1);

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api-server}}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}, {name: http-metrics, containerPort: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: ui, namespace: front, labels: {app: frontend}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: front, labels: {app: batch}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: prometheus, namespace: monitoring, labels: {app: prometheus}}
spec: {containers: [{name: c, ports: [{containerPort: 9090}]}]}
"#;

const DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}}
"#;

/// The web frontend may call the api; `subject` is the api's label as written.
fn allow_web(subject: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-web, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: {subject}}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{port: 8080}}]
"#
    )
}

fn allow_prometheus(port: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-prometheus, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: api-server}}}}
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}
      podSelector: {{matchLabels: {{app: prometheus}}}}
    ports: [{{port: {port}}}]
"#
    )
}

/// Frontends of namespace `front` may call the api: as two peers (either matches)
/// when `split`, as one (both must).
fn api_from_frontend(split: bool) -> String {
    let dash = if split { "-" } else { " " };
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: api-from-frontend, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: api-server}}}}
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: front}}}}
    {dash} podSelector: {{matchLabels: {{app: frontend}}}}
    ports: [{{port: 8080}}]
"#
    )
}

const WEB_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: api-server}}}]
    ports: [{port: 8080}]
"#;

fn allow_dns(namespace_labels: &str, ports: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-dns, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {namespace_labels}}}
      podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}
    ports: {ports}
"#
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `act` while an observer with `filter` waits for one verdict; the verdict.
fn observed(lab: &Lab, filter: &[&str], act: impl FnOnce()) -> Value {
    let mut args = vec!["--count", "1", "-o", "json"];
    args.extend(filter);
    let obs = Observer::start(lab, &args);
    act();
    obs.next(5 * SECOND)
        .unwrap_or_else(|| panic!("no verdict for {filter:?} reached observe\n{}", lab.logs()))
}

/// Live explain; the exit code must say what `allowed` says.
fn explain(lab: &Lab, from: &str, to: &str, port: &str) -> Value {
    let (code, x) = lab.explain(from, to, port);
    assert_eq!(code == 0, x["allowed"] == true, "exit {code}: {x}");
    assert_eq!(x["live"]["node"], "node0", "{x}");
    x
}

fn has_hint(x: &Value, text: &str) -> bool {
    strings(&x["hints"]).iter().any(|h| h.contains(text))
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn the_guides_mistakes_are_attributed_by_observe_and_explained_with_did_you_mean() {
    let started = Instant::now();
    let lab = Lab::up(
        "guide",
        &[("cluster.yaml", CLUSTER), ("deny.yaml", DEFAULT_DENY)],
        &["--dns", "--agent-arg=--sample-allows=1"],
    );

    // 1. A label typo in the policy's own podSelector: it selects no pod, so the api is
    // isolated by the default deny alone and the web frontend times out.
    lab.apply(&[("web.yaml", Some(&allow_web("api")))]);
    let v = observed(&lab, &["--pod", "shop/api", "--verdict", "dropped"], || {
        assert_eq!(lab.probe("shop/web", "shop/api", 8080, "TCP"), "timeout")
    });
    assert_eq!(
        (
            &v["src"],
            &v["dst"],
            &v["direction"],
            &v["reason"],
            &v["dport"]
        ),
        (
            &"shop/web".into(),
            &"shop/api".into(),
            &"ingress".into(),
            &"POLICY_DENIED".into(),
            &8080.into()
        ),
        "{v}"
    );
    assert_eq!(strings(&v["policies"]), ["shop/default-deny"], "{v}");
    let x = explain(&lab, "shop/web", "shop/api", "8080/TCP");
    assert_eq!(x["allowed"], false);
    assert_eq!(strings(&x["ingress"]["isolating"]), ["shop/default-deny"]);
    assert!(
        has_hint(
            &x,
            "shop/allow-web podSelector selects app: api, but shop/api has app: api-server — did you mean api-server?"
        ),
        "{x}"
    );
    assert!(x["live"]["ingress"]["entries"]
        .as_array()
        .unwrap()
        .is_empty());

    // Fixed: allowed, and observe names the rule that allowed it.
    lab.apply(&[("web.yaml", Some(&allow_web("api-server")))]);
    let allowed = [
        "--pod",
        "shop/api",
        "--verdict",
        "allowed",
        "--reason",
        "policy_allowed",
    ];
    let v = observed(&lab, &allowed, || {
        assert_eq!(lab.probe("shop/web", "shop/api", 8080, "TCP"), "connected")
    });
    assert_eq!(v["reason"], "POLICY_ALLOWED", "{v}");
    assert_eq!(
        (
            &v["rule"]["policy"],
            &v["rule"]["direction"],
            &v["rule"]["rule"]
        ),
        (&"shop/allow-web".into(), &"ingress".into(), &0.into()),
        "{v}"
    );
    let x = explain(&lab, "shop/web", "shop/api", "8080/TCP");
    assert_eq!(x["ingress"]["rule"], "shop/allow-web ingress[0]", "{x}");
    assert_eq!(x["live"]["ingress"]["entries"][0]["action"], "ALLOW", "{x}");
    assert!(
        x["live"]["conntrack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| strings(&c["flags"]).contains(&"INGRESS_OK".to_string())
                && c["ingress_current"] == true),
        "the probe's connection, with a current stamp: {x}"
    );

    // 2. Prometheus scraping blocked by the namespace's default deny.
    let scrape = || lab.probe("monitoring/prometheus", "shop/api", 9090, "TCP");
    let v = observed(
        &lab,
        &[
            "--pod",
            "shop/api",
            "--port",
            "9090",
            "--verdict",
            "dropped",
        ],
        || assert_eq!(scrape(), "timeout"),
    );
    assert_eq!(
        strings(&v["policies"]),
        ["shop/allow-web", "shop/default-deny"],
        "{v}"
    );
    let x = explain(&lab, "monitoring/prometheus", "shop/api", "9090/TCP");
    assert_eq!(x["allowed"], false);
    assert!(
        x["ingress"]["why"]
            .as_str()
            .unwrap()
            .contains("isolated for ingress by shop/allow-web, shop/default-deny"),
        "{x}"
    );
    assert!(strings(&x["hints"]).is_empty(), "{x}");
    // The fix names a port the api does not define.
    lab.apply(&[("prometheus.yaml", Some(&allow_prometheus("metrics")))]);
    assert_eq!(scrape(), "timeout");
    let x = explain(&lab, "monitoring/prometheus", "shop/api", "9090/TCP");
    assert!(
        has_hint(
            &x,
            "shop/allow-prometheus ingress[0] names the port \"metrics\", which shop/api does not define (its container ports: http, http-metrics)"
        ),
        "{x}"
    );
    lab.apply(&[("prometheus.yaml", Some(&allow_prometheus("http-metrics")))]);
    assert_eq!(scrape(), "connected");
    let x = explain(&lab, "monitoring/prometheus", "shop/api", "9090/TCP");
    assert_eq!(x["ingress"]["rule"], "shop/allow-prometheus ingress[0]");

    // 3. OR for AND: a namespaceSelector and a podSelector as two peers let every pod of
    // namespace front in, not only its frontends.
    lab.apply(&[("frontend.yaml", Some(&api_from_frontend(true)))]);
    let allowed = [
        "--pod",
        "front/batch",
        "--direction",
        "ingress",
        "--verdict",
        "allowed",
    ];
    let v = observed(&lab, &allowed, || {
        assert_eq!(
            lab.probe("front/batch", "shop/api", 8080, "TCP"),
            "connected"
        )
    });
    assert_eq!(v["rule"]["policy"], "shop/api-from-frontend", "{v}");
    let x = explain(&lab, "front/batch", "shop/api", "8080/TCP");
    assert_eq!(x["ingress"]["rule"], "shop/api-from-frontend ingress[0]");
    assert!(
        has_hint(
            &x,
            "shop/api-from-frontend ingress[0] lists a namespaceSelector and a podSelector as two peers"
        ),
        "{x}"
    );
    lab.apply(&[("frontend.yaml", Some(&api_from_frontend(false)))]);
    let v = observed(
        &lab,
        &["--pod", "front/batch", "--verdict", "dropped"],
        || assert_eq!(lab.probe("front/batch", "shop/api", 8080, "TCP"), "timeout"),
    );
    assert_eq!(
        strings(&v["policies"]),
        [
            "shop/allow-prometheus",
            "shop/allow-web",
            "shop/api-from-frontend",
            "shop/default-deny"
        ],
        "{v}"
    );
    assert_eq!(lab.probe("front/ui", "shop/api", 8080, "TCP"), "connected");
    assert_eq!(
        explain(&lab, "front/batch", "shop/api", "8080/TCP")["allowed"],
        false
    );

    // 4. Egress allowed to the api but not DNS: the api is reachable, its name is not.
    let name = "api.shop.pod.cluster.local";
    assert_eq!(lab.resolve("shop/web", name, false), "answered");
    lab.apply(&[("web-egress.yaml", Some(WEB_EGRESS))]);
    let dns_drop = |tcp: bool| {
        let proto = if tcp { "tcp" } else { "udp" };
        let filter = [
            "--pod",
            "shop/web",
            "--protocol",
            proto,
            "--port",
            "53",
            "--verdict",
            "dropped",
        ];
        let v = observed(&lab, &filter, || {
            assert_eq!(lab.resolve("shop/web", name, tcp), "timeout")
        });
        assert_eq!(
            (&v["verdict"], &v["direction"], &v["src"], &v["dst"]),
            (
                &"dropped".into(),
                &"egress".into(),
                &"shop/web".into(),
                &"kube-system/coredns".into()
            ),
            "{v}"
        );
        strings(&v["policies"])
    };
    assert_eq!(dns_drop(false), ["shop/web-egress"]);
    assert_eq!(lab.probe("shop/web", "shop/api", 8080, "TCP"), "connected");
    let x = explain(&lab, "shop/web", "shop/api", "8080/TCP");
    assert_eq!(x["allowed"], true);
    assert_eq!(x["egress"]["rule"], "shop/web-egress egress[0]");
    assert!(
        has_hint(
            &x,
            "the egress of shop/web allows this flow but not DNS (UDP/53 to kube-system/coredns is denied)"
        ),
        "{x}"
    );

    // 5. The DNS rule selects the namespace by `name:`, a label it does not carry.
    let both = "[{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]";
    lab.apply(&[("dns.yaml", Some(&allow_dns("{name: kube-system}", both)))]);
    assert_eq!(dns_drop(false), ["shop/allow-dns", "shop/web-egress"]);
    let x = explain(&lab, "shop/web", "kube-system/coredns", "53/UDP");
    assert_eq!(x["allowed"], false);
    assert!(
        has_hint(
            &x,
            "shop/allow-dns egress[0] selects namespaces by `name: kube-system`, a label namespace kube-system does not carry; did you mean `kubernetes.io/metadata.name: kube-system`?"
        ),
        "{x}"
    );

    // 6. DNS allowed over UDP only: small answers work, a TCP query does not.
    let by_name = "{kubernetes.io/metadata.name: kube-system}";
    lab.apply(&[(
        "dns.yaml",
        Some(&allow_dns(by_name, "[{protocol: UDP, port: 53}]")),
    )]);
    assert_eq!(lab.resolve("shop/web", name, false), "answered");
    assert_eq!(dns_drop(true), ["shop/allow-dns", "shop/web-egress"]);
    let x = explain(&lab, "shop/web", "kube-system/coredns", "53/TCP");
    assert_eq!(x["allowed"], false);
    assert!(
        has_hint(
            &x,
            "shop/allow-dns egress[0] allows port 53 over UDP, but this flow is TCP"
        ),
        "{x}"
    );
    let x = explain(&lab, "shop/web", "kube-system/coredns", "53/UDP");
    assert_eq!(x["egress"]["rule"], "shop/allow-dns egress[0]", "{x}");
    assert!(
        strings(&explain(&lab, "shop/web", "shop/api", "8080/TCP")["hints"]).is_empty(),
        "DNS is allowed now"
    );
    eprintln!("six scenarios in {:?}", started.elapsed());
}

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
