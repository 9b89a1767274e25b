//! Egress to Service VIPs, judged against the backend kube-proxy picks.
//!
//! ```text
//!  client pod ──► from_pod (H1) ──► PREROUTING DNAT ──► to_pod (H2, local backend)
//!                 dst is a VIP:          (kube-proxy)  └► to_remote (flannel.1/uplink)
//!                 record pending,                         mark tagged: judge the
//!                 tag skb->mark, pass                     client's egress on the
//!                                                         real backend, clear the mark
//! ```
//! An allowed connection is recorded in conntrack under the client's original tuple
//! (client → VIP, flag `SERVICE`), so the replies, which come back with the VIP as their
//! source after the reverse NAT, match it. A tagged packet whose client is unknown is
//! dropped: a packet to a VIP is never let through unjudged past the hook after DNAT.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_coarse_ns},
    programs::{SkBuffContext, TcContext},
};
use netpol_common::{
    config_flags, ct_flags, direction, nodeport_key, reason, svc_mark, verdict, Config, CtEntry,
    EndpointEntry, PendingEntry, PendingKey, ServiceEntry,
};

use crate::conntrack::{ct_live, ct_touch, opens, remember};
use crate::emit::{count, count_rule, finish};
use crate::maps::{
    Scratch, CONFIG, ENDPOINTS, NODEPORTS, SCRATCH, SCRATCH_PACKET, SERVICES, SVC_PENDING,
};
use crate::parse::{self, Frame, LocalIn, Packet};
use crate::policy::{audit_mode, audits, verdict_of};
use crate::{stamp_now, Outcome};

/// The `NP_SVC_PENDING` key of a client's connection: its veth, source port, protocol.
#[inline(always)]
fn pending_key(ifindex: u32, sport: u16, protocol: u8) -> PendingKey {
    PendingKey {
        ifindex,
        sport,
        protocol,
        _pad: 0,
    }
}

/// `pkt` (a pod's egress) is for kube-proxy to DNAT, so judged after DNAT: to a
/// Service's address (ClusterIP, externalIP, LoadBalancer), or to one of the node's
/// own addresses on a NodePort. 1 or 0; a call of its own, so that the NodePort key is
/// not on the stack of the pipeline's deepest chain.
#[inline(never)]
pub(crate) fn defers(pkt: &Packet) -> u32 {
    // SAFETY: lookups; the values are read at once.
    match unsafe { SERVICES.get(&pkt.daddr) } {
        None => 0,
        Some(e) if e.id != ServiceEntry::NODE => 1,
        Some(_) => {
            let key = nodeport_key(pkt.protocol, pkt.dport);
            unsafe { NODEPORTS.get(&key) }.is_some() as u32
        }
    }
}

/// `to_pod`, first thing: no Service client known yet for this run, and whether the
/// node itself sent the packet: it was received on no interface (a forwarded one was,
/// on the uplink, the overlay or a pod's veth). Not the socket: the bridge's clones of
/// a flooded frame have none.
#[inline(never)]
pub(crate) fn begin_to_pod(ctx: &TcContext) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch used by this run only; the context pointer is valid.
    unsafe {
        (*scratch).svc_client_known = 0;
        (*scratch).node_sent = ((*ctx.skb.skb).ingress_ifindex == 0) as u8;
    }
}

/// The pending entry of a Service packet (after DNAT), looked up once: its client's
/// address as `from_pod` saw it, before kube-proxy masqueraded it (NodePorts,
/// externalIPs, the hairpin), becomes the peer of the backend's ingress at `to_pod`
/// (the next `to_pod` run starts afresh, so `to_remote` and `local_in` may write it
/// too). Returns 1 when the packet goes to the backend its client's verdict was made
/// for (not the source: the uplink hook sees it after the masquerade).
#[inline(never)]
fn note_client(client: u32, pkt: &Packet) -> u32 {
    let key = pending_key(client, pkt.sport, pkt.protocol);
    let (Some(scratch), Some(p)) = (SCRATCH.get_ptr_mut(0), unsafe { SVC_PENDING.get(&key) })
    else {
        return 0;
    };
    // SAFETY: per-CPU scratch used by this run only; `p` is a map value.
    unsafe {
        (*scratch).svc_client = p.saddr;
        (*scratch).svc_client_known = 1;
    }
    (p.backend == pkt.daddr && p.bport == pkt.dport) as u32
}

