//! Underlay latency without netem: a host's link to the "internet" bridge
//! is two TAP devices (one in the host's namespace, one on the bridge)
//! relayed by a thread of this process. Frames the host sends wait for the
//! one-way latency (plus jitter) of their path, told by their IPv6
//! destination `fd99::N`, before they reach the bridge; frames towards the
//! host pass at once. Each direction of a path is delayed at its sender,
//! so a round trip costs both one-way latencies, as on the Internet.
//! Loss stays in nftables on the bridge ([`super::mesh::Mesh::impair`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

use super::netns::{Netns, NetnsError, create_tun};

/// One-way latency and jitter of every path, by host index (`fd99::N`).
/// Paths not set have none.
#[derive(Debug, Default)]
pub struct Latency {
    paths: Mutex<HashMap<(u16, u16), (Duration, Duration)>>,
}

impl Latency {
    /// Sets the path between hosts `a` and `b`, both ways: every packet
    /// waits `latency` plus a uniform draw in `[0, jitter)`.
    pub fn set(&self, a: usize, b: usize, latency: Duration, jitter: Duration) {
        let mut m = self.paths.lock().expect("not poisoned");
        for k in [(a as u16, b as u16), (b as u16, a as u16)] {
            if latency.is_zero() && jitter.is_zero() {
                m.remove(&k);
            } else {
                m.insert(k, (latency, jitter));
            }
        }
    }

    /// The latency and jitter from host `a` to host `b`.
    pub fn get(&self, a: usize, b: usize) -> (Duration, Duration) {
        let m = self.paths.lock().expect("not poisoned");
        m.get(&(a as u16, b as u16)).copied().unwrap_or_default()
    }
}

/// The relay of one host; stops (and its devices go) when dropped.
pub struct HostRelay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostRelay {
    /// Creates TAP `host_if` in `host` and TAP `inet_if` in `inet` (both up,
    /// not addressed nor bridged: the caller does that) and relays between
    /// them, delaying what host `index` sends by `latency`.
    pub fn new(
        host: &Netns,
        host_if: &str,
        inet: &Netns,
        inet_if: &str,
        index: usize,
        latency: Arc<Latency>,
    ) -> Result<Self, NetnsError> {
        let mut fds = Vec::new();
        for (ns, name) in [(host, host_if), (inet, inet_if)] {
            let fd = ns.run(|| create_tun(name, true))?.map_err(|source| NetnsError::Enter {
                ns: ns.name().to_string(),
                what: "create TAP device",
                source,
            })?;
            ns.ip(&["link", "set", name, "up"])?;
            fds.push(fd);
        }
        let inet_fd = fds.pop().expect("two devices");
        let host_fd = fds.pop().expect("two devices");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{index}"))
            .spawn(move || relay(&host_fd, &inet_fd, index, &latency, &st))
            .map_err(|source| NetnsError::Enter {
                ns: host.name().to_string(),
                what: "start the relay thread",
                source,
            })?;
        Ok(HostRelay { stop, thread: Some(thread) })
    }
}

impl Drop for HostRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The underlay host a frame is for: `fd99::N` in an IPv6 frame.
fn destination(frame: &[u8]) -> Option<usize> {
    const UNDERLAY: [u8; 14] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] || frame[38..52] != UNDERLAY {
        return None;
    }
    Some(usize::from(u16::from_be_bytes([frame[52], frame[53]])))
}

fn read(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reading into a buffer we own, of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

fn write(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: writing a buffer we own, of its length. A frame the kernel
    // refuses is lost, as on a congested link.
    unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
}

fn relay(host: &OwnedFd, inet: &OwnedFd, me: usize, latency: &Latency, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ me as u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while let Some(Reverse((due, _, _))) = queue.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, _, frame))) = queue.pop() else { break };
            write(inet, &frame);
        }
        let wait = queue.peek().map_or(Duration::from_millis(50), |Reverse((due, _, _))| {
            due.saturating_duration_since(now).min(Duration::from_millis(50))
        });
        let mut pfds = [
            libc::pollfd { fd: host.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: inet.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ts = libc::timespec { tv_sec: 0, tv_nsec: wait.as_nanos() as libc::c_long };
        // SAFETY: two valid pollfds, a valid timeout, no signal mask.
        if unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, &ts, std::ptr::null()) } <= 0 {
            continue;
        }
        if pfds[0].revents & libc::POLLIN != 0 {
            while let Some(n) = read(host, &mut buf) {
                let frame = &buf[..n];
                let (lat, jitter) = destination(frame).map(|to| latency.get(me, to)).unwrap_or_default();
                if lat.is_zero() && jitter.is_zero() {
                    write(inet, frame);
                    continue;
                }
                // xorshift64: jitter needs no more.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let extra = jitter.mul_f64((rng >> 11) as f64 / (1u64 << 53) as f64);
                seq += 1;
                queue.push(Reverse((Instant::now() + lat + extra, seq, frame.to_vec())));
            }
        }
        if pfds[1].revents & libc::POLLIN != 0 {
            while let Some(n) = read(inet, &mut buf) {
                write(host, &buf[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_delayed_by_their_underlay_destination() {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[38..54].copy_from_slice(&"fd99::1a".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(destination(&f), Some(0x1a));
        f[38..54].copy_from_slice(&"fe80::1a".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(destination(&f), None, "link-local (neighbour discovery) is not delayed");
        f[12] = 0x08;
        assert_eq!(destination(&f), None, "not IPv6");
        let l = Latency::default();
        l.set(2, 5, Duration::from_millis(30), Duration::ZERO);
        assert_eq!(l.get(5, 2).0, Duration::from_millis(30));
        assert_eq!(l.get(2, 3).0, Duration::ZERO);
    }
}
