//! Pinned state: maps and programs under `<root>/<PIN_VERSION>/` in bpffs, adopted by
//! the next agent so that a restart or an upgrade never opens anything.
//!
//! ```text
//! <root>/<version>/maps/NP_*        every map but the per-CPU scratch
//! <root>/<version>/programs/<name>  the programs the filters run (pods' veths, the
//!                                   Service hooks, the pod-start hold)
//! <root>/<version>/build/<digest>   which classifier build they are (a restart of the
//!                                   same build adopts them without verifying again)
//! <root>/<version>/layout/<map>:<key size>:<value size>   (empty directories: bpffs
//!                                   holds no regular files) for migrations
//! ```
//! Same version: the loader reuses the pinned maps (contents, conntrack, epoch and
//! counters survive) and the agent reads them back as its "actual" state, so its first
//! sync is a diff against what the kernel really holds. Another version (a layout
//! change): fresh maps in the new directory, conntrack copied from the old one when its
//! layout is unchanged or converted when it is one this build knows ([`v4`]), every
//! filter switched atomically to the new program once the new maps are complete, then
//! the old directory is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use netpol_common::{map, CtEntry, CtKey, PIN_VERSION};

/// Default root of pinned state in bpffs.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/netpol";

/// Every map that is pinned (all but the scratch maps, which hold nothing between packets).
/// A map added to the classifier must be added here; a test checks it.
pub const PINNED_MAPS: &[&str] = &[
    map::ENDPOINTS,
    map::IPCACHE,
    map::CIDRS,
    map::POLICY,
    map::CONNTRACK,
    map::EVENTS,
    map::COUNTERS,
    map::CONFIG,
    map::FRAGMENTS,
    map::EVENT_BUCKETS,
    map::SERVICES,
    map::NODEPORTS,
    map::SVC_PENDING,
    map::RULE_COUNTERS,
    map::ENDPOINT_COUNTERS,
    map::CT_HELD,
    map::FRAG_HELD,
];

/// Every program that is pinned; a build is adopted only when all of them are there.
const PINNED_PROGRAMS: &[&str] = &[
    netpol_common::program::FROM_POD,
    netpol_common::program::TO_POD,
    netpol_common::program::TO_REMOTE,
    netpol_common::program::HOLD_FROM_POD,
    netpol_common::program::HOLD_TO_POD,
    netpol_common::program::LOCAL_IN,
];

/// Maps that hold nothing worth pinning.
pub const UNPINNED_MAPS: &[&str] = &["NP_SCRATCH", "NP_SCRATCH_PACKET"];

/// Where one version's pinned objects live.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
    pub version: String,
}

/// What the loader found in bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned: a first start on this node.
    Nothing,
    /// This version's maps: adopted as they are.
    SameVersion,
    /// Other versions' directories (an upgrade or a downgrade): rebuilt, then removed.
    OtherVersions(Vec<String>),
}

/// Key and value sizes of every pinned map, written beside the pins. A migration copies
/// a map only when its layout is unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub version: String,
    /// map name → (key size, value size).
    pub maps: BTreeMap<String, (usize, usize)>,
}

