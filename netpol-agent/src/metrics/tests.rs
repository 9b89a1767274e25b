//! The exposition and the HTTP server, against a fake reading of the counters.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn metrics() -> (Arc<Metrics>, watch::Sender<Status>) {
    let (tx, rx) = watch::channel(Status::default());
    let read: Read = Box::new(|| Readings {
        packets: vec![
            Counter {
                verdict: Verdict::Audit,
                reason: Reason::PolicyDenied,
                direction: Direction::Egress,
                packets: 3,
            },
            Counter {
                verdict: Verdict::Dropped,
                reason: Reason::SpoofedSource,
                direction: Direction::Egress,
                packets: 2,
            },
        ],
        events: EventCounters {
            sent: 5,
            ..EventCounters::default()
        },
        tally: None,
    });
    let m = Metrics::new(rx, None, read, 10, Duration::from_secs(60));
    (Arc::new(m), tx)
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// One decode: an audit is printed "audit" (the metrics once said "audit" where the
/// CLI said "dropped"), and only drops count in the drop counter.
#[tokio::test]
async fn the_exposition_names_each_verdict_once_and_the_probes_answer() {
    let (m, status) = metrics();
    let addr = serve("127.0.0.1:0".parse().unwrap(), m).await.unwrap();
    let text = get(addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/plain; version=0.0.4"), "{text}");
    for line in [
        "netpol_packets_total{verdict=\"audit\",reason=\"POLICY_DENIED\",direction=\"egress\"} 3",
        "netpol_drops_total{reason=\"SPOOFED_SOURCE\",direction=\"egress\"} 2",
        "netpol_drops_total{reason=\"POLICY_DENIED\",direction=\"egress\"} 0",
        "netpol_events_total{outcome=\"sent\"} 5",
        "netpol_ready 0",
        "netpol_compile_duration_seconds_count 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    status.send_modify(|s| s.ready_ms = Some(1));
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
}

/// A client that opens a connection and never finishes its request is cut off,
/// rather than holding a task and a socket for ever.
#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_off() {
    let (m, _status) = metrics();
    let addr = serve("127.0.0.1:0".parse().unwrap(), m).await.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server closes; the bound only keeps a broken server from hanging the test.
    let closed = tokio::time::timeout(HEADER_TIMEOUT * 3, s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the connection is still open");
}
