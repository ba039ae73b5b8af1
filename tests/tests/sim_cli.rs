//! `sixmesh sim` from the command line: a mesh too big for memory is
//! refused before it starts, and says how to make it fit; sampled
//! destinations show in the summary and the report, and are refused on
//! real nodes.

use std::path::{Path, PathBuf};
use std::process::Command;

use sixmesh_tests::sixmesh_bin;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../netsim/scenarios").join(name)
}

#[test]
fn a_mesh_too_big_for_memory_is_refused_with_the_way_out() {
    let out = Command::new(sixmesh_bin())
        .arg("sim")
        .arg(scenario("ten-thousand.toml"))
        .args(["--nodes", "1000000", "--duration", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs about") && stderr.contains("destinations"), "{stderr}");
    assert!(stderr.contains("1000000 nodes × 500 prefixes"), "{stderr}");
}

#[test]
fn sampled_destinations_are_reported_and_refused_on_real_nodes() {
    let dir = std::env::temp_dir().join(format!("sixmesh-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sampled.toml");
    std::fs::write(
        &file,
        "name = \"sampled\"\nduration_s = 20\n[nodes]\ncount = 30\ndestinations = 4\nbootstrap = 10\n\
         [manager]\nclient_count = 3\nmax_clients = 6\n[[event]]\nat_s = 5\ndo = \"cut_tunnel\"\n\
         [assert]\nreachable_within_s = 10\nno_loops = true\n",
    )
    .unwrap();
    let json = dir.join("r.json");
    let out = Command::new(sixmesh_bin()).arg("sim").arg(&file).arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("30 nodes (4 announce a prefix)"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!((r["nodes"].as_u64(), r["destinations"].as_u64()), (Some(30), Some(4)));
    assert_eq!(r["passed"], true);
    // Real nodes all announce their prefix: refused before any setup,
    // root or not.
    let out = Command::new(sixmesh_bin()).arg("sim").arg(&file).arg("--namespaces").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`[nodes] destinations` is a simulator option"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
