//! Giving the allocator's free memory back to the system.
//!
//! glibc's allocator returns freed memory to the system only from the top of each heap; memory
//! freed below an allocation that stays is kept, resident, for reuse. The agent has two moments
//! that free a lot below memory that stays: parsing the sensor map (about 40 MB of parser state
//! for a map of 10,000 tags, freed once the tags are read out of it) and encoding a batch. After
//! those, [`release_free_memory`] asks glibc for `malloc_trim(0)`, which hands every whole free
//! page back (`madvise`). See the footprint benchmark (`benches/footprint.rs`) for what it saves.
//!
//! # What always holds
//! - No live allocation is moved or changed: only pages that no allocation uses are returned.
//! - The trim runs on the blocking pool, never on an async worker: it locks each arena while it
//!   walks it, which can take milliseconds on a large heap.
//! - After batches it runs at most once per [`AFTER_BATCH_INTERVAL`].
//! - Where the C library is not glibc (a musl build, another system) it does nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest time between two trims after batch uploads. A trim takes milliseconds (about 5 ms
/// to hand back 64 MiB, in a debug build), and at 10,000 tags a second a batch of the default
/// 50,000 rows goes every 5 s; trimming only every 30 s left the resident memory 7 MB higher
/// (footprint benchmark). The bound is for a small `batch.max_rows`, where batches can follow
/// each other many times a second.
pub const AFTER_BATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Hands the allocator's free pages back to the system now, on the calling thread. Returns
/// whether the allocator gave anything back.
pub fn release_free_memory() -> bool {
    let started = Instant::now();
    let released = imp::trim();
    tracing::debug!(
        component = "memory",
        released,
        trim_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "asked the allocator to return its free pages"
    );
    released
}

/// Releases free memory on the blocking pool, unless the last release asked for by this function
/// was less than `min_interval` ago. Must be called within a tokio runtime.
pub fn release_in_background(min_interval: Duration) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < min_interval) {
            return;
        }
        *last = Some(Instant::now());
    }
    tokio::task::spawn_blocking(release_free_memory);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    // The workspace denies unsafe code; this call is its one exception. `malloc_trim` takes no
    // pointer and touches no allocation of ours.
    #[allow(unsafe_code)]
    pub(super) fn trim() -> bool {
        // SAFETY: `malloc_trim(0)` only walks glibc's own arenas, under their locks, and returns
        // whole free pages to the kernel; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn trim() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The anonymous memory of this process (heap and stacks), in KiB.
    fn anon_kib() -> u64 {
        pipeline_e2e::proc_kib("/proc/self/status", "RssAnon:")
            .expect("RssAnon in /proc/self/status")
    }

    #[test]
    fn memory_freed_below_live_allocations_goes_back_to_the_system() {
        // 64 MiB in small allocations, as a parser's tree is, and copies of every 64th made
        // after it, as the tags read out of it are: the copies sit above the tree in the heap,
        // so once the tree is freed glibc cannot shrink its heap past them and keeps it all.
        let tree: Vec<Box<[u8; 240]>> = (0..280_000_usize)
            .map(|i| Box::new([u8::try_from(i % 251).unwrap(); 240]))
            .collect();
        let kept: Vec<Box<[u8; 240]>> = tree.iter().step_by(64).map(|b| Box::new(**b)).collect();
        drop(tree);
        let before = anon_kib();
        assert!(release_free_memory(), "glibc had free pages to give back");
        let after = anon_kib();
        assert!(
            before.saturating_sub(after) > 32 * 1024,
            "anonymous memory went from {before} KiB to {after} KiB; at least 32 MiB of the \
             64 MiB freed should have gone back"
        );
        assert_eq!(kept.len(), 280_000_usize.div_ceil(64));
        assert!(
            kept.iter()
                .enumerate()
                .all(|(i, b)| usize::from(b[0]) == i * 64 % 251),
            "the kept allocations are untouched"
        );
    }
}
