//! The pod-start hold. A pod's bridge port exists before the agent has located the pod
//! and written its endpoint; without a filter its traffic would pass unjudged. The
//! moment discovery (`discovery.rs`, on the link event) sees a veth whose peer lives in
//! another network namespace join the bridge, it attaches the hold programs
//! (`hold_from_pod`, `hold_to_pod`: every IP packet dropped as `PENDING_ENDPOINT`, and
//! the pod's own ARP and neighbour discovery, which nothing yet holds to its addresses;
//! towards the pod they pass) at our priority and handle, before it tells the agent
//! loop about the port. The sync later replaces them in place with `from_pod`/`to_pod`
//! (a netlink change: the port is never without a filter). The hold only *creates*
//! filters (`NLM_F_EXCL`), so it can never replace a real program that got there first.
//!
//! At start, discovery's first dump does the same for ports that have no filter yet
//! (pods started while no agent ran). Ports whose peer is in the node's own namespace
//! (or that are not veths with a peer at all: the overlay, an uplink) are left alone.

use aya::programs::tc::{NlOptions, TcAttachOptions, TcAttachType};
use aya::programs::{tc, SchedClassifier};

use super::discovery::OnNewPort;
use super::{FILTER_HANDLE, FILTER_PRIORITY};

/// The hold, as discovery's callback for new pod ports.
pub fn on_new_port(mut programs: Vec<(TcAttachType, SchedClassifier)>) -> OnNewPort {
    Box::new(move |ifname: &str| hold(ifname, &mut programs))
}

/// Attaches the hold to a port that has no filter of ours yet.
fn hold(ifname: &str, programs: &mut [(TcAttachType, SchedClassifier)]) {
    let _ = tc::qdisc_add_clsact(ifname);
    let mut held = false;
    for (hook, prog) in programs.iter_mut() {
        match prog.attach_with_options(
            ifname,
            *hook,
            TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                ..Default::default()
            }),
        ) {
            Ok(id) => match prog.take_link(id) {
                // Owned by no process, like the real filters: the sync replaces it.
                Ok(link) => {
                    std::mem::forget(link);
                    held = true;
                }
                Err(e) => tracing::warn!(veth = ifname, error = %e, "hold link"),
            },
            // Already filtered (the real programs were quicker, or a previous agent's),
            // or the port is gone again: nothing to hold.
            Err(e) => tracing::debug!(veth = ifname, error = %e, "no hold attached"),
        }
    }
    if held {
        tracing::debug!(veth = ifname, "pod-start hold attached");
    }
}
