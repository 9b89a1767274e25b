//! Per-packet cost of the classifier under `BPF_PROG_TEST_RUN` (the test rig of
//! tests/support), with N policy entries for the server: N − 1 for other peers and ports and
//! the one allowing the client.
//!
//! - conntrack hit: an ACK of an established connection, repeated (the kernel's mean);
//! - denied: a SYN no rule allows (every lookup, a drop, a rate-limited event), repeated;
//! - new flow: a SYN of a new connection that is allowed and creates its conntrack
//!   entry. Repeating one would hit the entry it made, so each run is a distinct flow,
//!   run once; the runner's own cost of a single run (measured on a frame the
//!   classifier passes at once) is subtracted.

#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../tests/support/mod.rs"]
mod support;

use netpol_common::{direction::INGRESS, endpoint_flags, Config};
use support::packet::{eth, tcp, v4, ACK, SYN, TCP};
use support::rig::{Rig, CLIENT, CLIENT_ID, SERVER, TC_ACT_OK, TC_ACT_SHOT};

use crate::plan::Plan;
use crate::report::{Packet, PacketPoint, Stat};
use crate::Progress;

/// Distinct flows timed one by one for the new-flow case.
const NEW_FLOWS: u16 = 400;

pub fn run(plan: &Plan, progress: &mut Progress) -> anyhow::Result<Packet> {
    let mut out = Packet {
        repeat: plan.packet_repeat,
        ..Packet::default()
    };
    // The first rig's figures came out 1.7 times every later one's in whole runs (the
    // machine settling after the build): a discarded second of the same work first.
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x7fff_ffff);
    rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN)));
    let warm = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(1) {
        rig.bench("to_pod", &warm, plan.packet_repeat);
    }
    drop(rig);
    for &n in &plan.packet_rules {
        progress.step(
            &format!("packet: BPF_PROG_TEST_RUN with {n} policy entries"),
            plan.packet_runs as f64,
        );
        let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
        // Drops are reported at most once a second, as a flood would be on a node.
        rig.config(Config {
            event_rate: 1,
            ..Config::default()
        });
        for i in 0..n.saturating_sub(1) {
            rig.allow(
                INGRESS,
                1_000 + (i % 100) as u32,
                TCP,
                10_000 + (i / 100) as u16,
                i as u32 + 1,
            );
        }
        rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x7fff_ffff);
        if out.verified_insns.is_empty() {
            for name in ["from_pod", "to_pod"] {
                let prog: &aya::programs::SchedClassifier =
                    rig.ebpf.program(name).unwrap().try_into()?;
                if let Some(v) = prog.info()?.verified_instruction_count() {
                    out.verified_insns.insert(name.into(), v);
                }
            }
            out.timer_overhead_ns = timer_overhead(&rig);
        }
        anyhow::ensure!(
            rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))) == TC_ACT_OK,
            "the client's SYN is allowed"
        );
        let hit = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
        let denied = v4(CLIENT, SERVER, tcp(40001, 22, SYN));
        let (mut hits, mut drops, mut news) = (vec![], vec![], vec![]);
        for run in 0..plan.packet_runs {
            let (rc, mean) = rig.bench("to_pod", &hit, plan.packet_repeat);
            anyhow::ensure!(rc == TC_ACT_OK, "a conntrack hit passes");
            hits.push(mean.as_nanos() as f64);
            let (rc, mean) = rig.bench("to_pod", &denied, plan.packet_repeat);
            anyhow::ensure!(rc == TC_ACT_SHOT, "port 22 is denied");
            drops.push(mean.as_nanos() as f64);
            let mut once = Vec::new();
            for k in 0..NEW_FLOWS {
                let sport = 20_000 + (run as u16) * NEW_FLOWS + k;
                let (rc, t) = rig.bench("to_pod", &v4(CLIENT, SERVER, tcp(sport, 80, SYN)), 1);
                anyhow::ensure!(rc == TC_ACT_OK, "a new allowed flow passes");
                once.push(t.as_nanos() as f64);
            }
            once.sort_by(f64::total_cmp);
            news.push((crate::report::percentile(&once, 0.5) - out.timer_overhead_ns).max(0.0));
        }
        for (case, v) in [
            ("conntrack hit", hits),
            ("new flow (allowed, creates state)", news),
            ("denied (every lookup, a drop)", drops),
        ] {
            out.points.push(PacketPoint {
                rules: n,
                case: case.into(),
                ns: Stat::of(v),
            });
        }
    }
    Ok(out)
}

/// A single run's cost beyond the program's: the median of single runs of a frame the
/// classifier passes at its first check (ARP), less the mean of many.
fn timer_overhead(rig: &Rig) -> f64 {
    let arp = eth(0x0806, vec![0u8; 28]);
    if rig.try_run("to_pod", &arp).is_none() {
        return 0.0;
    }
    let (_, mean) = rig.bench("to_pod", &arp, 20_000);
    let mut once: Vec<f64> = (0..400)
        .map(|_| rig.bench("to_pod", &arp, 1).1.as_nanos() as f64)
        .collect();
    once.sort_by(f64::total_cmp);
    (crate::report::percentile(&once, 0.5) - mean.as_nanos() as f64).max(0.0)
}
