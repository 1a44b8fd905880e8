//! Progress of a backfill or reprocess on stderr: a bar redrawn in place on a terminal, plain
//! lines every few seconds (or every tenth of the files) otherwise, so logs stay readable.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// How often a plain progress line is written at the latest when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Width of the bar in characters.
const BAR_WIDTH: usize = 24;

/// The counted work and how much of it is done.
#[derive(Debug)]
pub(crate) struct Progress {
    label: &'static str,
    total_files: usize,
    total_bytes: u64,
    files: usize,
    bytes: u64,
    rows: usize,
    started: Instant,
    last_line: Instant,
    next_mark: usize,
    step: usize,
    terminal: bool,
}

impl Progress {
    /// Starts counting `total_files` files of `total_bytes` bytes, labelled `label`
    /// ("backfill", "reprocess").
    pub(crate) fn new(label: &'static str, total_files: usize, total_bytes: u64) -> Self {
        let now = Instant::now();
        let step = total_files.div_ceil(10).max(1);
        let progress = Self {
            label,
            total_files,
            total_bytes,
            files: 0,
            bytes: 0,
            rows: 0,
            started: now,
            last_line: now,
            next_mark: step,
            step,
            terminal: std::io::stderr().is_terminal(),
        };
        eprintln!(
            "{label}: {total_files} files, {} to apply",
            human_bytes(total_bytes)
        );
        progress
    }

    /// Counts a finished chunk and shows the progress when it is due.
    pub(crate) fn advance(&mut self, files: usize, bytes: u64, rows: usize) {
        self.files += files;
        self.bytes += bytes;
        self.rows += rows;
        let now = Instant::now();
        if self.terminal {
            let mut err = std::io::stderr().lock();
            // `\r` and erase-to-end-of-line redraw the bar in place.
            let _ = write!(err, "\r{}\x1b[K", self.bar(now));
            let _ = err.flush();
        } else if self.files >= self.next_mark || now - self.last_line >= LINE_EVERY {
            while self.next_mark <= self.files {
                self.next_mark += self.step;
            }
            self.last_line = now;
            eprintln!("{}", self.line(now));
        }
    }

    /// Ends the bar's line, so what follows starts on a fresh one.
    pub(crate) fn finish(&self) {
        if self.terminal && self.files > 0 {
            eprintln!();
        }
    }

    /// Time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn counts(&self, now: Instant) -> String {
        let elapsed = now - self.started;
        format!(
            "{}/{} files, {} of {}, {} rows/s, ETA {}",
            self.files,
            self.total_files,
            human_bytes(self.bytes),
            human_bytes(self.total_bytes),
            rate(self.rows, elapsed),
            self.eta(elapsed)
                .map_or_else(|| "--".to_owned(), human_duration),
        )
    }

    /// A plain progress line, for logs.
    fn line(&self, now: Instant) -> String {
        format!(
            "{}: {}% {}",
            self.label,
            percent(self.bytes, self.total_bytes),
            self.counts(now)
        )
    }

    /// The bar a terminal shows.
    fn bar(&self, now: Instant) -> String {
        let filled = if self.total_bytes == 0 {
            BAR_WIDTH
        } else {
            usize::try_from(
                u128::from(self.bytes.min(self.total_bytes)) * BAR_WIDTH as u128
                    / u128::from(self.total_bytes),
            )
            .unwrap_or(BAR_WIDTH)
        };
        format!(
            "{} [{}{}] {}",
            self.label,
            "#".repeat(filled),
            ".".repeat(BAR_WIDTH - filled),
            self.counts(now)
        )
    }

    /// The time left at the byte rate so far (bytes are what reading and decoding cost);
    /// `None` before anything is done.
    fn eta(&self, elapsed: Duration) -> Option<Duration> {
        if self.bytes == 0 {
            return None;
        }
        let left = self.total_bytes.saturating_sub(self.bytes);
        let nanos = elapsed.as_nanos() * u128::from(left) / u128::from(self.bytes);
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        u64::try_from(u128::from(done.min(total)) * 100 / u128::from(total)).unwrap_or(100)
    }
}

fn rate(rows: usize, elapsed: Duration) -> u64 {
    let millis = elapsed.as_millis().max(1);
    u64::try_from(rows as u128 * 1000 / millis).unwrap_or(u64::MAX)
}

/// `512 B`, `1.5 KiB`, `3.2 GiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut scaled = bytes;
    while scaled >= 1024 * 1024 && unit + 1 < UNITS.len() {
        scaled /= 1024;
        unit += 1;
    }
    // One decimal from integer arithmetic: `scaled` is below 1024², so `* 10` cannot overflow.
    let tenths = scaled * 10 / 1024;
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

/// `7s`, `3m05s`, `2h01m`.
pub(crate) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(total_files: usize, total_bytes: u64) -> Progress {
        let now = Instant::now();
        Progress {
            label: "backfill",
            total_files,
            total_bytes,
            files: 0,
            bytes: 0,
            rows: 0,
            started: now,
            last_line: now,
            next_mark: 1,
            step: 1,
            terminal: false,
        }
    }

    #[test]
    fn the_eta_follows_the_byte_rate_so_far() {
        let mut p = progress(4, 4000);
        let start = p.started;
        assert_eq!(
            p.line(start + Duration::from_secs(1)),
            "backfill: 0% 0/4 files, 0 B of 3.9 KiB, 0 rows/s, ETA --"
        );
        p.files = 1;
        p.bytes = 1000;
        p.rows = 500;
        assert_eq!(
            p.line(start + Duration::from_secs(10)),
            "backfill: 25% 1/4 files, 1000 B of 3.9 KiB, 50 rows/s, ETA 30s"
        );
        assert_eq!(
            p.bar(start + Duration::from_secs(10)),
            "backfill [######..................] 1/4 files, 1000 B of 3.9 KiB, 50 rows/s, ETA 30s"
        );
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_duration(Duration::from_secs(3 * 60 + 5)), "3m05s");
        assert_eq!(human_duration(Duration::from_mins(121)), "2h01m");
    }
}
