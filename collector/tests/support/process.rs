//! The `collector` binary run as a service by a test, and what the tests ask its metrics
//! endpoint. Included with `#[path]` by the test files that need it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `collector COMMAND --config CONFIG`; stopped with SIGTERM by [`Running::stop`],
/// killed (by its pid) if a test fails before that.
pub(crate) struct Running {
    command: &'static str,
    child: Option<Child>,
    stderr: PathBuf,
}

impl Running {
    /// Starts `collector command --config config` with `RUST_LOG=warn,collector=info` and
    /// `env`, its stderr in `dir`.
    pub(crate) fn start(
        command: &'static str,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let stderr = dir.join("collector.stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_collector"))
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,collector=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            command,
            child: Some(child),
            stderr,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit code.
    pub(crate) fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "collector {} did not stop on SIGTERM",
                self.command
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 GET over a fresh connection: (status, body); `None` while nothing answers.
pub(crate) fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    pipeline_e2e::http_get(port, path, &auth).ok()
}

/// The value of the sample `name{labels}` (exactly as rendered) in a scrape.
pub(crate) fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
