//! The hook on local delivery: `local_in` at cgroup_skb ingress of the node's cgroup
//! tree. A packet a pod sent to a Service VIP that kube-proxy DNATs to the node itself
//! (a hostNetwork backend, the API server on a control-plane node) is delivered to a
//! local socket: no TC hook sees it after DNAT, so its client's egress is judged there.
//!
//! The link is pinned beside the versions (`<root>/local_in_link`): like the TC filters
//! it outlives the agent, and a new agent swaps its program in (`BPF_LINK_UPDATE`),
//! never leaving a gap. Removing the pin (the lab unmounting its bpffs) detaches it.
//! The program sees every namespace's sockets under the cgroup; it judges only packets
//! of the node's namespace (`Config::netns_cookie`).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};

/// How a hook that did not attach is named among the missing Service hooks.
pub const MISSING: &str = "the local delivery hook";

/// The name of the link's pin under the pin root.
pub const LINK_PIN: &str = "local_in_link";

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain syscalls on a socket owned here.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// The first cgroup v2 mount this process sees (`/proc/self/mountinfo`), if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find_cgroup2(&info)
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // <id> <parent> <dev> <root> <mount point> <options> [optional...] - <type> ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let root = left.split_whitespace().nth(3)?;
        let point = left.split_whitespace().nth(4)?;
        // The root of the hierarchy: a bind mount of a subtree covers only that subtree.
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// The hook on local delivery as the datapath keeps it: the cgroup it is wanted on
/// (None: `--cgroup off`) and whether this agent has attached it.
#[derive(Debug, Default)]
pub struct LocalHook {
    cgroup: Option<PathBuf>,
    attached: bool,
}

impl LocalHook {
    pub fn new(cgroup: Option<PathBuf>) -> LocalHook {
        LocalHook {
            cgroup,
            attached: false,
        }
    }

    /// Whether nothing judges packets DNATed to this node: the hook is wanted, and
    /// neither this agent nor a previous one (its link still pinned at `link_pin`)
    /// holds it. The classifier then drops egress to VIPs (`SERVICE_UNHOOKED`).
    pub fn unhooked(&self, link_pin: Option<&Path>) -> bool {
        self.cgroup.is_some() && !self.attached && !link_pin.is_some_and(Path::exists)
    }

    /// Attaches `prog` unless it is already; [`MISSING`] when that failed.
    pub fn sync(&mut self, prog: &mut CgroupSkb, link_pin: &Path) -> Option<String> {
        let cgroup = self.cgroup.as_ref().filter(|_| !self.attached)?;
        match attach(prog, cgroup, link_pin) {
            Ok(()) => {
                tracing::info!(cgroup = %cgroup.display(), "local delivery hook attached");
                self.attached = true;
                None
            }
            Err(e) => {
                tracing::error!(cgroup = %cgroup.display(), error = ?e, "attaching the local delivery hook failed; egress of isolated pods to Services drops (SERVICE_UNHOOKED) until it is attached; will retry");
                Some(MISSING.to_string())
            }
        }
    }

    /// Whether there is something left to attach.
    pub fn pending(&self) -> bool {
        self.cgroup.is_some() && !self.attached
    }
}

/// Attaches `prog` at cgroup_skb ingress of `cgroup`, or, when a previous agent's link
/// is pinned at `link_pin`, puts `prog` in its place.
pub fn attach(prog: &mut CgroupSkb, cgroup: &Path, link_pin: &Path) -> anyhow::Result<()> {
    if link_pin.exists() {
        let link = obj_get(link_pin)
            .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
        link_update(&link, prog.fd()?.as_fd().as_raw_fd())
            .with_context(|| format!("replacing the program of {}", link_pin.display()))?;
        return Ok(());
    }
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    let id = prog
        .attach(
            &dir,
            CgroupSkbAttachType::Ingress,
            // A BPF link (Linux 5.7+, as aya uses there) always sits beside others;
            // `BPF_F_ALLOW_MULTI` is for the older attach and makes link_create fail.
            CgroupAttachMode::Single,
        )
        .with_context(|| format!("attaching local_in to the cgroup {}", cgroup.display()))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(link_pin)
        .with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 3]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr prefix of the command's size, living across
    // the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7; // enum bpf_cmd
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // { pathname: u64, bpf_fd: u32, file_flags: u32, ... }
    let mut attr = [name.as_ptr() as u64, 0, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new descriptor the kernel handed to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: &OwnedFd, prog_fd: i32) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29; // enum bpf_cmd
                                              // { link_fd: u32, new_prog_fd: u32, flags: u32, old_prog_fd: u32 }
    let mut attr = [
        link.as_raw_fd() as u32 as u64 | (prog_fd as u32 as u64) << 32,
        0,
        0,
    ];
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_the_one_of_the_hierarchys_root() {
        let info = "\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw
33 25 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 25 0:35 /kubepods /run/sub rw - cgroup2 cgroup2 rw
41 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("33 25 0:29 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn this_namespace_has_a_cookie() {
        assert!(netns_cookie().unwrap() > 0);
    }
}
