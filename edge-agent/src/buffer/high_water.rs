//! The seq high-water file `<buffer>.seq`: a copy, outside the database, of how far `seq` has
//! gone. It lets `seq` keep rising when the database itself is lost or rolled back.

use std::io::Write;
use std::path::{Path, PathBuf};

/// How many `seq` values one write of the high-water file reserves. Larger blocks mean fewer
/// file writes (one fsync per block of readings); after a total loss of the database, `seq`
/// skips the unused rest of the block, which costs nothing but a visible jump.
pub(crate) const RESERVE_BLOCK: i64 = 100_000;

/// The marks, each a `seq` value. All three only ever grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HighWater {
    /// Every `seq` ever assigned is at most this (reserved before the rows are inserted).
    pub(crate) reserved: i64,
    /// Every `seq` that may have left the gateway is at most this (written when a batch is cut,
    /// before its upload starts).
    pub(crate) cut: i64,
    /// Every `seq` up to this was confirmed by the upload target (written before the rows are
    /// deleted).
    pub(crate) completed: i64,
}

/// `<buffer>.seq`, next to the database.
pub(crate) fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".seq");
    PathBuf::from(name)
}

impl HighWater {
    /// Reads the marks; `Ok(None)` when the file does not exist. An unreadable or garbled file is
    /// an `Err` with the reason, for the caller to log: the marks are a safety net, not data.
    pub(crate) fn load(db: &Path) -> Result<Option<Self>, String> {
        let path = path_for(db);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Self::parse(&text)
            .map(Some)
            .ok_or_else(|| format!("{} is not a seq high-water file", path.display()))
    }

    fn parse(text: &str) -> Option<Self> {
        let mut marks = Self::default();
        let (mut reserved, mut cut, mut completed) = (false, false, false);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=')?;
            let value: i64 = value.trim().parse().ok()?;
            match key.trim() {
                "reserved" => (marks.reserved, reserved) = (value, true),
                "cut" => (marks.cut, cut) = (value, true),
                "completed" => (marks.completed, completed) = (value, true),
                _ => return None,
            }
        }
        (reserved && cut && completed).then_some(marks)
    }

    /// Replaces the file atomically and durably: a power cut leaves either the old or the new
    /// marks, never a torn file.
    pub(crate) fn store(&self, db: &Path) -> std::io::Result<()> {
        let path = path_for(db);
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            let mut file = std::fs::File::create(&tmp)?;
            write!(
                file,
                "# edge-agent buffer seq high-water marks; keep this file next to the buffer\n\
                 reserved = {}\ncut = {}\ncompleted = {}\n",
                self.reserved, self.cut, self.completed
            )?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        // The rename is durable only once the folder entry is.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The highest `seq` any reading may have had.
    pub(crate) fn highest(&self) -> i64 {
        self.reserved.max(self.cut).max(self.completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        assert_eq!(HighWater::load(&db), Ok(None));
        let marks = HighWater {
            reserved: 100_007,
            cut: 5,
            completed: 3,
        };
        marks.store(&db).unwrap();
        assert_eq!(HighWater::load(&db), Ok(Some(marks)));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b.db.seq")).unwrap(),
            "# edge-agent buffer seq high-water marks; keep this file next to the buffer\n\
             reserved = 100007\ncut = 5\ncompleted = 3\n"
        );
    }

    #[test]
    fn a_garbled_file_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        std::fs::write(dir.path().join("b.db.seq"), "reserved = 12\ncut = x\n").unwrap();
        assert_eq!(
            HighWater::load(&db),
            Err(format!(
                "{} is not a seq high-water file",
                dir.path().join("b.db.seq").display()
            ))
        );
    }
}
