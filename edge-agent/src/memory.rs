//! Giving memory that only start-up needed back to the system.
//!
//! Two kinds of memory stay resident after start-up although steady polling never uses them again:
//! the allocator's free memory, and the pages of the agent's own code and constants that only
//! start-up ran (command line, sensor map parsing and checking, the first connections).
//!
//! glibc's allocator returns freed memory to the system only from the top of each heap; memory
//! freed below an allocation that stays is kept, resident, for reuse. The agent has two moments
//! that free a lot below memory that stays: parsing the sensor map (about 40 MB of parser state
//! for a map of 10,000 tags, freed once the tags are read out of it) and encoding a batch. After
//! those, [`release_free_memory`] asks glibc for `malloc_trim(0)`, which hands every whole free
//! page back (`madvise`). See the footprint benchmark (`benches/footprint.rs`) for what it saves.
//!
//! The kernel maps an executable's pages into the process as they are first run, 64 KiB around
//! each page it faults in, and leaves them mapped: at 10,000 tags about 10 MB of the binary is
//! resident, of which steady polling runs about 7 MB. [`release_start_up_code`] asks the kernel
//! to page out the executable's read-only mappings (`MADV_PAGEOUT`); what polling runs comes back
//! at its next use, the rest stays out until it runs again (an edit of the sensor map).
//!
//! # What always holds
//! - No live allocation is moved or changed: only pages that no allocation uses are returned.
//! - The trim runs on the blocking pool, never on an async worker: it locks each arena while it
//!   walks it, which can take milliseconds on a large heap.
//! - After batches it runs at most once per [`AFTER_BATCH_INTERVAL`].
//! - Where the C library is not glibc (a musl build, another system) the trim does nothing.
//! - Paging out code changes no byte the process sees: `MADV_PAGEOUT` is advice, and a page it
//!   takes away is read back from the file on its next use. Only mappings of the executable that
//!   cannot be written are advised; writable data, the heap and the stacks are never touched.
//!   Where the kernel has no `MADV_PAGEOUT` (before Linux 5.4) nothing is paged out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// What just finished, for [`release_in_background`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Start-up: the sensor map was parsed and every part has what it needs.
    StartUp,
    /// An edit of the sensor map was checked (and applied or refused).
    Edit,
    /// A batch was encoded and uploaded.
    Batch,
}

/// Releases free memory, and the code only start-up ran, on the blocking pool. After start-up
/// and after an edit both are released; after a batch the trim runs at most once per
/// [`AFTER_BATCH_INTERVAL`], and code is paged out only after the process's first batch (its
/// first connection to the store is start-up code too). Must be called within a tokio runtime.
pub fn release_in_background(after: After) {
    static LAST_TRIM: Mutex<Option<Instant>> = Mutex::new(None);
    static FIRST_BATCH_SEEN: AtomicBool = AtomicBool::new(false);
    let trim = {
        let mut last = LAST_TRIM
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due =
            after != After::Batch || last.is_none_or(|at| at.elapsed() >= AFTER_BATCH_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    };
    let code = after != After::Batch || !FIRST_BATCH_SEEN.swap(true, Ordering::Relaxed);
    if !trim && !code {
        return;
    }
    tokio::task::spawn_blocking(move || {
        if trim {
            release_free_memory();
        }
        if code {
            match release_start_up_code() {
                Ok(bytes) => tracing::debug!(
                    component = "memory",
                    advised_bytes = bytes,
                    "asked the kernel to page out the agent's code until it runs again"
                ),
                Err(e) => tracing::debug!(
                    component = "memory",
                    error = %e,
                    "the agent's code stays mapped (no MADV_PAGEOUT on this kernel)"
                ),
            }
        }
    });
}

/// Asks the kernel to page out the read-only mappings of the running executable (its code and
/// constants): pages that steady work runs come back at their next use, the pages only start-up
/// ran leave the resident set. Returns how many bytes were advised. Does nothing (`Ok(0)`) off
/// Linux.
///
/// # Errors
/// The process's mappings cannot be read, or the kernel refused the advice (a kernel before
/// Linux 5.4 has no `MADV_PAGEOUT`).
pub fn release_start_up_code() -> std::io::Result<u64> {
    imp::page_out_executable()
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

    pub(super) fn page_out_executable() -> std::io::Result<u64> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let exe = std::fs::read_link("/proc/self/exe")?;
        let mut advised = 0;
        for (start, end) in super::read_only_ranges(&maps, &exe) {
            page_out(start, end)?;
            advised += u64::try_from(end - start).unwrap_or(u64::MAX);
        }
        Ok(advised)
    }

    #[allow(unsafe_code)]
    fn page_out(start: usize, end: usize) -> std::io::Result<()> {
        // SAFETY: the range is a whole mapping of the executable that the process cannot write,
        // read from /proc/self/maps just before. MADV_PAGEOUT is advice: it changes no content,
        // and a page it took is faulted back in from the file on its next use.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn trim() -> bool {
        false
    }

    pub(super) fn page_out_executable() -> std::io::Result<u64> {
        Ok(0)
    }
}

#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
/// The `(start, end)` address ranges of `exe`'s mappings in `maps` (the text of
/// `/proc/self/maps`) that are not writable.
fn read_only_ranges<'a>(
    maps: &'a str,
    exe: &'a std::path::Path,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    maps.lines().filter_map(move |line| {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let path = fields.nth(3)?.trim_start();
        if perms.contains('w') || std::path::Path::new(path) != exe {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        ))
    })
}

#[cfg(test)]
mod range_tests {
    use super::read_only_ranges;
    use std::path::Path;

    #[test]
    fn only_the_executables_mappings_that_cannot_be_written_are_picked() {
        let maps = "\
a71f6000-a75f0000 r--p 00000000 fe:00 10010659                   /usr/bin/edge-agent
a75f1000-a816e000 r-xp 003fa000 fe:00 10010659                   /usr/bin/edge-agent
a816e000-a81d2000 r--p 00f76000 fe:00 10010659                   /usr/bin/edge-agent
a81d2000-a81d6000 rw-p 00fda000 fe:00 10010659                   /usr/bin/edge-agent
b7ba6000-b86b2000 rw-p 00000000 00:00 0                          [heap]
c8000000-c845a000 rw-p 00000000 00:00 0 
d0209000-d035f000 r-xp 00026000 fe:00 326279                     /usr/lib/arm-linux-gnueabihf/libc.so.6
d035f000-d03b2000 r--p 0017c000 fe:00 10010659                   /usr/bin/edge-agent-old
eefa0000-eefc1000 rw-p 00000000 00:00 0                          [stack]
";
        let ranges: Vec<_> = read_only_ranges(maps, Path::new("/usr/bin/edge-agent")).collect();
        assert_eq!(
            ranges,
            [
                (0xa71f_6000, 0xa75f_0000),
                (0xa75f_1000, 0xa816_e000),
                (0xa816_e000, 0xa81d_2000),
            ]
        );
        // A binary replaced by a package upgrade while it runs: the kernel names it, and the
        // link to it, with " (deleted)".
        let upgraded = "7f00-8f00 r-xp 0 fe:00 1 /usr/bin/edge-agent (deleted)\n";
        let deleted = Path::new("/usr/bin/edge-agent (deleted)");
        assert_eq!(
            read_only_ranges(upgraded, deleted).collect::<Vec<_>>(),
            [(0x7f00, 0x8f00)]
        );
        assert_eq!(
            read_only_ranges(upgraded, Path::new("/usr/bin/edge-agent")).count(),
            0
        );
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
