//! Durable enrollments per second over HTTPS on loopback, 16 concurrent
//! clients, with p50/p99 latency (see `sixmesh_registry::bench`).
//!
//! Run: `cargo bench -p sixmesh-registry --bench enroll` (optionally
//! `-- <total enrollments>`, default 4000). Results go in BENCHMARKS.md.

const CLIENTS: usize = 16;

fn main() {
    let total: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(4000);
    let dir = std::env::temp_dir().join(format!("sixmesh-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let report = rt.block_on(sixmesh_registry::bench::enroll_benchmark(&dir, total, CLIENTS));
    let _ = std::fs::remove_dir_all(&dir);
    match report {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
