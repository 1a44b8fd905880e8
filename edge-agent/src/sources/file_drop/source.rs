//! The file-drop task: lists the folder, waits until a file has settled, reads it in chunks
//! that each commit with their progress mark, then moves it to `done/` or `failed/`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::mapping::{Mapping, MappingError};
use super::records::{Record, Records};
use super::state::State;
use crate::Reading;
use crate::config::{FileDrop, FileFormat};
use crate::sources::Delivery;

/// Readings per delivery: small enough that a restart repeats little work, large enough that a
/// big file does not cost one commit per row.
const CHUNK_READINGS: usize = 2_000;
/// Bad lines written to the log per file; the reason file lists them all.
const BAD_LINES_LOGGED: usize = 5;
/// How long to wait before retrying after the folder or the buffer could not be used.
const RETRY: Duration = Duration::from_secs(5);

/// Why a file-drop source could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum FileDropError {
    #[error("file drop `{source_name}`: {action} {}: {error}", path.display())]
    Io {
        source_name: String,
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("file drop `{source_name}`: the progress table in {}: {error}", buffer.display())]
    State {
        source_name: String,
        buffer: PathBuf,
        error: rusqlite::Error,
    },
    #[error("file drop `{source_name}`: a background task failed: {error}")]
    Task { source_name: String, error: String },
    #[error("file drop `{source_name}`: the mapping is unusable: {0}", .error)]
    Mapping {
        source_name: String,
        error: MappingError,
    },
    #[error("file drop `{source_name}`: the buffer writer stopped before {file} was committed")]
    WriterGone { source_name: String, file: String },
    #[error(
        "file drop `{source_name}`: stopped while reading {file}; the next start reads on from line {line}"
    )]
    Stopped {
        source_name: String,
        file: String,
        line: usize,
    },
}

/// Watches one folder until `shutdown` is cancelled.
pub async fn run_file_drop(
    config: FileDrop,
    buffer: PathBuf,
    deliveries: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
) {
    let span = info_span!("file_drop", component = "file_drop", source = config.name);
    async move {
        let mapping = match Mapping::new(&config) {
            Ok(m) => m,
            Err(error) => {
                // Validation refuses such a config; this guards configs built in code.
                error!(
                    "{}",
                    FileDropError::Mapping {
                        source_name: config.name.clone(),
                        error
                    }
                );
                return;
            }
        };
        let worker = Worker {
            config,
            mapping,
            buffer,
            deliveries,
            shutdown: shutdown.clone(),
        };
        worker.watch().await;
    }
    .instrument(span)
    .await;
}

/// A file seen in the folder, and since when it has looked like this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime_ns: i64,
}

#[derive(Clone)]
struct Worker {
    config: FileDrop,
    mapping: Mapping,
    buffer: PathBuf,
    deliveries: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
}