/// `from_pod`, packet to a VIP. A live connection whose egress check is current passes
/// (`CONNTRACK`), tagged established: after DNAT its backend must still be the one the
/// verdict was made for (nf_conntrack may have forgotten the flow and picked another).
/// Anything else is passed on tagged pending, to be judged after DNAT. `original`: the
/// live entry of the packet's own tuple (`scratch.ct`) if the caller looked it up.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn egress_to_vip(
    ctx: &TcContext,
    scratch: &mut Scratch,
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    ifindex: u32,
    original: Option<Option<*mut CtEntry>>,
    out: &mut Outcome,
    now: u64,
) {
    if config.flags & config_flags::LOCAL_UNHOOKED != 0 {
        // The backend may be this node, where nothing would judge the packet.
        *out = Outcome::drop(reason::SERVICE_UNHOOKED);
        return;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let entry = original.unwrap_or_else(|| ct_live(&scratch.ct, config, now));
    if let Some(e) = entry.filter(|_| ifindex <= svc_mark::MAX_IFINDEX) {
        // SAFETY: pointer into the map value, valid for this run.
        unsafe {
            let flags = (*e).flags;
            let current = (*e).egress_stamp == scratch.stamp
                || config.flags & config_flags::KEEP_ESTABLISHED != 0;
            let audit_ok =
                flags & ct_flags::EGRESS_AUDIT == 0 || audit_mode(ep, config, direction::EGRESS);
            if flags & ct_flags::EGRESS_OK != 0 && current && audit_ok {
                ctx.set_mark(svc_mark::established(mark, ifindex));
                ct_touch(e, pkt, false, now);
                *out = Outcome::allow(reason::CONNTRACK);
                count_rule((*e).egress_cookie, pkt.len);
                return;
            }
        }
    }
    if ifindex > svc_mark::MAX_IFINDEX {
        *out = Outcome::drop(reason::SERVICE_UNKNOWN_CLIENT);
        return;
    }
    let key = pending_key(ifindex, pkt.sport, pkt.protocol);
    scratch.pending = PendingEntry {
        saddr: pkt.saddr,
        vip: pkt.daddr,
        vport: pkt.dport,
        // Known once judged after DNAT.
        backend: [0; 16],
        bport: 0,
        _pad: [0; 4],
    };
    // A full table evicts the oldest entry: that connection's replies are then judged
    // as ingress (closed, not open).
    let _ = SVC_PENDING.insert(&key, &scratch.pending, 0);
    ctx.set_mark(svc_mark::pending(mark, ifindex));
    *out = Outcome::allow(reason::SERVICE_DEFERRED);
}

/// The hook after DNAT (`to_pod` first thing, `to_remote`): a tagged packet has its
/// client's egress judged against its (now real) destination. `TC_ACT_OK` lets the hook
/// go on, `TC_ACT_SHOT` drops.
#[inline(never)]
pub(crate) fn after_dnat<C: Frame>(ctx: &C) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let mark = unsafe { (*ctx.buf().skb).mark };
    let Some((client, established)) = svc_mark::tagged(mark) else {
        return TC_ACT_OK;
    };
    // Judged once: the mark must not follow the packet further.
    ctx.buf().set_mark(svc_mark::clear(mark));
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: map values stay valid for the whole program run.
    let Some(ep) = (unsafe { ENDPOINTS.get(&client) }) else {
        count(netpol_common::counter_index(
            verdict::DROPPED,
            reason::SERVICE_UNKNOWN_CLIENT,
            direction::EGRESS,
        ));
        return TC_ACT_SHOT;
    };
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::init(&mut slot, direction::EGRESS, ctx.buf().len());
    let mut out = Outcome::drop(reason::NONE);
    match ctx.parse_into(pkt) {
        parse::PARSED => {
            if established && note_client(client, pkt) != 0 {
                return TC_ACT_OK; // counted at `from_pod`, as CONNTRACK
            }
            if !established {
                note_client(client, pkt);
            }
            // Pending, or established towards another backend than its verdict's (the
            // flow DNATed anew, or the pending entry taken by another flow of the same
            // source port): judged on this backend.
            judge_backend(ep, config, client, pkt, &mut out)
        }
        parse::SKIP => return TC_ACT_OK,
        code => out = Outcome::drop(code),
    }
    finish(ctx, ep, config, pkt, out)
}

