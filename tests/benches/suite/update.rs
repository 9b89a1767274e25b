//! Policy update latency: a one-node lab per enforcer and cluster size (the client and
//! an isolated server are real pods, the rest virtual pods in the index); the policy
//! admitting the client is written into the enforcers' source directory (the lab's API
//! server) and removed again, while the client connects in a tight loop.

use std::time::{Duration, Instant};

use netpol_tests::lab::Enforcer;

use crate::plan::{self, Plan};
use crate::report::{AgentMemory, Dist, Update, UpdatePoint};
use crate::testbed::{memory_mib, until_outcome, Testbed};
use crate::Progress;

/// Waiting for a permitted connection, attempts are abandoned after this: the
/// resolution of an enforce sample (a dropped SYN is retried only after a second).
const ENFORCE_ATTEMPT: Duration = Duration::from_millis(5);
/// Waiting for a refused one, an attempt counts as refused after this, twice in a row
/// (an attempt's start is recorded, so the timeout costs no resolution; on a busy
/// machine an answer can take 20 ms).
const REVOKE_ATTEMPT: Duration = Duration::from_millis(100);
/// The `dir` source's settle time (source/dir.rs).
const SOURCE_SETTLE_MS: f64 = 50.0;

pub fn run(
    plan: &Plan,
    bed: &Testbed,
    progress: &mut Progress,
) -> anyhow::Result<(Update, Vec<AgentMemory>)> {
    let mut update = Update {
        enforce_attempt_ms: ENFORCE_ATTEMPT.as_secs_f64() * 1e3,
        revoke_attempt_ms: REVOKE_ATTEMPT.as_secs_f64() * 1e3,
        source_settle_ms: SOURCE_SETTLE_MS,
        ..Update::default()
    };
    let mut memory = Vec::new();
    for &pods in &plan.update_pods {
        let cluster = plan::update_cluster(pods)?;
        for enforcer in [Enforcer::Iptables, Enforcer::Netpol] {
            progress.step(
                &format!(
                    "update: {} lab, {pods} pods in the index",
                    enforcer.as_str()
                ),
                5.0,
            );
            let tag = format!("u{}{}", &enforcer.as_str()[..1], pods / 100);
            let l = bed.up(&tag, enforcer, 1, &[("cluster.yaml", &cluster)], &[])?;
            l.tune_client("x/client")?;
            let client = l.pod("x/client")?.netns;
            let server = l.address("x/server", 80)?;
            let give_up = Duration::from_secs(10);
            // Denied to begin with: the default deny isolates the server.
            until_outcome(
                &client,
                server,
                false,
                Instant::now(),
                REVOKE_ATTEMPT,
                2,
                give_up,
            )?;
            let dir = l.source_dir();
            let (file, hidden) = (dir.join("bench-allow.yaml"), dir.join(".bench-allow.yaml"));
            let (mut enforce, mut revoke) = (Vec::new(), Vec::new());
            for rep in 0..plan.update_repeats {
                progress.step(
                    &format!(
                        "update: {} {pods} pods, {}/{}",
                        enforcer.as_str(),
                        rep + 1,
                        plan.update_repeats
                    ),
                    0.5,
                );
                // Written aside (the source skips hidden files), then renamed: the
                // policy appears whole at t0.
                std::fs::write(&hidden, plan::UPDATE_ALLOW)?;
                let t0 = Instant::now();
                std::fs::rename(&hidden, &file)?;
                let d = until_outcome(&client, server, true, t0, ENFORCE_ATTEMPT, 1, give_up)?;
                enforce.push(d.as_secs_f64() * 1e3);
                l.wait()?;
                let t1 = Instant::now();
                std::fs::remove_file(&file)?;
                let d = until_outcome(&client, server, false, t1, REVOKE_ATTEMPT, 2, give_up)?;
                revoke.push(d.as_secs_f64() * 1e3);
                l.wait()?;
            }
            update.points.push(UpdatePoint {
                enforcer: enforcer.as_str().into(),
                pods,
                enforce: Dist::of(enforce),
                revoke: Dist::of(revoke),
            });
            for pid in l.agent_pids()? {
                let (rss, hwm) = memory_mib(pid)?;
                memory.push(AgentMemory {
                    enforcer: enforcer.as_str().into(),
                    pods,
                    rss_mib: rss,
                    hwm_mib: hwm,
                });
            }
        }
    }
    Ok((update, memory))
}
