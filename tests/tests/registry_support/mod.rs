//! Helpers shared by the registry end-to-end tests: a temporary directory,
//! running `sixmesh`, and a `registry serve` child that is killed on drop.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "smt-reg-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `sixmesh ARGS` and returns its output.
pub fn sixmesh(args: &[&str]) -> Output {
    Command::new(sixmesh_tests::sixmesh_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sixmesh")
}

/// Runs `sixmesh ARGS`, asserts success, returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = sixmesh(args);
    assert!(
        o.status.success(),
        "sixmesh {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A running `sixmesh registry serve`, killed on drop.
pub struct Serve {
    pub child: Child,
    pub url: String,
    pub legacy: Option<String>,
}

impl Serve {
    /// Starts `registry serve` on ephemeral loopback ports and waits until
    /// it prints its addresses.
    pub fn start(state_dir: &Path, legacy: bool) -> Serve {
        let mut cmd = Command::new(sixmesh_tests::sixmesh_bin());
        cmd.args(["registry", "serve", "--listen", "[::1]:0", "--state-dir"]).arg(state_dir);
        if legacy {
            cmd.args(["--legacy-listen", "[::1]:0"]);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("serve printed nothing").unwrap();
        let url = first
            .strip_prefix("registry serving ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let legacy = legacy.then(|| {
            let l = lines.next().expect("no legacy line").unwrap();
            l.strip_prefix("re6st-compatible plain HTTP on ")
                .unwrap_or_else(|| panic!("unexpected {l:?}"))
                .to_string()
        });
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Serve { child, url, legacy }
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `sixmesh registry init` in `dir`; returns the CA fingerprint.
pub fn init(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["registry", "init", "--state-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = ok(&args);
    out.lines()
        .find_map(|l| l.strip_prefix("CA fingerprint: "))
        .map(|s| s.trim().to_string())
        .expect("init prints the fingerprint")
}

/// `sixmesh registry token add` × `count`.
pub fn tokens(dir: &Path, count: usize) -> Vec<String> {
    ok(&["registry", "token", "add", "--count", &count.to_string(), "--state-dir", dir.to_str().unwrap()])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs a program that must succeed; returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