/// The cgroup hook on local delivery (`local_in`, on the node's sockets' receive
/// path): a packet DNATed to the node itself (a hostNetwork backend on this node) meets
/// no TC hook after DNAT, so it is judged here like at `to_remote`. 1 lets it on to the
/// socket, 0 drops it.
#[inline(always)]
pub(crate) fn local_in(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some((client, _)) = svc_mark::tagged(mark) else {
        return 1; // the node's own traffic, or a reply
    };
    let Some(config) = CONFIG.get(0) else {
        return 0;
    };
    // SAFETY: the helper reads the namespace of the packet's socket or device.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.skb.skb as *mut c_void) };
    if config.netns_cookie == 0 || cookie as u32 != config.netns_cookie {
        // Another node's (the lab runs several under one cgroup tree): its own hook's.
        return 1;
    }
    let local = LocalIn { ctx, client };
    if after_dnat(&local) == TC_ACT_SHOT {
        0
    } else {
        1
    }
}

/// The client's egress policy against the backend; an allowed (or audited) connection
/// is recorded under its original tuple for the replies.
#[inline(never)]
fn judge_backend(
    ep: &EndpointEntry,
    config: &Config,
    client: u32,
    pkt: &Packet,
    out: &mut Outcome,
) {
    let stamp = stamp_now(ep, config);
    out.verdict = verdict_of(ep, config, pkt, false, out);
    let audited = if out.verdict == verdict::ALLOWED {
        0
    } else if out.reason == reason::POLICY_DENIED
        && audits(ep, config, direction::EGRESS, out.reason)
    {
        ct_flags::EGRESS_AUDIT
    } else {
        return;
    };
    let key = pending_key(client, pkt.sport, pkt.protocol);
    let Some(p) = SVC_PENDING.get_ptr_mut(&key) else {
        return; // evicted: the replies will be judged as ingress
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch used by this run only; `p` points into a map value.
    unsafe {
        let scratch = &mut *scratch;
        scratch.ct.saddr = (*p).saddr;
        scratch.ct.daddr = (*p).vip;
        scratch.ct.sport = pkt.sport;
        scratch.ct.dport = (*p).vport;
        scratch.ct.set_protocol(pkt.protocol);
        // What this verdict was made for, should a reply need it judged again.
        (*p).backend = pkt.daddr;
        (*p).bport = pkt.dport;
        let now = bpf_ktime_get_coarse_ns();
        if !opens(pkt) {
            // Passes untracked (see `opens`).
            if audited == 0 {
                count_rule(out.cookie, pkt.len);
            }
            return;
        }
        remember(
            &scratch.ct,
            direction::EGRESS,
            stamp,
            audited | ct_flags::SERVICE,
            if audited == 0 { out.cookie } else { 0 },
            now,
            client,
            config.ct_share,
        );
        if audited == 0 {
            count_rule(out.cookie, pkt.len);
        }
    }
}

/// A reply (source = VIP) of a connection recorded by [`judge_backend`]: its egress
/// check is renewed by the client's own packets (deferred again), or, when it no longer
/// holds, by [`judge_reply`].
#[inline(always)]
pub(crate) fn is_service_reply(e: *mut CtEntry, reply: bool, jdir: u8) -> bool {
    // SAFETY: pointer into the map value, valid for this run.
    reply && jdir == direction::EGRESS && unsafe { (*e).flags } & ct_flags::SERVICE != 0
}

/// A Service reply (VIP → client) whose egress check no longer holds: the client's
/// packet to the backend that check was made for, as [`judge_backend`] saw it, into
/// `NP_SCRATCH_PACKET` for the caller to judge again. 0 when that backend is no longer
/// known (its pending entry evicted or taken by another connection, or never judged):
/// the reply then drops. (The caller judges, so that this frame is not under the
/// policy lookups' on the stack.)
#[inline(never)]
pub(crate) fn reply_backend(pkt: &Packet) -> u32 {
    let (Some(scratch), Some(forward)) = (SCRATCH.get_ptr(0), SCRATCH_PACKET.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: per-CPU maps used by this run only; `p` points into a map value.
    unsafe {
        // A reply: the client's source port is its destination port.
        let key = pending_key((*scratch).ifindex, pkt.dport, pkt.protocol);
        let Some(p) = SVC_PENDING.get_ptr(&key) else {
            return 0;
        };
        if (*p).vip != pkt.saddr || (*p).vport != pkt.sport || (*p).saddr != pkt.daddr {
            return 0;
        }
        if (*p).bport == 0 && (*p).backend == [0u8; 16] {
            return 0;
        }
        *forward = *pkt;
        (*forward).dir = direction::EGRESS;
        (*forward).saddr = pkt.daddr;
        (*forward).sport = pkt.dport;
        (*forward).daddr = (*p).backend;
        (*forward).dport = (*p).bport;
    }
    1
}
