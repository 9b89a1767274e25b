//! Attacks on the paths of Service traffic, in a lab (real agents, the lab's
//! kube-proxy, real connections): packets that kube-proxy DNATs (and masquerades)
//! where no check after DNAT sat, or whose verdict outlived the Service. Each test failed
//! on the code before its fix. Needs root; each lab has its own name and is torn down
//! when the test ends, failed or not.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::lab::{in_netns, Lab};

const SERVICE_GONE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: x, labels: {app: api}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-api, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]}]
"#;

const API_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: x}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: http}]}
"#;

/// A Service removed (or added) changes how a connection to its address is judged, but
/// used to leave every connection's stamp current: a client's connection to a VIP that
/// is no longer one went on passing on its old verdict, its packets now leaving
/// un-NATed for wherever the address routes. A change of the Service set starts a new
/// epoch: the next packet is judged again (here: egress to an address the client may
/// not reach, revoked).
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_connection_to_a_removed_services_address_is_judged_again() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    use support::lab::in_netns;
    let lab = Lab::cluster(
        "hsvc",
        1,
        &[("x.yaml", SERVICE_GONE), ("svc.yaml", API_SERVICE)],
    );
    let rows = lab.probe_rows(&["--via", "service", "--to", "x/api", "--port", "8080"]);
    let row = rows
        .iter()
        .find(|r| r[0] == "x/client")
        .expect("client's probe");
    assert_eq!(row[2], "connected", "{rows:?}");
    let vip = std::net::SocketAddr::new(row[3].parse().expect("the VIP"), 80);
    let (client, _) = lab.pod("x/client");
    let mut conn = in_netns(&client, move || {
        let mut c = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
        let mut greeting = [0u8; 64];
        assert!(c.read(&mut greeting).unwrap() > 0);
        c
    });
    lab.apply(&[("svc.yaml", None)]);
    let revoked = || lab.agent_count("dropped", "POLICY_REVOKED", "egress");
    let before = revoked();
    conn.write_all(b"anyone?").unwrap();
    // The signal: the client's next segment (or its retransmission) judged and dropped.
    let deadline = Instant::now() + Duration::from_secs(20);
    while revoked() == before {
        assert!(
            Instant::now() < deadline,
            "the connection to the removed Service's address passed on its old verdict"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two hostNetwork backends of one Service: on the client's node (a packet DNATed to it
/// is delivered to a local socket and meets no TC hook after DNAT) and on the other
/// node (reached through the node's uplink, not the overlay).
const HOST_BACKENDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host0, namespace: x, labels: {app: host}}
spec:
  nodeName: node0
  hostNetwork: true
  containers: [{name: s, ports: [{containerPort: 9100}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: host1, namespace: x, labels: {app: host}}
spec:
  nodeName: node1
  hostNetwork: true
  containers: [{name: s, ports: [{containerPort: 9100}]}]
---
apiVersion: v1
kind: Service
metadata: {name: host, namespace: x}
spec:
  selector: {app: host}
  ports: [{port: 80, targetPort: 9100}]
"#;

/// The client's egress allowed to these addresses on 9100 (none: denied everywhere).
fn egress_to_addresses(addrs: &[&str]) -> String {
    let to: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ipBlock: {{cidr: {a}/32}}}}"))
        .collect();
    let rules = match to.is_empty() {
        true => String::new(),
        false => format!(
            "  egress: [{{to: [{}], ports: [{{port: 9100}}]}}]\n",
            to.join(", ")
        ),
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-egress, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n{rules}"
    )
}

/// A pod's connection to a Service whose backend is a hostNetwork endpoint used to
/// pass unjudged: DNATed to this node's own address, it was delivered to the local
/// socket with no hook after DNAT; DNATed to another node's, it left by the uplink,
/// where no post-DNAT check sat unless named by `--service-hook`. The first is judged
/// on local delivery (`local_in`), the second at `to_remote` on every way off the node.
/// 20 connections land on either backend at random: each backend's verdict is seen.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_service_connection_to_a_host_network_backend_is_judged_on_this_node_and_the_other() {
    let lab = Lab::cluster(
        "hostbe",
        2,
        &[
            ("host.yaml", HOST_BACKENDS),
            ("policy.yaml", &egress_to_addresses(&[])),
        ],
    );
    lab.wait();
    let nodes = lab.status()["nodes"].clone();
    let underlay = |n: usize| nodes[n]["underlay_ip"].as_str().unwrap().to_string();
    let (here, there) = (underlay(0), underlay(1));
    let tally = |lab: &Lab| {
        let mut t = std::collections::BTreeMap::<String, usize>::new();
        let rows = lab.probe_rows(&[
            "--service",
            "x/host",
            "--from",
            "x/client",
            "--port",
            "80",
            "--repeat",
            "20",
        ]);
        for [_, _, result, _, backend] in rows {
            let k = if result == "connected" {
                backend
            } else {
                result
            };
            *t.entry(k).or_default() += 1;
        }
        t
    };
    // Denied egress: no backend answers, on this node or the other.
    let t = tally(&lab);
    assert_eq!(t.get("timeout"), Some(&20), "egress denied, yet: {t:?}");
    // Allowed to both: both answer (the hooks judge, they do not just drop).
    lab.write("policy.yaml", &egress_to_addresses(&[&here, &there]));
    lab.wait();
    let t = tally(&lab);
    assert!(
        t.contains_key("x/host0") && t.contains_key("x/host1") && !t.contains_key("timeout"),
        "egress allowed to both backends: {t:?}"
    );
    // Allowed to the other node's only: this node's backend no longer answers.
    lab.write("policy.yaml", &egress_to_addresses(&[&there]));
    lab.wait();
    let t = tally(&lab);
    assert!(
        !t.contains_key("x/host0") && t.contains_key("x/host1"),
        "egress allowed only to {there}: {t:?}"
    );
    lab.remove("policy.yaml");
}

