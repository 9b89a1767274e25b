//! The troubleshooting guides' mistakes, made on purpose in a lab: each breaks
//! something the way the guides describe, a probe shows it, `netpol observe` must
//! attribute the drop (or the surprising allow) to the right policies and rule, and
//! live `netpol explain` must agree with the probe and print the right "did you mean".
//! Needs root; labs have their own names and guards that tear them down even when an
//! assertion fails.

mod support;

use serde_json::Value;
use std::time::Instant;
use support::lab::{strings, Lab, Observer, SECOND};

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
