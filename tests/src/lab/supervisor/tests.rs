//! The supervisor's pure parts: addresses, ports, placement.

use super::*;

fn key(ns: &str, pod: &str) -> PodKey {
    (ns.into(), pod.into())
}

#[test]
fn cidr_parsing_normalises_and_rejects_nonsense() {
    let c = PodCidr::parse("10.244.0.7/24").unwrap();
    assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 0, 1));
    assert_eq!(c.prefix(), 24);
    for bad in [
        "10.244.0.0",
        "10.244.0.0/31",
        "x/24",
        "10.244.0.0/abc",
        "::1/64",
    ] {
        assert!(PodCidr::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn addresses_start_at_two_and_stay_with_their_pod() {
    let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
    let a = pool.assign(&key("x", "a"), None).unwrap();
    let b = pool.assign(&key("x", "b"), None).unwrap();
    assert_eq!(a, Ipv4Addr::new(10, 244, 0, 2));
    assert_eq!(b, Ipv4Addr::new(10, 244, 0, 3));
    // Stable: asking again (even with another wish) gives the same address.
    assert_eq!(
        pool.assign(&key("x", "a"), Some(Ipv4Addr::new(10, 244, 0, 9)))
            .unwrap(),
        a
    );
    // A freed address is reused by the next new pod; the others do not move.
    pool.release(&key("x", "a"));
    assert_eq!(pool.assign(&key("x", "c"), None).unwrap(), a);
    assert_eq!(pool.assign(&key("x", "b"), None).unwrap(), b);
}

#[test]
fn a_pod_that_comes_back_gets_its_address_back_when_free() {
    let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
    let a = pool.assign(&key("x", "a"), None).unwrap();
    let b = pool.assign(&key("x", "b"), None).unwrap();
    pool.release(&key("x", "a"));
    pool.release(&key("x", "b"));
    assert_eq!(pool.assign(&key("x", "b"), None).unwrap(), b);
    assert_eq!(pool.assign(&key("x", "a"), None).unwrap(), a);
    // Taken meanwhile: a fresh one.
    pool.release(&key("x", "a"));
    assert_eq!(pool.assign(&key("x", "c"), None).unwrap(), a);
    assert_ne!(pool.assign(&key("x", "a"), None).unwrap(), a);
}

#[test]
fn status_pod_ip_is_honoured_when_usable() {
    let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
    let want = Ipv4Addr::new(10, 244, 0, 50);
    assert_eq!(pool.assign(&key("x", "a"), Some(want)).unwrap(), want);
    // Taken, the gateway, or outside the CIDR: the lowest free address instead.
    for wish in [
        want,
        Ipv4Addr::new(10, 244, 0, 1),
        Ipv4Addr::new(10, 0, 0, 5),
        Ipv4Addr::new(10, 244, 0, 255),
    ] {
        let ip = pool
            .assign(&key("y", &wish.to_string()), Some(wish))
            .unwrap();
        assert_ne!(ip, wish);
    }
}

#[test]
fn the_pool_runs_out() {
    let mut pool = IpPool::new(PodCidr::parse("10.0.0.0/30").unwrap());
    assert_eq!(
        pool.assign(&key("x", "a"), None).unwrap(),
        Ipv4Addr::new(10, 0, 0, 2)
    );
    let err = pool.assign(&key("x", "b"), None).unwrap_err().to_string();
    assert!(err.contains("x/b"), "{err}");
}

#[test]
fn ports_come_from_containers_with_tcp_as_default() {
    let pod: Pod = serde_yaml::from_str(
        r#"
metadata: {name: a, namespace: x}
spec:
  containers:
  - name: c1
    ports: [{containerPort: 81}, {containerPort: 80, protocol: TCP}, {containerPort: 53, protocol: UDP}]
  - name: c2
    ports: [{containerPort: 80}, {containerPort: 9, protocol: SCTP}]
"#,
    )
    .unwrap();
    assert_eq!(
        Ports::of(&pod),
        Ports {
            tcp: vec![80, 81],
            udp: vec![53]
        }
    );
}

#[test]
fn placed_pods_are_running_on_node0_with_the_lab_address() {
    let pod: Pod = serde_yaml::from_str("metadata: {name: a}\nstatus: {phase: Pending}").unwrap();
    let ip = Ipv4Addr::new(10, 244, 0, 4);
    let placed = place(&pod, &[ip.into(), crate::lab::netns::ipv6_of(ip).into()], 0);
    assert_eq!(placed.spec.unwrap().node_name.as_deref(), Some("node0"));
    let status = placed.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.4"));
    assert_eq!(status.pod_ips.unwrap()[0].ip, "10.244.0.4");
    assert_eq!(pod_key(&pod), Some(key("default", "a")));
}

#[test]
fn finished_pods_do_not_run_and_host_network_pods_run_on_the_node() {
    let parse = |y: &str| serde_yaml::from_str::<Pod>(y).unwrap();
    assert!(runs_in_lab(&parse("metadata: {name: a}")));
    assert!(!runs_in_lab(&parse(
        "metadata: {name: a}\nstatus: {phase: Succeeded}"
    )));
    assert!(!runs_in_lab(&parse(
        "metadata: {name: a}\nstatus: {phase: Failed}"
    )));
    let host = parse("metadata: {name: a}\nspec: {hostNetwork: true, containers: []}");
    assert!(runs_in_lab(&host) && is_host_network(&host));
}
