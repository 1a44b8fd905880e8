//! The agent pages out the code only start-up ran (`edge_agent::memory::release_start_up_code`),
//! checked on this test's own executable: its read-only pages leave the resident set, and every
//! byte it reads afterwards (code, constants, relocated tables) is what it was.
//!
//! Not a unit test: the unit tests also run under qemu-user (cross/qemu-smoke.sh), which takes
//! `MADV_PAGEOUT` as a hint it may ignore, so the resident set of the emulated code says nothing.

use std::hint::black_box;

/// KiB of this executable's mappings that cannot be written (code and constants) now resident,
/// summed over /proc/self/smaps.
fn resident_code_kib() -> u64 {
    let exe = std::fs::read_link("/proc/self/exe").expect("/proc/self/exe");
    let exe = exe.to_str().expect("a UTF-8 path");
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let perms = words.next().unwrap_or_default();
            ours = !perms.contains('w') && words.nth(3) == Some(exe);
        } else if ours && first == "Rss:" {
            kib += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("an Rss figure");
        }
    }
    kib
}

/// Constants and a table of functions, for reading back after the pages are gone.
static WORDS: [&str; 4] = ["device", "tag", "value", "quality"];

fn double(x: u64) -> u64 {
    x * 2
}
fn square(x: u64) -> u64 {
    x * x
}
static TABLE: [fn(u64) -> u64; 2] = [double, square];

fn fingerprint() -> (String, u64, u64) {
    let words = black_box(&WORDS).join(",");
    let dynamic: Vec<Box<dyn Fn(u64) -> u64>> = vec![Box::new(|x| x + 1), Box::new(double)];
    let calls = black_box(&TABLE).iter().map(|f| f(7)).sum::<u64>();
    let dyn_calls = dynamic.iter().map(|f| f(7)).sum::<u64>();
    (words, calls, dyn_calls)
}

#[test]
fn the_executables_code_leaves_the_resident_set_and_comes_back_unchanged() {
    let before_fingerprint = fingerprint();
    // Run a good share of the code once, as start-up does: a sensor map parsed and checked.
    let map = edge_agent::config::load_str(
        "site = \"plant-ost\"\ngateway = \"gw-1\"\n",
        std::path::Path::new("agent.toml"),
    );
    black_box(&map);
    let before = resident_code_kib();
    assert!(
        before > 1024,
        "the test's own code should be resident before the release, {before} KiB is"
    );

    let advised = edge_agent::memory::release_start_up_code()
        .expect("MADV_PAGEOUT on this kernel (Linux 5.4 or later)");
    let after = resident_code_kib();
    assert!(
        advised >= before * 1024,
        "every resident read-only page was advised: {advised} bytes for {before} KiB resident"
    );
    assert!(
        after * 2 < before,
        "the executable's resident code went from {before} KiB to {after} KiB; at least half \
         of it should have been paged out"
    );

    assert_eq!(
        fingerprint(),
        before_fingerprint,
        "constants, function tables and vtables read back the same after the page-out"
    );
    assert_eq!(
        fingerprint(),
        ("device,tag,value,quality".to_owned(), 14 + 49, 8 + 14)
    );
}
