//! Linux network namespaces: create them, link them with veth
//! pairs, run commands and closures inside them, and tear everything down on
//! drop — also when the test panics.
//!
//! Namespaces are named `smt-<pid>-<n>-<tag>`. A test process killed with
//! SIGKILL cannot run its destructors, so every new [`Netns`] first deletes the
//! namespaces left by test processes that no longer exist.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;
use nix::sched::{CloneFlags, setns};

/// Prefix of the namespaces this module creates.
const PREFIX: &str = "smt-";

/// What went wrong while setting up or using a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started (e.g. `ip` is not installed).
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed? apt-get install -y iproute2)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed { cmd: String, status: std::process::ExitStatus, stderr: String },
    /// Entering or opening a namespace failed.
    #[error("namespace {ns}: {what}: {source}")]
    Enter {
        ns: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The closure run inside a namespace panicked.
    #[error("the code run inside namespace {0} panicked")]
    Panicked(String),
}

/// Result type of this module.
pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

/// A network namespace that is deleted, with every process still in it, when
/// dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    handle: File,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up. `tag` is a short word
    /// that shows up in the name, to tell namespaces apart in `ip netns`.
    pub fn new(tag: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(16).collect();
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let path = Path::new("/run/netns").join(&name);
        let handle = match File::open(&path) {
            Ok(f) => f,
            Err(source) => {
                let _ = Command::new("ip").args(["netns", "delete", &name]).output();
                return Err(NetnsError::Enter { ns: name, what: "open /run/netns entry", source });
            }
        };
        let ns = Netns { name, handle };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS…` and fails if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A [`Command`] that runs `program` inside the namespace
    /// (through `ip netns exec`). Spawn it or collect its output as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program ARGS…` inside the namespace and fails if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns
    /// its result. Sockets opened by `f` belong to the namespace for their
    /// whole life, even once handed back to another thread.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                self.enter()?;
                Ok(f())
            });
            handle.join().map_err(|_| NetnsError::Panicked(self.name.clone()))?
        })
    }

    /// Like [`Netns::run`], but returns at once with the thread's handle, for
    /// servers that run alongside the test. Entering the namespace may fail:
    /// that error comes back from `join`.
    pub fn spawn<T, F>(&self, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.handle.try_clone().map_err(|source| self.error("dup handle", source))?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
                ns: name,
                what: "setns",
                source: e.into(),
            })?;
            Ok(f())
        }))
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> Result<()> {
        setns(&self.handle, CloneFlags::CLONE_NEWNET).map_err(|e| self.error("setns", e.into()))
    }

    fn error(&self, what: &'static str, source: std::io::Error) -> NetnsError {
        NetnsError::Enter { ns: self.name.clone(), what, source }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// Links `a` and `b` with a veth pair named `a_if` (in `a`) and `b_if` (in
/// `b`), both up. Interface names are per namespace, so `eth0` is fine.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Creates a TUN device (a TAP device if `tap`: Ethernet frames) named
/// `name` in the calling thread's namespace; it lives as long as the
/// returned descriptor. Non-blocking.
pub(crate) fn create_tun(name: &str, tap: bool) -> std::io::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: plain open(2) of a constant path.
    let fd =
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: if tap { IFF_TAP } else { IFF_TUN } | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq matches.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Kills every process in the namespace, then deletes it. Errors are ignored:
/// this runs from destructors and from the stale sweep.
fn delete_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "delete", name]).stderr(Stdio::null()).status();
}

/// Deletes the namespaces of test processes that died without cleaning up.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(&name);
        }
    }
}

/// Runs a prepared command, turning a failure into an error with its stderr.
fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| NetnsError::Spawn { cmd: shown.clone(), source })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetnsError::Failed {
            cmd: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
