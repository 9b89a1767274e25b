//! What the agent's flags set in the datapath: map capacities and the classifier's
//! switches (the `NP_CONFIG` record).

use std::time::Duration;

use anyhow::bail;
use netpol_common::{capacity, ct_timeout, Config};

/// Map capacities (flags of the agent).
#[derive(Clone, Debug)]
pub struct Capacities {
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
    pub policy: u32,
    pub conntrack: u32,
    pub fragments: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            endpoints: capacity::ENDPOINTS,
            ipcache: capacity::IPCACHE,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
            conntrack: capacity::CONNTRACK,
            fragments: capacity::FRAGMENTS,
        }
    }
}

/// Node-wide switches of the classifier (flags of the agent), written to `NP_CONFIG`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switches {
    /// Allow traffic from the node's own addresses to local pods (kubelet probes).
    pub allow_host: bool,
    /// Report would-be drops as AUDIT and let them pass, node-wide.
    pub audit: bool,
    /// Keep established connections when a policy change no longer allows them.
    pub keep_established: bool,
    /// Events per second per endpoint (0: no limit) and burst.
    pub event_rate: u32,
    pub event_burst: u32,
    /// Report one in this many new allowed connections (0: none).
    pub sample_allows: u32,
    pub ct_tcp_syn_timeout: Duration,
    pub ct_tcp_established_timeout: Duration,
    pub ct_tcp_close_timeout: Duration,
    pub ct_udp_timeout: Duration,
    pub ct_icmp_timeout: Duration,
    /// Conntrack entries one endpoint may hold (0: no bound).
    pub ct_share: u32,
    /// Fragmented datagrams one endpoint may have remembered at once (0: no bound).
    pub frag_share: u32,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            allow_host: true,
            audit: false,
            keep_established: false,
            event_rate: DEFAULT_EVENT_RATE,
            event_burst: DEFAULT_EVENT_BURST,
            sample_allows: 0,
            ct_tcp_syn_timeout: Duration::from_secs(ct_timeout::TCP_SYN),
            ct_tcp_established_timeout: Duration::from_secs(ct_timeout::TCP_ESTABLISHED),
            ct_tcp_close_timeout: Duration::from_secs(ct_timeout::TCP_CLOSE),
            ct_udp_timeout: Duration::from_secs(ct_timeout::UDP),
            ct_icmp_timeout: Duration::from_secs(ct_timeout::ICMP),
            ct_share: default_ct_share(capacity::CONNTRACK),
            frag_share: default_ct_share(capacity::FRAGMENTS),
        }
    }
}

/// An endpoint's share of a table (conntrack, fragments) by default: a quarter, so that
/// a pod that opens flows (or fragments datagrams) without end leaves three quarters to
/// the others.
pub const fn default_ct_share(conntrack_capacity: u32) -> u32 {
    conntrack_capacity / 4
}

/// Events per second an endpoint may cause by default, and its burst.
pub const DEFAULT_EVENT_RATE: u32 = 100;
pub const DEFAULT_EVENT_BURST: u32 = 200;

impl Switches {
    /// The `NP_CONFIG` record for these switches and the node's own addresses.
    pub fn config(&self, host_addrs: &[std::net::IpAddr]) -> anyhow::Result<Config> {
        use netpol_common::{config_flags, MAX_EVENT_RATE};
        if self.event_rate > MAX_EVENT_RATE || self.event_burst > MAX_EVENT_RATE {
            bail!("--event-rate and --event-burst must be at most {MAX_EVENT_RATE}");
        }
        let ns = |what: &str, d: Duration| -> anyhow::Result<u64> {
            if d.is_zero() {
                bail!("{what} must be longer than zero");
            }
            Ok(d.as_nanos().min(u64::MAX as u128) as u64)
        };
        let mut c = Config {
            event_rate: self.event_rate,
            event_burst: self.event_burst,
            sample_allows: self.sample_allows,
            ct_tcp_syn_ns: ns("--ct-tcp-syn-timeout", self.ct_tcp_syn_timeout)?,
            ct_tcp_established_ns: ns(
                "--ct-tcp-established-timeout",
                self.ct_tcp_established_timeout,
            )?,
            ct_tcp_close_ns: ns("--ct-tcp-close-timeout", self.ct_tcp_close_timeout)?,
            ct_udp_ns: ns("--ct-udp-timeout", self.ct_udp_timeout)?,
            ct_icmp_ns: ns("--ct-icmp-timeout", self.ct_icmp_timeout)?,
            ct_share: self.ct_share,
            frag_share: self.frag_share,
            ..Config::default()
        };
        if self.allow_host {
            c.flags |= config_flags::ALLOW_HOST;
        }
        if self.audit {
            c.flags |= config_flags::AUDIT;
        }
        if self.keep_established {
            c.flags |= config_flags::KEEP_ESTABLISHED;
        }
        for ip in host_addrs {
            match ip {
                std::net::IpAddr::V4(_) => c.host_ipv4 = netpol_engine::index::net::addr_of(*ip),
                std::net::IpAddr::V6(_) => c.host_ipv6 = netpol_engine::index::net::addr_of(*ip),
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::{config_flags, v4_mapped};
    use std::net::IpAddr;

    #[test]
    fn switches_become_the_config_record() {
        let c = Switches::default()
            .config(&[
                "10.244.0.1".parse::<IpAddr>().unwrap(),
                "fd00::af4:1".parse().unwrap(),
            ])
            .unwrap();
        assert_eq!(c.flags, config_flags::ALLOW_HOST);
        assert_eq!(c.host_ipv4, v4_mapped([10, 244, 0, 1]));
        assert_eq!(c.host_ipv6[0], 0xfd);
        assert_eq!(c.ct_tcp_established_ns, 6 * 3600 * 1_000_000_000);
        assert_eq!((c.event_rate, c.event_burst), (100, 200));
        let c = Switches {
            allow_host: false,
            audit: true,
            keep_established: true,
            ..Switches::default()
        }
        .config(&[])
        .unwrap();
        assert_eq!(
            c.flags,
            config_flags::AUDIT | config_flags::KEEP_ESTABLISHED
        );
        assert!(Switches {
            event_rate: netpol_common::MAX_EVENT_RATE + 1,
            ..Switches::default()
        }
        .config(&[])
        .is_err());
        assert!(Switches {
            ct_udp_timeout: Duration::ZERO,
            ..Switches::default()
        }
        .config(&[])
        .is_err());
    }
}
