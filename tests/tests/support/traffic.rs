//! Traffic between a lab's pods as the tests make it: ping, connections to the lab
//! server (its greeting checked) and echoes over them.

use std::process::Command;

use super::lab::{in_netns, Lab};

/// `ping` once from a pod; true when answered.
pub fn ping(lab: &Lab, from: &str, to: std::net::IpAddr) -> bool {
    let netns = lab.pod_net(from).netns;
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            &to.to_string(),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

/// Opens a connection to the lab server at `to:80` from inside `netns` and reads its
/// greeting; the stream can then be used from any thread (it stays in its namespace).
pub fn connect(netns: &str, to: std::net::IpAddr) -> std::net::TcpStream {
    try_connect(netns, to).expect("connects")
}

pub fn try_connect(netns: &str, to: std::net::IpAddr) -> std::io::Result<std::net::TcpStream> {
    in_netns(netns, move || {
        use std::io::BufRead;
        let s = std::net::TcpStream::connect_timeout(
            &(to, 80).into(),
            std::time::Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut greeting = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut greeting)
            .unwrap();
        // "netpol-lab 80 <namespace/pod>": the server says who it is.
        assert!(greeting.starts_with("netpol-lab 80 "), "{greeting:?}");
        Ok(s)
    })
}

/// Writes `msg` and reads it back from the lab server's echo; false on timeout.
pub fn echo(s: &mut std::net::TcpStream, msg: &[u8], timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    match s.read_exact(&mut got) {
        Ok(()) => {
            assert_eq!(got, msg);
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => panic!("echo: {e}"),
    }
}
