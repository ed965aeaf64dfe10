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

fn arenas_in_child(limit: u32) -> usize {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_allocates_from_many_threads",
            "--nocapture",
        ])
        .env(CHILD, limit.to_string())
        .env_remove("MALLOC_ARENA_MAX")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("applied="))
        .unwrap_or_else(|| panic!("no report from the child: {text}"));
    line.rsplit("arenas=")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_limit_caps_the_arenas_and_without_it_threads_get_more() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let limited = arenas_in_child(2);
    let default = arenas_in_child(0);
    assert!(limited <= 2, "limit 2 left {limited} arenas");
    assert!(
        default > 2,
        "without a limit {THREADS} threads got only {default} arenas: the check could not fail"
    );
}
