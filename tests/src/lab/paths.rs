//! Where a lab lives: its name, state directory and files, pin roots, and the names of
//! its namespaces and veths.

use anyhow::bail;
use anyhow::Context;
use sha2::Digest;
use sha2::Sha256;
use std::path::{Path, PathBuf};

use super::*;

/// Lab names end up in netns names (`np-<name>-...`) and file paths. Lowercase
/// alphanumerics only, so the prefix `np-<name>-` of one lab can never be a prefix of
/// another lab's names ("a" vs "ab" differ at the '-').
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=12).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("invalid lab name {name:?}: use 1 to 12 lowercase letters or digits");
    }
    Ok(())
}

pub(crate) fn state_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

pub(crate) struct Paths {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub cluster: PathBuf,
    pub agent_sock: PathBuf,
    pub lab_sock: PathBuf,
    pub supervisor_log: PathBuf,
    pub agent_log: PathBuf,
    /// Records of the lab's cluster DNS.
    pub dns_records: PathBuf,
}

impl Paths {
    pub fn new(name: &str) -> Paths {
        let dir = state_dir(name);
        Paths {
            state: dir.join("state.json"),
            cluster: dir.join("cluster"),
            agent_sock: dir.join("agent.sock"),
            lab_sock: dir.join("lab.sock"),
            supervisor_log: dir.join("supervisor.log"),
            agent_log: dir.join("agent.log"),
            dns_records: dir.join("dns.json"),
            dir,
        }
    }

    /// Node `n`'s agent socket: `agent.sock` for node0 (as before), `agent-node<n>.sock`.
    pub fn agent_sock_of(&self, n: u32) -> PathBuf {
        if n == 0 {
            self.agent_sock.clone()
        } else {
            self.dir.join(format!("agent-{}.sock", node_name(n)))
        }
    }

    pub fn agent_log_of(&self, n: u32) -> PathBuf {
        if n == 0 {
            self.agent_log.clone()
        } else {
            self.dir.join(format!("agent-{}.log", node_name(n)))
        }
    }
}

pub(super) fn netns_prefix(lab: &str) -> String {
    format!("np-{lab}-")
}

/// Detaches whatever is mounted at `path` (nothing when nothing is).
pub(crate) fn unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a plain syscall on a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Where a lab's agent pins its maps and programs: a bpffs of the lab's own, mounted by
/// the supervisor (labs run in parallel, and `ip netns exec` hides /sys/fs/bpf behind a
/// fresh sysfs).
pub fn pin_root(lab: &str) -> PathBuf {
    state_dir(lab).join("bpffs")
}

/// The lab's own mount of the cgroup v2 hierarchy, where its agents hook local delivery
/// (`--cgroup`; `ip netns exec` hides /sys/fs/cgroup behind a fresh sysfs too).
pub fn cgroup_root(lab: &str) -> PathBuf {
    state_dir(lab).join("cgroup")
}

/// The pin root of node `index`'s agent: a directory of its own in the lab's bpffs.
pub fn pin_root_of(lab: &str, index: u32) -> PathBuf {
    pin_root(lab).join(format!("node{index}"))
}

#[cfg(test)]
pub(crate) fn node_netns(lab: &str) -> String {
    node_netns_of(lab, 0)
}

pub(crate) fn node_netns_of(lab: &str, index: u32) -> String {
    format!("{}{}", netns_prefix(lab), node_name(index))
}

/// The underlay joining a multi-node lab's nodes. No '-' after the prefix: pod
/// namespaces always have one (`<ns>-<pod>`), so the names cannot collide.
pub(crate) fn underlay_netns(lab: &str) -> String {
    format!("{}underlay", netns_prefix(lab))
}

pub(crate) fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("{}{namespace}-{pod}", netns_prefix(lab))
}

/// Host-side veth name: interface names are limited to 15 bytes, and veths of all labs
/// share one kernel namespace of names only within their node netns, but `ip` errors are
/// easier to read when names are unique everywhere, so hash (lab, ns, pod).
pub(crate) fn veth_name(lab: &str, namespace: &str, pod: &str) -> String {
    let mut h = Sha256::new();
    for part in [lab, namespace, pod] {
        h.update(part.as_bytes());
        h.update([0]); // separator: ("a","bc") and ("ab","c") must differ
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("np{hex}")
}

/// Writes `bytes` to `path` so that readers see either the old or the new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path without a parent")?;
    // A dot name: the dir source skips hidden files, so the agent never reads a half file.
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub(crate) fn read_state(name: &str) -> anyhow::Result<LabState> {
    validate_name(name)?;
    let path = Paths::new(name).state;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no lab named {name} is running (netpol lab up --name {name} ...)")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The last `lines` lines of a log, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