/// A NodePort Service whose one backend, x/web on node0, takes no ingress at all; x/client
/// on node0 may reach anything but pods.
const NODE_PORT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: x, labels: {app: web}}
spec: {nodeName: node0, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.244.0.0/16]}}]}]
"#;

/// x/web's ingress: none, or from anywhere (an ipBlock).
fn web_ingress(from_anywhere: bool) -> String {
    let rules = if from_anywhere {
        "  ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}}]}]\n"
    } else {
        ""
    };
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-ingress, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n{rules}")
}

/// Whether a TCP connection from namespace `netns` to `to` gets the server's greeting.
fn answers(netns: &str, to: SocketAddr) -> bool {
    in_netns(netns, move || {
        let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = [0u8; 64];
        matches!(c.read(&mut greeting), Ok(n) if n > 0)
    })
}

/// kube-proxy DNATs a NodePort to a backend and masquerades it to the node's address;
/// the classifier used to take that for the node's own traffic and allow it: from
/// outside (here node1, which is no pod) into a backend whose ingress allows nothing, and
/// from a pod whose egress may reach no pod (judged as egress to the node's address, then
/// DNATed to one). Only what the node sends itself is host traffic; the pod's packet to a
/// NodePort is judged on the backend like one to a ClusterIP.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_node_port_reaches_no_backend_its_policies_deny() {
    let lab = Lab::cluster(
        "nport",
        2,
        &[
            ("web.yaml", NODE_PORT),
            ("ingress.yaml", &web_ingress(false)),
        ],
    );
    lab.wait();
    let node0 = lab.status()["nodes"][0]["underlay_ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let node_port = SocketAddr::new(node0, 30080);
    let outside = format!("np-{}-node1", lab.name);
    let (client, _) = lab.pod("x/client");
    let denied = |dir| lab.agent_count("dropped", "POLICY_DENIED", dir);
    let before = denied("ingress");
    assert!(
        !answers(&outside, node_port),
        "from outside, ingress denied"
    );
    assert!(
        denied("ingress") > before,
        "dropped by web's ingress policy"
    );
    let before = denied("egress");
    assert!(
        !answers(&client, node_port),
        "from a pod, egress to pods denied"
    );
    assert!(
        denied("egress") > before,
        "dropped by client's egress policy"
    );
    // Ingress from anywhere: the outside is let in, the pod still may not reach a pod.
    lab.write("ingress.yaml", &web_ingress(true));
    lab.wait();
    assert!(answers(&outside, node_port), "judged, not just dropped");
    let before = denied("egress");
    assert!(!answers(&client, node_port), "egress judged on the backend");
    assert!(denied("egress") > before);
    // The pod's egress to the backend allowed: it answers.
    let allowed = NODE_PORT.replace(
        "except: [10.244.0.0/16]}}]}]",
        "except: [10.244.0.0/16]}}, {podSelector: {matchLabels: {app: web}}}]}]",
    );
    assert_ne!(allowed, NODE_PORT);
    lab.write("web.yaml", &allowed);
    lab.wait();
    assert!(answers(&client, node_port), "egress allowed to the backend");
}