impl Layout {
    pub fn current(version: &str) -> Layout {
        use core::mem::size_of;
        use netpol_common::*;
        let mut maps = BTreeMap::new();
        let mut put = |name: &str, k: usize, v: usize| {
            maps.insert(name.to_string(), (k, v));
        };
        put(map::ENDPOINTS, 4, size_of::<EndpointEntry>());
        put(
            map::IPCACHE,
            4 + size_of::<Addr>(),
            size_of::<IpcacheEntry>(),
        );
        put(map::CIDRS, 4 + size_of::<Addr>(), size_of::<CidrEntry>());
        put(
            map::POLICY,
            4 + size_of::<PolicyKey>(),
            size_of::<PolicyEntry>(),
        );
        put(map::CONNTRACK, size_of::<CtKey>(), size_of::<CtEntry>());
        put(map::FRAGMENTS, size_of::<FragKey>(), size_of::<FragEntry>());
        put(map::EVENT_BUCKETS, 4, size_of::<EventBucket>());
        put(map::SERVICES, size_of::<Addr>(), size_of::<ServiceEntry>());
        put(map::NODEPORTS, 4, 4);
        put(
            map::SVC_PENDING,
            size_of::<PendingKey>(),
            size_of::<PendingEntry>(),
        );
        put(map::CONFIG, 4, size_of::<Config>());
        put(map::RULE_COUNTERS, 4, size_of::<RuleCounter>());
        put(map::ENDPOINT_COUNTERS, 4, size_of::<EndpointCounters>());
        put(map::CT_HELD, 4, 8);
        put(map::FRAG_HELD, 4, 8);
        put(map::COUNTERS, 4, 8);
        put(map::EVENTS, 0, size_of::<Event>());
        Layout {
            version: version.to_string(),
            maps,
        }
    }
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> PinDir {
        PinDir::with_version(root, PIN_VERSION)
    }

