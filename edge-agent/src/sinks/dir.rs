use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::SinkError;
use crate::config::DirUpload;

/// A local folder that plays the bucket: the key becomes the relative path.
pub struct DirSink {
    root: PathBuf,
    prefix: String,
}

impl DirSink {
    pub fn new(config: &DirUpload) -> Self {
        Self {
            root: config.path.clone(),
            prefix: config.prefix.clone(),
        }
    }

    pub fn describe(&self) -> String {
        self.root.join(&self.prefix).display().to_string()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Writes to a temporary file, syncs it and renames it into place, so a reader never sees a
    /// half-written batch and a crash leaves either the old state or the whole file.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        let target = self.root.join(key);
        let describe = self.describe();
        let key_owned = key.to_owned();
        tokio::task::spawn_blocking(move || write_atomically(&target, &body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|message| SinkError::Put {
                target: describe,
                key: key_owned,
                message,
            })
    }
}

fn write_atomically(target: &Path, body: &[u8]) -> std::io::Result<()> {
    let parent = target
        .parent()
        .ok_or_else(|| std::io::Error::other("key has no parent folder"))?;
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, target)?;
    // The rename is durable only once the folder entry is on disk.
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn puts_the_key_as_a_relative_path_and_overwrites_identically() {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::new(&DirUpload {
            path: dir.path().to_owned(),
            prefix: "raw/".into(),
        });
        let key = "raw/gateway=gw-1/00000000000000000001.parquet";
        sink.put(key, Bytes::from_static(b"abc")).await.unwrap();
        sink.put(key, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(key)).unwrap(), b"abc");
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("raw/gateway=gw-1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec!["00000000000000000001.parquet"]);
    }
}
