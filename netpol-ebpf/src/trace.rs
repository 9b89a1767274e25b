//! The `trace` feature's log lines (aya-log), one function per decision point of the
//! pipeline, called through `trace!` (main.rs). The aya-log macros are named by path here:
//! `trace!` is main.rs's.
//!
//! The inline attributes are chosen by what the verifier walks (from_pod, Linux 6.18;
//! 133k without the feature): `parsed` and `action` (in `judge` and `finish`) are not
//! inlined, since inlined they reshape `judge`'s stack and registers and from_pod takes
//! 899k of its 1M limit; the others are inlined, since as calls inside the pipeline
//! they take it to 449k. As they are: about 221k.

use aya_ebpf::programs::TcContext;

use crate::parse::Packet;
use crate::Outcome;

/// The parsed packet, before the pipeline (`judge`).
#[inline(never)]
pub(crate) fn parsed(ctx: &TcContext, pkt: &Packet, ifindex: u32) {
    aya_log_ebpf::debug!(
        ctx,
        "netpol: if {} dir {} proto {} {:i}:{} > {:i}:{} tcp {:x} frag {} icmp {}",
        ifindex,
        pkt.dir,
        pkt.protocol,
        pkt.saddr,
        pkt.sport,
        pkt.daddr,
        pkt.dport,
        pkt.tcp_flags,
        pkt.frag,
        pkt.icmp
    );
}

/// A later fragment took its first fragment's outcome.
#[inline(always)]
pub(crate) fn later_fragment(ctx: &TcContext, out: &Outcome) {
    aya_log_ebpf::trace!(
        ctx,
        "netpol: later fragment: verdict {} of its first",
        out.verdict
    );
}

/// An ICMP error quoting a tracked connection (passes as RELATED).
#[inline(always)]
pub(crate) fn related(ctx: &TcContext) {
    aya_log_ebpf::trace!(ctx, "netpol: ICMP error of a tracked connection");
}

/// Egress to a Service VIP (service.rs takes over).
#[inline(always)]
pub(crate) fn to_vip(ctx: &TcContext) {
    aya_log_ebpf::trace!(ctx, "netpol: to a Service VIP");
}

/// A live conntrack entry whose check on this side passed.
#[inline(always)]
pub(crate) fn ct_hit(ctx: &TcContext, reply: bool) {
    if reply {
        aya_log_ebpf::trace!(ctx, "netpol: conntrack hit (reply)");
    } else {
        aya_log_ebpf::trace!(ctx, "netpol: conntrack hit");
    }
}

/// No live conntrack entry passes the packet: policy decides.
#[inline(always)]
pub(crate) fn ct_miss(ctx: &TcContext) {
    aya_log_ebpf::trace!(ctx, "netpol: conntrack miss");
}

/// The policy stage's outcome for a new connection.
#[inline(always)]
pub(crate) fn policy(ctx: &TcContext, out: &Outcome) {
    aya_log_ebpf::debug!(
        ctx,
        "netpol: policy verdict {} reason {} cookie {} peer {}",
        out.verdict,
        out.reason,
        out.cookie,
        out.peer_identity
    );
}

/// The final outcome (after audit mode), which `finish` turns into the TC action.
#[inline(never)]
pub(crate) fn action<C: aya_ebpf::EbpfContext>(ctx: &C, out: &Outcome) {
    aya_log_ebpf::debug!(
        ctx,
        "netpol: final verdict {} (0 allow, 1 drop, 2 audit) reason {} cookie {}",
        out.verdict,
        out.reason,
        out.cookie
    );
}