    /// A directory for another version than this build's (upgrade tests).
    pub fn with_version(root: impl Into<PathBuf>, version: &str) -> PinDir {
        PinDir {
            root: root.into(),
            version: version.to_string(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.version)
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir().join("maps").join(name)
    }

    pub fn program_path(&self, name: &str) -> PathBuf {
        self.dir().join("programs").join(name)
    }

    fn layout_path(&self) -> PathBuf {
        self.dir().join("layout")
    }

    /// Looks at what is pinned under the root, before loading.
    pub fn survey(&self) -> anyhow::Result<Found> {
        if self.map_path(map::CONFIG).exists() {
            return Ok(Found::SameVersion);
        }
        let mut others = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.root) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name != self.version && entry.path().join("maps").is_dir() {
                    others.push(name);
                }
            }
        }
        others.sort();
        Ok(if others.is_empty() {
            Found::Nothing
        } else {
            Found::OtherVersions(others)
        })
    }

    /// Creates the directories (bpffs must be mounted at or above the root).
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        if !is_bpffs(&self.root) {
            anyhow::bail!(
                "{} is not on a bpffs: mount one (`mount -t bpf bpf /sys/fs/bpf`; in a pod, a \
                 hostPath volume of /sys/fs/bpf) or pass --pin-root",
                self.root.display()
            );
        }
        for sub in ["maps", "programs"] {
            let d = self.dir().join(sub);
            std::fs::create_dir_all(&d).with_context(|| {
                format!(
                    "creating {} (is bpffs mounted? `mount -t bpf bpf /sys/fs/bpf`)",
                    d.display()
                )
            })?;
        }
        Ok(())
    }

    pub fn write_layout(&self) -> anyhow::Result<()> {
        let dir = self.layout_path();
        let _ = std::fs::remove_dir_all(&dir);
        for (name, (k, v)) in Layout::current(&self.version).maps {
            let d = dir.join(format!("{name}:{k}:{v}"));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    pub fn read_layout(&self) -> Option<Layout> {
        let mut maps = BTreeMap::new();
        for entry in std::fs::read_dir(self.layout_path()).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let mut parts = name.split(':');
            let (Some(m), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            maps.insert(m.to_string(), (k.parse().ok()?, v.parse().ok()?));
        }
        Some(Layout {
            version: self.version.clone(),
            maps,
        })
    }

    /// Whether the programs pinned here are of classifier build `id`.
    pub fn has_build(&self, id: &str) -> bool {
        self.dir().join("build").join(id).is_dir()
            && PINNED_PROGRAMS
                .iter()
                .all(|p| self.program_path(p).exists())
    }

    pub fn write_build(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir().join("build");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(id)).with_context(|| format!("creating {}", dir.display()))
    }

    /// Removes this version's pins (the kernel frees the objects once nothing else
    /// references them: filters keep their programs, programs their maps).
    pub fn remove(&self) -> anyhow::Result<()> {
        std::fs::remove_dir_all(self.dir())
            .with_context(|| format!("removing {}", self.dir().display()))
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Copies the conntrack entries of another version's pinned map into `to`: field for
/// field when the layout is unchanged, converted when it is a layout this build knows
/// ([`v4`]). Either way the stamps become 0: they were made against the other
/// version's revisions and epochs, which this agent's own numbering may meet again
/// (and take for current), and a stamp of epoch 0 is never current once this agent has
/// synced, so every migrated connection is judged again at its next packet and goes on
/// if policy still allows it. Returns how many were copied (None: not copied, an
/// unknown layout).
pub fn migrate_conntrack(
    old: &PinDir,
    to: &mut HashMap<&mut MapData, CtKey, CtEntry>,
) -> anyhow::Result<Option<usize>> {
    let ours = Layout::current(PIN_VERSION);
    let Some(theirs) = old.read_layout() else {
        return Ok(None);
    };
    let theirs = theirs.maps.get(map::CONNTRACK).copied();
    if theirs == ours.maps.get(map::CONNTRACK).copied() {
        let judged_again = |e: CtEntry| CtEntry {
            egress_stamp: 0,
            ingress_stamp: 0,
            ..e
        };
        return copy_conntrack(old, to, judged_again).map(Some);
    }
    if theirs == Some(v4::CONNTRACK) {
        return copy_conntrack(old, to, v4::CtEntry::upgrade).map(Some);
    }
    Ok(None)
}

fn copy_conntrack<V: aya::Pod>(
    old: &PinDir,
    to: &mut HashMap<&mut MapData, CtKey, CtEntry>,
    convert: impl Fn(V) -> CtEntry,
) -> anyhow::Result<usize> {
    let path = old.map_path(map::CONNTRACK);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let from: HashMap<MapData, CtKey, V> = HashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
    let mut n = 0;
    for item in from.iter() {
        let Ok((k, v)) = item else { continue };
        // The entry may have expired or been evicted meanwhile: skip what fails.
        if to.insert(k, convert(v), 0).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Pin version v4's conntrack entry (until the epoch got its own half of the stamp):
/// kept to migrate the connections of a v4 agent's node.
pub mod v4 {
    use core::mem::size_of;
    use netpol_common::{CtEntry as Current, CtKey};

    /// (key size, value size) of v4's `NP_CONNTRACK`.
    pub const CONNTRACK: (usize, usize) = (size_of::<CtKey>(), size_of::<CtEntry>());

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CtEntry {
        pub last_seen_ns: u64,
        pub flags: u32,
        /// Revision and epoch folded into one word.
        pub egress_revision: u32,
        pub ingress_revision: u32,
        pub egress_cookie: u32,
        pub ingress_cookie: u32,
        pub _pad: u32,
    }
    const _: () = assert!(size_of::<CtEntry>() == 32);

    // SAFETY: plain old data: `repr(C)`, integers only, no padding left implicit.
    unsafe impl aya::Pod for CtEntry {}

    impl CtEntry {
        /// The connection as this version records it. Its checks keep their flags and
        /// rule cookies, and their stamps become 0: a stamp of epoch 0 is never current
        /// once this agent has synced (its epochs start at 1), so every migrated
        /// connection is judged again on its next packet and goes on if policy still
        /// allows it.
        pub fn upgrade(self) -> Current {
            Current {
                last_seen_ns: self.last_seen_ns,
                egress_stamp: 0,
                ingress_stamp: 0,
                flags: self.flags,
                egress_cookie: self.egress_cookie,
                ingress_cookie: self.ingress_cookie,
                owner: 0, // counted by no one: v4 knew no shares
            }
        }
    }
}

/// Removes the pinned directories of other versions (after the filters moved on).
pub fn remove_versions(root: &Path, versions: &[String]) {
    for v in versions {
        let d = PinDir::with_version(root, v);
        if let Err(e) = d.remove() {
            tracing::warn!(error = ?e, "removing an old pinned version");
        }
    }
}
