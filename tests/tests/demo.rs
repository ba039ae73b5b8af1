//! `sixmesh demo`, the README's first command: as root it builds a real
//! network in namespaces, routes around a cut, writes its report and
//! leaves nothing behind; without root it runs the simulator.

use std::process::Command;

use sixmesh_tests::netns::require_root_netns;
use sixmesh_tests::sixmesh_bin;

#[test]
fn demo_as_root_builds_a_mesh_reroutes_and_cleans_up() {
    if !require_root_netns() {
        return;
    }
    let report = std::env::temp_dir().join(format!("sixmesh-demo-{}.html", std::process::id()));
    let child = Command::new(sixmesh_bin())
        .args(["demo", "--nodes", "4", "--report", report.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every node reaches every other node"), "{stdout}");
    assert!(stdout.contains("came back through other nodes"), "{stdout}");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("<svg") && html.contains("fd5e:77:0:3::1"), "report: {html}");
    std::fs::remove_file(&report).unwrap();
    // Nothing left: no namespace of the demo process, no sixmesh process.
    let ns = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    let leftovers: Vec<&str> = ns.lines().filter(|l| l.contains("-demo") || l.contains("-inet")).collect();
    assert!(leftovers.is_empty(), "namespaces left behind: {leftovers:?}");
    // A demo that worked leaves no logs either (a failed one keeps them and says where).
    let logs = std::env::temp_dir().join(format!("sixmesh-mesh-demo-{pid}"));
    assert!(!logs.exists(), "{} left behind", logs.display());
}

#[test]
fn demo_without_root_runs_the_simulator() {
    // Runs as "nobody" when we are root; as an ordinary user otherwise.
    let mut cmd = if nix::unistd::geteuid().is_root() {
        // A copy in /tmp, so that "nobody" can run it whatever the checkout's permissions.
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sixmesh-demo-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("sixmesh");
        std::fs::copy(sixmesh_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(bin);
        c
    } else {
        Command::new(sixmesh_bin())
    };
    let out = cmd.args(["demo", "--nodes", "6"]).current_dir(std::env::temp_dir()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("simulated") && stdout.contains("sudo sixmesh demo"), "{stdout}");
    assert!(stdout.contains("traffic came back"), "{stdout}");
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("sixmesh-demo-bin-{}", std::process::id())),
    );
}
