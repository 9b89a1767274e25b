//! Lab names, paths and states.

use super::*;

#[test]
fn lab_names_are_short_lowercase_alphanumerics() {
    for ok in ["a", "lab1", "abcdefghijkl", "0"] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "a-b", "Lab", "abcdefghijklm", "a/b", "a b", "é"] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn veth_names_fit_ifnamsiz_and_differ_across_labs_and_pods() {
    let v = veth_name("lab", "x", "a");
    assert!(v.len() <= 15 && v.starts_with("np"), "{v}");
    assert_eq!(v, veth_name("lab", "x", "a"), "stable");
    let all = [
        veth_name("lab", "x", "a"),
        veth_name("lab2", "x", "a"),
        veth_name("lab", "y", "a"),
        veth_name("lab", "x", "b"),
        veth_name("lab", "xa", ""),
        veth_name("lab", "x-a", "b"),
        veth_name("lab", "x", "a-b"),
    ];
    let unique: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len());
}

#[test]
fn netns_prefixes_do_not_collide_between_labs() {
    let a = netns_prefix("a");
    assert!(!pod_netns("ab", "x", "p").starts_with(&a));
    assert!(!node_netns("ab").starts_with(&a));
    assert!(pod_netns("a", "x", "p").starts_with(&a));
}

#[test]
fn state_json_reads_as_lab_status() {
    let state = LabState {
        status: LabStatus {
            name: "t".into(),
            nodes: vec![NodeStatus {
                name: "node0".into(),
                netns: node_netns("t"),
                agent_pid: Some(7),
                ..Default::default()
            }],
            pods: vec![],
            services: vec![],
        },
        supervisor_pid: 42,
        pod_cidr: "10.244.0.0/24".into(),
        manifests: "/m".into(),
    };
    let text = serde_json::to_string(&state).unwrap();
    let status: LabStatus = serde_json::from_str(&text).unwrap();
    assert_eq!(status, state.status);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["nodes"][0]["agent_pid"], 7);
}

#[test]
fn protocol_and_outcome_serialize_as_documented() {
    assert_eq!(serde_json::to_string(&Protocol::Tcp).unwrap(), "\"TCP\"");
    assert_eq!(serde_json::to_string(&Protocol::Udp).unwrap(), "\"UDP\"");
    assert_eq!(
        serde_json::to_string(&Outcome::Refused).unwrap(),
        "\"refused\""
    );
}