impl Worker {
    async fn watch(self) {
        let mut seen: HashMap<String, (Seen, Instant)> = HashMap::new();
        let mut state: Option<std::sync::Arc<std::sync::Mutex<State>>> = None;
        info!(folder = %self.config.folder.display(), "watching for dropped files");
        loop {
            let mut wait = self.config.poll_interval.0;
            match self.ready_files(&mut seen).await {
                Ok(ready) => {
                    for (name, look) in ready {
                        if self.shutdown.is_cancelled() {
                            return;
                        }
                        let st = match &state {
                            Some(st) => std::sync::Arc::clone(st),
                            None => match self.open_state().await {
                                Ok(st) => {
                                    let st = std::sync::Arc::new(std::sync::Mutex::new(st));
                                    state = Some(std::sync::Arc::clone(&st));
                                    st
                                }
                                Err(e) => {
                                    error!("{e}");
                                    wait = RETRY;
                                    break;
                                }
                            },
                        };
                        let worker = self.clone();
                        let file = name.clone();
                        let outcome = tokio::task::spawn_blocking(move || {
                            let st = st.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            worker.process(&st, &file, look)
                        })
                        .await;
                        match outcome {
                            Ok(Ok(())) => {
                                seen.remove(&name);
                            }
                            Ok(Err(e @ FileDropError::Stopped { .. })) => {
                                info!(file = name, "{e}");
                                return;
                            }
                            Ok(Err(e @ FileDropError::WriterGone { .. })) => {
                                warn!(file = name, "{e}");
                                return;
                            }
                            Ok(Err(e)) => {
                                error!(file = name, "{e}");
                                wait = RETRY;
                            }
                            Err(e) => error!(file = name, "reading the file failed: {e}"),
                        }
                    }
                }
                Err(e) => {
                    error!("{e}");
                    wait = RETRY;
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn open_state(&self) -> Result<State, FileDropError> {
        let buffer = self.buffer.clone();
        let name = self.config.name.clone();
        tokio::task::spawn_blocking(move || {
            State::open(&buffer, &name).map_err(|error| FileDropError::State {
                source_name: name,
                buffer,
                error,
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(FileDropError::Task {
                source_name: self.config.name.clone(),
                error: e.to_string(),
            })
        })
    }

    /// The files that have not changed for `settle`, oldest first. A file is a candidate when
    /// it is a regular file whose name does not start with `.` and does not end in `.tmp` or
    /// `.part` (the names writers use until they rename the finished file).
    async fn ready_files(
        &self,
        seen: &mut HashMap<String, (Seen, Instant)>,
    ) -> Result<Vec<(String, Seen)>, FileDropError> {
        let folder = self.config.folder.clone();
        let listing = tokio::task::spawn_blocking(move || list(&folder))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|error| FileDropError::Io {
                source_name: self.config.name.clone(),
                action: "cannot list the folder",
                path: self.config.folder.clone(),
                error,
            })?;
        let now = Instant::now();
        seen.retain(|name, _| listing.iter().any(|(n, _)| n == name));
        let mut ready = Vec::new();
        for (name, look) in listing {
            match seen.get(&name) {
                Some((before, since)) if *before == look => {
                    if now.duration_since(*since) >= self.config.settle.0 {
                        ready.push((name, look));
                    }
                }
                _ => {
                    seen.insert(name, (look, now));
                }
            }
        }
        ready.sort_by(|a, b| a.1.mtime_ns.cmp(&b.1.mtime_ns).then_with(|| a.0.cmp(&b.0)));
        Ok(ready)
    }

    fn io(&self, action: &'static str, path: &Path, error: std::io::Error) -> FileDropError {
        FileDropError::Io {
            source_name: self.config.name.clone(),
            action,
            path: path.to_owned(),
            error,
        }
    }

    fn state_err(&self, error: rusqlite::Error) -> FileDropError {
        FileDropError::State {
            source_name: self.config.name.clone(),
            buffer: self.buffer.clone(),
            error,
        }
    }

    /// Reads one settled file into the buffer and moves it out of the folder.
    fn process(&self, state: &State, name: &str, look: Seen) -> Result<(), FileDropError> {
        let path = self.config.folder.join(name);
        let file = std::fs::File::open(&path).map_err(|e| self.io("cannot open", &path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| self.io("cannot read the size of", &path, e))?;
        if Seen::of(&meta) != look {
            // Changed since it settled: the next listings watch it settle again.
            return Ok(());
        }
        let progress = state
            .progress(name, look.size, look.mtime_ns)
            .map_err(|e| self.state_err(e))?;

        let outcome = self.read(
            state,
            name,
            file,
            progress.id,
            if progress.done {
                usize::MAX
            } else {
                progress.next_line
            },
        )?;
        state.finish(progress.id).map_err(|e| self.state_err(e))?;
        self.move_out(name, &path, &outcome)
    }

    /// Parses the whole file and delivers the readings of the rows from `from_line` on.
    fn read(
        &self,
        state: &State,
        name: &str,
        file: std::fs::File,
        id: i64,
        from_line: usize,
    ) -> Result<Outcome, FileDropError> {
        let mut outcome = Outcome::default();
        let file_parts = match &self.mapping.file_name {
            None => HashMap::new(),
            Some(pattern) => {
                let Some(parts) = pattern.captures(name) else {
                    outcome.failed = Some(format!(
                        "the file name does not match file_name `{}`",
                        self.config.file_name.as_deref().unwrap_or_default()
                    ));
                    return Ok(outcome);
                };
                parts
            }
        };
        let path = self.config.folder.join(name);
        let mut records = Records::new(
            BufReader::new(file),
            self.config.format,
            self.config.delimiter,
        );
        if self.config.format == FileFormat::Csv {
            let header = records
                .header()
                .map_err(|e| self.io("cannot read", &path, e))?;
            let Some(header) = header else {
                // An empty file: nothing to read, nothing wrong.
                return Ok(outcome);
            };
            let missing: Vec<&str> = std::iter::once(self.mapping.timestamp.as_str())
                .chain(self.mapping.device.columns())
                .chain(
                    self.mapping
                        .values
                        .iter()
                        .flat_map(|v| std::iter::once(v.column.as_str()).chain(v.tag.columns())),
                )
                .filter(|c| !header.contains_key(*c))
                .collect();
            if let Some(first) = missing.first() {
                let mut found: Vec<(&String, &usize)> = header.iter().collect();
                found.sort_by_key(|(_, i)| **i);
                outcome.failed = Some(format!(
                    "column `{first}` is not in the header (line 1), which has {}; fix the file or the mapping",
                    found
                        .iter()
                        .map(|(n, _)| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                return Ok(outcome);
            }
        }
        let mut chunk: Vec<Reading> = Vec::new();
        loop {
            let record = records
                .next_record()
                .map_err(|e| self.io("cannot read", &path, e))?;
            let Some(record) = record else { break };
            let line = match &record {
                Record::Csv { line, .. } | Record::Json { line, .. } | Record::Bad { line, .. } => {
                    *line
                }
            };
            outcome.rows += 1;
            let readings = match &record {
                Record::Bad { reason, .. } => Err(reason.clone()),
                _ => self
                    .mapping
                    .row(&|c| records.cell(&record, c), &file_parts)
                    .map_err(|e| e.to_string()),
            };
            match readings {
                Err(reason) => outcome.bad.push((line, reason)),
                Ok(readings) => {
                    outcome.readings += readings.len();
                    outcome.good_rows += 1;
                    if line >= from_line {
                        chunk.extend(readings);
                    }
                }
            }
            if chunk.len() >= CHUNK_READINGS {
                self.deliver(state, name, id, records.next_line(), &mut chunk)?;
                if self.shutdown.is_cancelled() {
                    return Err(FileDropError::Stopped {
                        source_name: self.config.name.clone(),
                        file: name.to_owned(),
                        line: records.next_line(),
                    });
                }
            }
        }
        if !chunk.is_empty() {
            self.deliver(state, name, id, records.next_line(), &mut chunk)?;
        }
        if outcome.good_rows == 0 && !outcome.bad.is_empty() {
            outcome.failed = Some(format!("none of its {} rows could be read", outcome.rows));
        }
        Ok(outcome)
    }

    /// Hands one chunk to the buffer writer with its progress mark and waits for the commit.
    fn deliver(
        &self,
        state: &State,
        name: &str,
        id: i64,
        next_line: usize,
        chunk: &mut Vec<Reading>,
    ) -> Result<(), FileDropError> {
        let readings = std::mem::take(chunk);
        let last = readings
            .last()
            .expect("a chunk is delivered only when it holds readings");
        state
            .mark(id, next_line, last)
            .map_err(|e| self.state_err(e))?;
        let gone = || FileDropError::WriterGone {
            source_name: self.config.name.clone(),
            file: name.to_owned(),
        };
        let (committed, done) = oneshot::channel();
        self.deliveries
            .blocking_send(Delivery {
                readings,
                committed,
            })
            .map_err(|_| gone())?;
        done.blocking_recv().map_err(|_| gone())?;
        Ok(())
    }

    /// Writes the reason file (when there is a reason) and then moves the file, so a file in
    /// `done/` or `failed/` always has its reason next to it.
    fn move_out(&self, name: &str, path: &Path, outcome: &Outcome) -> Result<(), FileDropError> {
        let to = self.config.folder.join(if outcome.failed.is_some() {
            "failed"
        } else {
            "done"
        });
        std::fs::create_dir_all(&to).map_err(|e| self.io("cannot create", &to, e))?;
        let target = free_name(&to, name);
        let target_name = target
            .file_name()
            .map_or_else(|| name.to_owned(), |n| n.to_string_lossy().into_owned());
        let reason = outcome.reason(name);
        if let Some(text) = &reason {
            let reason_path = to.join(format!("{target_name}.reason.txt"));
            std::fs::write(&reason_path, text)
                .map_err(|e| self.io("cannot write", &reason_path, e))?;
        }
        std::fs::rename(path, &target).map_err(|e| self.io("cannot move", path, e))?;
        for (line, why) in outcome.bad.iter().take(BAD_LINES_LOGGED) {
            warn!(file = name, line, "bad row: {why}");
        }
        if let Some(why) = &outcome.failed {
            warn!(file = name, moved_to = %target.display(), "file failed: {why}");
        } else {
            info!(
                file = name,
                rows = outcome.rows,
                readings = outcome.readings,
                bad_rows = outcome.bad.len(),
                moved_to = %target.display(),
                "file read"
            );
        }
        Ok(())
    }
}

/// What reading a file found.
#[derive(Debug, Default)]
struct Outcome {
    rows: usize,
    good_rows: usize,
    readings: usize,
    /// Line and reason of every row that gave no readings.
    bad: Vec<(usize, String)>,
    /// Why the file goes to `failed/`.
    failed: Option<String>,
}

impl Outcome {
    /// The reason file's text: why the file failed, and every bad row with its line.
    fn reason(&self, name: &str) -> Option<String> {
        if self.failed.is_none() && self.bad.is_empty() {
            return None;
        }
        let mut text = match &self.failed {
            Some(why) => format!("{name}: {why}\n"),
            None => format!(
                "{name}: {} of {} rows could not be read; the {} readings of the other rows are in the buffer\n",
                self.bad.len(),
                self.rows,
                self.readings
            ),
        };
        for (line, why) in &self.bad {
            let _ = writeln!(text, "line {line}: {why}");
        }
        Some(text)
    }
}

impl Seen {
    fn of(meta: &std::fs::Metadata) -> Self {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Self {
            size: meta.len(),
            mtime_ns,
        }
    }
}

/// The candidate files in the folder with their size and modification time.
fn list(folder: &Path) -> std::io::Result<Vec<(String, Seen)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let unfinished = Path::new(&name)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("tmp") || e.eq_ignore_ascii_case("part"));
        if name.starts_with('.') || unfinished {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            found.push((name, Seen::of(&meta)));
        }
    }
    Ok(found)
}

/// `folder/name`, or `folder/<stem>.<n>.<ext>` when a file of that name is already there.
fn free_name(folder: &Path, name: &str) -> PathBuf {
    let first = folder.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, Some(e)),
        _ => (name, None),
    };
    (2..=u32::MAX)
        .map(|n| match ext {
            Some(ext) => folder.join(format!("{stem}.{n}.{ext}")),
            None => folder.join(format!("{stem}.{n}")),
        })
        .find(|p| !p.exists())
        .expect("some numbered name is free")
}
