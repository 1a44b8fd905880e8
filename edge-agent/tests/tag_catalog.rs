//! The tag catalog end to end: the real `edge-agent` binary against moto S3 publishes its
//! catalog at start, publishes a new one after a hot reload that changes a unit, and publishes
//! nothing when a reload or a restart leaves the catalog as it was.
//!
//! The Modbus device points at a loopback port where nothing listens: its readings are `bad`,
//! which does not matter here, and the catalog lists its tags all the same.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent::tag_catalog::{CatalogKey, TagCatalog};
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, free_port};

const GATEWAY: &str = "gw-cat";

fn map(endpoint: &str, bucket: &str, plc_port: u16, unit: &str) -> String {
    format!(
        r#"site = "plant-ost"
gateway = "{GATEWAY}"

[buffer]
path = "buffer.db"

[batch]
max_age = "1s"

[upload.s3]
bucket = "{bucket}"
endpoint = "{endpoint}"
region = "{S3_REGION}"
timeout = "10s"

[metrics]
enabled = false

[assets]
area = "press-shop"
line = "line1"

[assets.devices.press-3]
machine = "press-3"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
port = {plc_port}
poll_interval = "1s"
timeout = "100ms"

[[modbus.tags]]
name = "oil_temp"
register = "holding"
address = 0
type = "f32"
unit = "{unit}"
description = "Hydraulic oil temperature"

[[modbus.tags]]
name = "strokes"
register = "holding"
address = 2
type = "u32"
"#
    )
}

/// The agent binary, its config file following edits (looked at every 200 ms).
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(config: &Path, log: &Path) -> Self {
        let stderr = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--reload-interval", "200ms", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
            .env("AWS_REGION", S3_REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "edge_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the edge-agent binary was built for this test");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// How many log lines contain `text` so far.
    fn logged(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }

    /// SIGTERM, and waits for the agent to finish its shutdown.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the agent stopped with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed assertion must not leave the agent running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn catalogs(moto: &MotoServer, bucket: &str) -> Vec<(CatalogKey, TagCatalog)> {
    moto.list_keys(bucket, &CatalogKey::gateway_prefix("raw/", GATEWAY))
        .into_iter()
        .map(|key| {
            let parsed = CatalogKey::parse("raw/", &key)
                .unwrap_or_else(|e| panic!("the agent writes catalog keys: {e}"));
            let bytes = moto.get_object(bucket, &key).expect("listed just now");
            let catalog: TagCatalog = serde_json::from_slice(&bytes).unwrap();
            let catalog = catalog
                .check(&parsed)
                .unwrap_or_else(|e| panic!("{key} {e}"));
            (parsed, catalog)
        })
        .collect()
}

#[test]
fn the_catalog_is_published_at_start_after_a_unit_change_and_never_twice() {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let plc_port = free_port();
    std::fs::write(&config, map(&moto.endpoint(), &bucket, plc_port, "degC")).unwrap();
    let log = dir.path().join("agent-1.log");
    let agent = Agent::start(&config, &log);

    // At start.
    wait_for("the first catalog", &log, || {
        catalogs(&moto, &bucket).len() == 1
    });
    let (first_key, first) = catalogs(&moto, &bucket).remove(0);
    let oil = &first.tags[0];
    assert_eq!(
        (oil.device.as_str(), oil.tag.as_str(), oil.unit.as_deref()),
        ("press-3", "oil_temp", Some("degC"))
    );
    assert_eq!(oil.area.as_deref(), Some("press-shop"));
    assert_eq!(oil.line.as_deref(), Some("line1"));
    assert_eq!(oil.machine.as_deref(), Some("press-3"));
    assert_eq!(
        oil.description.as_deref(),
        Some("Hydraulic oil temperature")
    );
    assert_eq!(
        (oil.source.as_str(), oil.data_type.as_str()),
        ("modbus", "f32")
    );
    assert_eq!(first.tags[1].tag, "strokes");
    assert_eq!(first.tags[1].unit, None);
    // Batches still flow beside it.
    wait_for("a batch", &log, || {
        !moto
            .list_keys(&bucket, &format!("raw/gateway={GATEWAY}/"))
            .is_empty()
    });

    // A hot reload that changes a unit publishes a new catalog.
    std::fs::write(&config, map(&moto.endpoint(), &bucket, plc_port, "degF")).unwrap();
    wait_for("the second catalog", &log, || {
        catalogs(&moto, &bucket).len() == 2
    });
    let all = catalogs(&moto, &bucket);
    let (second_key, second) = &all[1];
    assert_eq!(
        all[0].0, first_key,
        "keys sort by the time they took effect"
    );
    assert_eq!(second.tags[0].unit.as_deref(), Some("degF"));
    assert_ne!(second.hash, first.hash);
    assert!(second_key.effective_at_us > first_key.effective_at_us);

    // A reload that changes nothing the catalog holds publishes nothing.
    let text = format!(
        "# poll faster\n{}",
        map(&moto.endpoint(), &bucket, plc_port, "degF")
            .replace("poll_interval = \"1s\"", "poll_interval = \"500ms\"")
    );
    std::fs::write(&config, text).unwrap();
    wait_for("the reload's unchanged catalog", &log, || {
        agent.logged("tag catalog unchanged") >= 1
    });
    assert_eq!(catalogs(&moto, &bucket).len(), 2);
    agent.stop();

    // Nor does a restart with the same map: the buffer's folder remembers what was published.
    let log = dir.path().join("agent-2.log");
    let agent = Agent::start(&config, &log);
    wait_for("the restart's unchanged catalog", &log, || {
        agent.logged("tag catalog unchanged") >= 1
    });
    assert_eq!(catalogs(&moto, &bucket).len(), 2);
    assert_eq!(agent.logged("tag catalog published"), 0);
    agent.stop();
}
