//! `leuknet::malloc::limit_arenas` against the real glibc: threads that allocate at once share
//! the limited arenas, and without the limit they get more (so the check can fail). Each case
//! runs in a fresh child process of this test binary, since the limit cannot be undone.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::Command;
use std::sync::{Arc, Barrier};

const CHILD: &str = "LEUKNET_TEST_MALLOC_CHILD";
const THREADS: usize = 12;

/// In a child: applies the limit named by `CHILD`, then has THREADS threads allocate together,
/// and prints the arena count.
#[test]
fn child_allocates_from_many_threads() {
    let Ok(limit) = std::env::var(CHILD) else {
        return; // only meaningful in the child started below
    };
    let limit: u32 = limit.parse().unwrap();
    let applied = leuknet::malloc::limit_arenas(limit).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut keep = Vec::new();
                for n in 0..2000 {
                    keep.push(vec![i as u8; 1024 + n % 4096]);
                    if keep.len() > 64 {
                        keep.remove(0);
                    }
                }
                barrier.wait();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    println!(
        "applied={applied:?} arenas={}",
        leuknet::malloc::arena_count().unwrap()
    );
}

/// Runs the child case with `limit` (and `MALLOC_ARENA_MAX` when `env` is Some); returns
/// what `limit_arenas` reported and the arena count.
fn child(limit: u32, env: Option<&str>) -> (String, usize) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_allocates_from_many_threads",
        "--nocapture",
    ])
    .env(CHILD, limit.to_string())
    .env_remove("MALLOC_ARENA_MAX");
    if let Some(v) = env {
        cmd.env("MALLOC_ARENA_MAX", v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("applied="))
        .unwrap_or_else(|| panic!("no report from the child: {text}"));
    let (applied, count) = line.rsplit_once(" arenas=").unwrap();
    (applied.to_string(), count.trim().parse().unwrap())
}

#[test]
fn the_limit_caps_the_arenas_and_without_it_threads_get_more() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let (applied, limited) = child(2, None);
    assert_eq!(applied, "applied=Set(2)");
    assert!(limited <= 2, "limit 2 left {limited} arenas");
    let (applied, default) = child(0, None);
    assert_eq!(applied, "applied=Default");
    assert!(
        default > 2,
        "without a limit {THREADS} threads got only {default} arenas: the check could not fail"
    );
}

#[test]
fn malloc_arena_max_in_the_environment_wins() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let (applied, count) = child(2, Some("3"));
    assert_eq!(applied, "applied=FromEnvironment(\"3\")");
    assert!(count <= 3, "MALLOC_ARENA_MAX=3 left {count} arenas");
}
