//! A point-to-point link between two namespaces made of two TUN devices and
//! a relay in this process, so that tests can add delay or cut the link in
//! user space (there is no netem qdisc on our machines).
//!
//! TUN devices have no link-local address: [`TunLink::new`] gives each end
//! the one you ask for (`nodad`), so Babel can speak on them.

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

use super::netns::{Netns, NetnsError, create_tun};

/// Impairments of a [`TunLink`], changeable while it runs.
#[derive(Debug, Default)]
pub struct Impair {
    delay_us: AtomicU64,
    cut: AtomicBool,
}

impl Impair {
    /// One-way delay added in each direction.
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }
    /// Drops every packet while `cut` is true.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

/// Two TUN devices relayed to each other. Dropping it stops the relay; the
/// devices go away with their namespaces.
pub struct TunLink {
    pub impair: Arc<Impair>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    /// Creates TUN `a_if` in `a` (link-local `a_ll`) and `b_if` in `b`
    /// (`b_ll`), brings them up and starts relaying.
    pub fn new(
        a: &Netns,
        a_if: &str,
        a_ll: Ipv6Addr,
        b: &Netns,
        b_if: &str,
        b_ll: Ipv6Addr,
    ) -> Result<Self, NetnsError> {
        let mut fds = Vec::new();
        for (ns, name, ll) in [(a, a_if, a_ll), (b, b_if, b_ll)] {
            let fd = ns.run(|| create_tun(name, false))?.map_err(|source| NetnsError::Enter {
                ns: ns.name().to_string(),
                what: "create TUN device",
                source,
            })?;
            ns.ip(&["link", "set", name, "multicast", "on", "up"])?;
            ns.ip(&["-6", "addr", "add", &format!("{ll}/64"), "dev", name, "nodad"])?;
            fds.push(Arc::new(fd));
        }
        let impair = Arc::new(Impair::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(0, 1), (1, 0)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (src, dst) = (fds[from].clone(), fds[to].clone());
            let (imp, st) = (impair.clone(), stop.clone());
            threads.push(std::thread::spawn(move || read_loop(&src, &tx, &imp, &st)));
            let st = stop.clone();
            threads.push(std::thread::spawn(move || write_loop(&dst, &rx, &st)));
        }
        Ok(TunLink { impair, stop, threads })
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_loop(fd: &OwnedFd, tx: &mpsc::Sender<(Instant, Vec<u8>)>, imp: &Impair, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || imp.cut.load(Ordering::Relaxed) {
            continue;
        }
        let due = Instant::now() + Duration::from_micros(imp.delay_us.load(Ordering::Relaxed));
        if tx.send((due, buf[..n as usize].to_vec())).is_err() {
            return;
        }
    }
}

fn write_loop(fd: &OwnedFd, rx: &mpsc::Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(50)) else { continue };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // SAFETY: writing a buffer we own, of its length.
        unsafe { libc::write(fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
    }
}
