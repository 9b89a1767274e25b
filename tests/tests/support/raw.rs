//! What a pod's raw socket can do (NET_RAW is a default): send any Ethernet frame, as
//! given, out of its interface; and the MAC of that interface, to address frames with.

use serde_json::Value;

use super::lab::{in_netns, ip};

/// The MAC of `eth0` in `netns` (a pod's interface).
pub fn mac_of(netns: &str) -> [u8; 6] {
    let v: Value =
        serde_json::from_str(&ip(&["-n", netns, "-j", "link", "show", "dev", "eth0"])).unwrap();
    let text = v[0]["address"].as_str().unwrap();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Sends one Ethernet frame, exactly as given, out of `eth0` in `netns` (a pod's raw
/// socket: what NET_RAW allows).
pub fn send_frame(netns: &str, frame: Vec<u8>) {
    in_netns(netns, move || unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
        sll.sll_halen = 6;
        let size = std::mem::size_of_val(&sll) as libc::socklen_t;
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            &sll as *const _ as *const libc::sockaddr,
            size,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sendto: {err}");
    })
}
