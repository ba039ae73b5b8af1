//! The `sixmesh` binary as a user runs it: help, version, exit statuses.

use std::process::{Command, Output};

fn sixmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sixmesh"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the sixmesh binary")
}

const SUBCOMMANDS: [&str; 12] = [
    "registry", "join", "node", "status", "peers", "routes", "slap", "bridge", "frontend", "sim", "demo",
    "bench",
];

#[test]
fn help_lists_every_subcommand_with_a_description() {
    let out = sixmesh(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for sub in SUBCOMMANDS {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{sub} ")))
            .unwrap_or_else(|| panic!("`{sub}` missing from --help:\n{help}"));
        assert!(line.split_whitespace().count() > 3, "`{sub}` needs a description: {line}");
    }
    assert!(help.contains("--log-format"));
}

#[test]
fn version_prints_the_package_version() {
    let out = sixmesh(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("sixmesh {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Subcommands that are implemented (the others say "not implemented yet").
const FILLED: &[&str] =
    &["registry", "join", "node", "status", "peers", "routes", "sim", "bench", "demo", "bridge"];

#[test]
fn unfilled_subcommands_exit_2_and_say_so() {
    for sub in SUBCOMMANDS.into_iter().filter(|s| !FILLED.contains(s)) {
        let out = sixmesh(&[sub, "--some-flag", "value"]);
        assert_eq!(out.status.code(), Some(2), "`sixmesh {sub}`");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("not implemented yet"), "`sixmesh {sub}` said: {err}");
        assert!(err.contains(&format!("sixmesh {sub}")), "`sixmesh {sub}` said: {err}");
    }
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = sixmesh(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("frobnicate"));
}

#[test]
fn bad_rust_log_is_reported_not_ignored() {
    let out = Command::new(env!("CARGO_BIN_EXE_sixmesh"))
        .arg("status")
        .env("RUST_LOG", "sixmesh=notalevel")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("RUST_LOG"));
}

#[test]
fn log_format_json_is_accepted() {
    let out = sixmesh(&["--log-format", "json", "sim", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let out = sixmesh(&["--log-format", "yaml", "status"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stderr).unwrap().contains("yaml"));
}

#[test]
fn registry_and_join_have_their_subcommands_and_say_what_is_missing() {
    let help = String::from_utf8(sixmesh(&["registry", "--help"]).stdout).unwrap();
    for sub in ["init", "serve", "token", "list", "show", "revoke", "backup", "restore"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(&format!("{sub} "))),
            "{sub} missing:\n{help}"
        );
    }
    let out = sixmesh(&["join"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(String::from_utf8(out.stderr).unwrap().contains("--registry"));
    let dir = std::env::temp_dir().join(format!("sixmesh-cli-none-{}", std::process::id()));
    let out = sixmesh(&["registry", "list", "--state-dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("sixmesh registry init"), "says what to do next");
}

#[test]
fn sim_writes_reports_and_fails_on_a_broken_assertion() {
    let dir = std::env::temp_dir().join(format!("sixmesh-cli-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.toml");
    std::fs::write(
        &scenario,
        "duration_s = 15\n[nodes]\ncount = 6\n[manager]\nclient_count = 2\n\
         [[event]]\nat_s = 8\ndo = \"cut_tunnel\"\n\
         [assert]\nreachable_within_s = 5\nmax_mean_hops = 0.1\n",
    )
    .unwrap();
    let (json, html) = (dir.join("r.json"), dir.join("r.html"));
    let out = sixmesh(&[
        "sim",
        scenario.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(3), "an assertion cannot hold:\n{stdout}");
    assert!(stdout.contains("FAIL max_mean_hops") && stdout.contains("ok   reachable_within_s"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], false);
    assert_eq!(report["nodes"], 6);
    assert_eq!(report["events"].as_array().unwrap().len(), 2, "the start and the cut");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!doctype html>") && page.matches("<svg").count() >= 3);
    // The same run with a seed override and no failing assertion passes.
    std::fs::write(&scenario, "duration_s = 15\n[nodes]\ncount = 6\n[assert]\nno_loops = true\n").unwrap();
    let out = sixmesh(&["sim", scenario.to_str().unwrap(), "--seed", "9"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8(out.stdout).unwrap().contains("seed 9"));
    // On several threads: the same report, and the simulated nodes stay as silent as on one (the
    // cut makes a node log that it closes the tunnel: shown with RUST_LOG=info, hidden without).
    std::fs::write(
        &scenario,
        "duration_s = 20\n[nodes]\ncount = 6\n[manager]\nclient_count = 2\n\
         [[event]]\nat_s = 5\ndo = \"cut_tunnel\"\n[assert]\nno_loops = true\n",
    )
    .unwrap();
    let json2 = dir.join("r2.json");
    let out = sixmesh(&["sim", scenario.to_str().unwrap(), "--seed", "9", "--json", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let out = sixmesh(&[
        "sim",
        scenario.to_str().unwrap(),
        "--seed",
        "9",
        "--threads",
        "2",
        "--json",
        json2.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("INFO") && !stderr.contains("DEBUG"), "the nodes logged:\n{stderr}");
    let without_wall = |p: &std::path::Path| {
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("wall_s");
        v
    };
    assert_eq!(without_wall(&json), without_wall(&json2), "1 and 2 threads gave different runs");
    // A misspelt key is an error that names it and its line.
    std::fs::write(&scenario, "duration_s = 15\n[nodes]\ncuont = 6\n").unwrap();
    let out = sixmesh(&["sim", scenario.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cuont") && err.contains("line 3"), "{err}");
    // A mesh whose route tables cannot fit is refused before it starts, saying why and what to do.
    std::fs::write(&scenario, "duration_s = 15\n[nodes]\ncount = 100000\n[assert]\nno_loops = true\n")
        .unwrap();
    let out = sixmesh(&["sim", scenario.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("GB available") && err.contains("--nodes") && err.contains("--force"), "{err}");
    // Too many nodes for namespaces: refused before anything is set up, saying what to do.
    let out = sixmesh(&["sim", scenario.to_str().unwrap(), "--namespaces"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("at most 40") && err.contains("--nodes") && !err.contains("setting up"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
