//! Sensor-map edits applied while the agent runs, through the whole agent loop with a local
//! folder as the upload target. Device `press-a` is served by an in-process tokio-modbus server
//! that counts the connections it accepts, so a test can see that an edit elsewhere left its
//! connection alone; `press-b` and `press-c` by pymodbus (`pipeline_e2e::PyModbusServer`).
//!
//! One test drives `edge_agent::run_with_reload` in process with a fast file watch (the reload
//! counters live in the process-wide metrics registry, so it is the only in-process test here);
//! the others run the real binary: one asks for reloads with SIGHUP only, one restarts an MQTT
//! broker's source (Mosquitto, `pipeline_e2e::Mosquitto`) in the middle of a stream of QoS 1
//! messages.

mod common;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_agent::ReloadOptions;
use edge_agent::contract::{Quality, Row};
use pipeline_e2e::{PyModbusServer, free_port, now_us};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

/// `press-a`'s only register, holding 0.
const A_VALUE: u16 = 111;

/// Answers holding register 0 with [`A_VALUE`]; any other read is refused.
struct PressA;

impl tokio_modbus::server::Service for PressA {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        let answer = match request {
            Request::ReadHoldingRegisters(0, 1) => {
                Ok(Response::ReadHoldingRegisters(vec![A_VALUE]))
            }
            Request::ReadHoldingRegisters(..) => Err(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// A Modbus TCP server on 127.0.0.1 that counts the connections it accepted.
struct CountingPlc {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CountingPlc {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let accepted = Arc::clone(&accepted);
            let stop = stop.clone();
            async move {
                let server = Server::new(listener);
                let on_connected = |stream, peer| {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    async move { accept_tcp_connection(stream, peer, |_| Ok(Some(PressA))) }
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = server.serve(&on_connected, |_| {}) => {}
                }
            }
        });
        Self {
            addr,
            accepted,
            stop,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("the server ends without panicking");
    }
}

/// The pymodbus PLC behind `press-b` (holding 0 and 1) and `press-c` (holding 2).
fn start_plc_bc() -> PyModbusServer {
    PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"0": [222], "1": [333], "2": [444]},
    }))
}

/// One `[[modbus]]` device polled every 100 ms, with u16 holding-register tags.
fn device(name: &str, addr: SocketAddr, tags: &[(&str, u16)]) -> String {
    let mut text = format!(
        "\n[[modbus]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\npoll_interval = \"100ms\"\ntimeout = \"500ms\"\n",
        addr.port()
    );
    for (tag, address) in tags {
        let _ = write!(
            text,
            "\n  [[modbus.tags]]\n  name = \"{tag}\"\n  register = \"holding\"\n  address = {address}\n  type = \"u16\"\n"
        );
    }
    text
}

/// A whole config: gateway `gateway`, batches cut every second into `landing/`, then `devices`.
fn config(gateway: &str, metrics: &str, devices: &[String]) -> String {
    format!(
        "site = \"plant-ost\"\ngateway = \"{gateway}\"\n\n[buffer]\ncommit_interval = \"50ms\"\n\n[batch]\nmax_age = \"1s\"\n\n[upload.dir]\npath = \"landing\"\n\n[metrics]\n{metrics}\n{}",
        devices.concat()
    )
}

/// Saves `text` as an editor that writes a new file and renames it over the old one does.
fn save_by_rename(path: &Path, text: &str) {
    let saved = path.with_extension("toml~");
    std::fs::write(&saved, text).unwrap();
    std::fs::rename(&saved, path).unwrap();
}

/// Waits until the uploaded rows satisfy `done`, and returns them.
fn wait_for_rows(landing: &Path, what: &str, done: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = common::uploaded_rows(landing);
        if done(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `rows` hold a reading of `device`/`tag` taken after `since_us`.
fn has(rows: &[Row], device: &str, tag: &str, since_us: i64) -> bool {
    rows.iter()
        .any(|r| r.device == device && r.tag == tag && r.ts_us > since_us)
}

/// Asserts that the rows' `seq` run 1, 2, 3, ... without a gap or a repeat, and that the
/// buffer kept nothing back.
fn assert_everything_uploaded(rows: &[Row], buffer: &Path) {
    assert!(!rows.is_empty());
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row.seq,
            i64::try_from(i).unwrap() + 1,
            "seq runs without gaps"
        );
    }
    let left = edge_agent::buffer::inspect(buffer).expect("the buffer can be read");
    assert_eq!(left.rows, 0, "nothing is left behind in the buffer");
}

/// Asserts that `press-a` read good every poll from `from_us` to `to_us`: no reload paused it.
fn assert_press_a_never_paused(rows: &[Row], from_us: i64, to_us: i64) {
    let mut ticks: Vec<i64> = vec![from_us];
    for row in rows.iter().filter(|r| r.device == "press-a") {
        assert_eq!(
            (row.quality, row.value),
            (Quality::Good, Some(f64::from(A_VALUE))),
            "{row:?}"
        );
        if (from_us..=to_us).contains(&row.ts_us) {
            ticks.push(row.ts_us);
        }
    }
    ticks.push(to_us);
    let longest = ticks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    // Polled every 100 ms; a restart would cost a reconnect and a stagger offset. Ten intervals
    // of slack for a loaded test machine.
    assert!(
        longest < 1_000_000,
        "press-a went {longest} µs without a reading"
    );
}

// One story from start to shutdown: the reload counters are process-wide, so it cannot be split.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_apply_while_running_and_an_invalid_one_keeps_the_running_map() {
    let press_a = CountingPlc::start().await;
    let plc = start_plc_bc();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let landing = dir.path().join("landing");
    let a = device("press-a", press_a.addr, &[("level", 0)]);
    let b = device("press-b", plc.address(), &[("temp", 0)]);
    let b_edited = device("press-b", plc.address(), &[("temp", 0), ("pressure", 1)]);
    let c = device("press-c", plc.address(), &[("flow", 2)]);
    let metrics = "enabled = false";
    std::fs::write(
        &file,
        config("gw-reload", metrics, &[a.clone(), b.clone(), c.clone()]),
    )
    .unwrap();

    let started_us = now_us();
    let cfg = edge_agent::config::load_file(&file).unwrap();
    let stop = CancellationToken::new();
    let reload = ReloadOptions {
        watch_interval: Some(Duration::from_millis(200)),
        sighup: false,
        ..ReloadOptions::new(&file)
    };
    let agent = tokio::spawn(edge_agent::run_with_reload(cfg, reload, stop.clone()));
    let reloads = || edge_agent::metrics::global().config_reloads();
    let wait_reloads = |expected: (u64, u64)| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while reloads() != expected {
            assert!(
                Instant::now() < deadline,
                "reloads (applied, rejected) are {:?}, expected {expected:?}",
                reloads()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        now_us()
    };

    let landing_ = landing.clone();
    tokio::task::spawn_blocking(move || {
        wait_for_rows(&landing_, "every device's first readings", |rows| {
            has(rows, "press-a", "level", 0)
                && has(rows, "press-b", "temp", 0)
                && has(rows, "press-c", "flow", 0)
        })
    })
    .await
    .unwrap();
    assert_eq!(reloads(), (0, 0), "the start is no reload");
    assert_eq!(press_a.accepted(), 1);

    // (a) A tag added to press-b, saved by rename: it appears, press-a is not touched.
    save_by_rename(
        &file,
        &config(
            "gw-reload",
            metrics,
            &[a.clone(), b_edited.clone(), c.clone()],
        ),
    );
    let applied_a = wait_reloads((1, 0)).await;
    let landing_ = landing.clone();
    let rows = tokio::task::spawn_blocking(move || {
        wait_for_rows(&landing_, "press-b's new tag", |rows| {
            has(rows, "press-b", "pressure", 0)
        })
    })
    .await
    .unwrap();
    let pressure: Vec<&Row> = rows.iter().filter(|r| r.tag == "pressure").collect();
    assert!(
        pressure
            .iter()
            .all(|r| r.value == Some(333.0) && r.ts_us <= now_us())
    );
    assert!(
        pressure.iter().all(|r| r.ts_us >= applied_a - 1_000_000),
        "no pressure reading before the edit"
    );
    assert_eq!(press_a.accepted(), 1, "press-a kept its connection");

    // (b) An invalid edit (a duplicate tag) that would also remove press-c: rejected, and the
    // running map, press-c included, keeps producing.
    let duplicate = device("press-a", press_a.addr, &[("level", 0), ("level", 0)]);
    std::fs::write(
        &file,
        config("gw-reload", metrics, &[duplicate, b_edited.clone()]),
    )
    .unwrap();
    let rejected_at = wait_reloads((1, 1)).await;
    // A gateway change is refused as a whole too, though the file is valid.
    std::fs::write(
        &file,
        config("gw-other", metrics, &[a.clone(), b_edited.clone()]),
    )
    .unwrap();
    let refused_at = wait_reloads((1, 2)).await;
    assert!(refused_at > rejected_at);
    let landing_ = landing.clone();
    tokio::task::spawn_blocking(move || {
        wait_for_rows(
            &landing_,
            "the running map's readings after the rejections",
            |rows| {
                has(rows, "press-a", "level", refused_at)
                    && has(rows, "press-b", "temp", refused_at)
                    && has(rows, "press-b", "pressure", refused_at)
                    && has(rows, "press-c", "flow", refused_at)
            },
        )
    })
    .await
    .unwrap();

    // (c) press-c removed by a valid edit: its readings stop, the others go on.
    std::fs::write(
        &file,
        config("gw-reload", metrics, &[a.clone(), b_edited.clone()]),
    )
    .unwrap();
    let removed_at = wait_reloads((2, 2)).await;
    let landing_ = landing.clone();
    let rows = tokio::task::spawn_blocking(move || {
        // Well past the next batch cut, so that a late press-c reading would show.
        wait_for_rows(
            &landing_,
            "readings 2 s after press-c was removed",
            |rows| {
                has(rows, "press-a", "level", removed_at + 2_000_000)
                    && has(rows, "press-b", "pressure", removed_at + 2_000_000)
            },
        )
    })
    .await
    .unwrap();
    let late: Vec<&Row> = rows
        .iter()
        .filter(|r| r.device == "press-c" && r.ts_us > removed_at)
        .collect();
    assert!(late.is_empty(), "press-c read after its removal: {late:?}");

    stop.cancel();
    agent
        .await
        .expect("the agent ends without panicking")
        .expect("the agent stops cleanly");
    let stopped_us = now_us();
    assert_eq!(
        press_a.accepted(),
        1,
        "press-a kept one connection throughout"
    );
    assert_eq!(reloads(), (2, 2));
    let rows = common::uploaded_rows(&landing);
    assert_everything_uploaded(&rows, &dir.path().join("buffer.db"));
    // Polling starts a stagger offset (< one interval) after the start.
    let first_a = rows
        .iter()
        .find(|r| r.device == "press-a")
        .map_or(stopped_us, |r| r.ts_us);
    assert!(first_a - started_us < 2_000_000);
    let last_a = rows
        .iter()
        .rev()
        .find(|r| r.device == "press-a")
        .map_or(started_us, |r| r.ts_us);
    assert_press_a_never_paused(&rows, first_a, last_a);
    press_a.stop().await;
}

/// The agent binary, its stderr in a file the test reads while it runs.
struct AgentProcess {
    child: Child,
    stderr: PathBuf,
}

impl AgentProcess {
    fn start(config: &Path, args: &[&str]) -> Self {
        let stderr = config.with_file_name("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "edge_agent=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("the edge-agent binary starts");
        Self { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to end on its own (after SIGTERM) and returns its exit code.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Only when a test failed half-way: the child must not outlive it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `(applied, rejected)` from the agent's `/metrics`.
fn scraped_reloads(port: u16) -> Option<(u64, u64)> {
    let (_, body) = pipeline_e2e::http_get(port, "/metrics", "").ok()?;
    let count = |result: &str| {
        let key = format!("plantline_agent_config_reloads_total{{result=\"{result}\"}} ");
        body.lines()
            .find_map(|line| line.strip_prefix(key.as_str()))
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count("applied")?, count("rejected")?))
}

fn wait_scraped(port: u16, expected: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = scraped_reloads(port);
        if got == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reloads (applied, rejected) are {got:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// One agent process from start to SIGTERM; each step depends on the one before.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_an_edit_and_logs_an_invalid_one_with_the_validation_report() {
    let press_a = CountingPlc::start().await;
    let plc = start_plc_bc();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let landing = dir.path().join("landing");
    let metrics_port = free_port();
    let metrics = format!("listen = \"127.0.0.1:{metrics_port}\"");
    let a = device("press-a", press_a.addr, &[("level", 0)]);
    let b = device("press-b", plc.address(), &[("temp", 0)]);
    let b_edited = device("press-b", plc.address(), &[("temp", 0), ("pressure", 1)]);
    std::fs::write(&file, config("gw-hup", &metrics, &[a.clone(), b])).unwrap();
    let agent = AgentProcess::start(&file, &["--reload-interval", "off"]);

    let (file_, landing_) = (file.clone(), landing.clone());
    let press_a_addr = press_a.addr;
    let step = tokio::task::spawn_blocking(move || {
        wait_for_rows(&landing_, "both devices' first readings", |rows| {
            has(rows, "press-a", "level", 0) && has(rows, "press-b", "temp", 0)
        });
        wait_scraped(metrics_port, (0, 0));

        // Saved, but with the file watch off nothing happens until SIGHUP.
        let a = device("press-a", press_a_addr, &[("level", 0)]);
        std::fs::write(
            &file_,
            config("gw-hup", &metrics, &[a.clone(), b_edited.clone()]),
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let before_hup = now_us();
        assert!(!has(
            &common::uploaded_rows(&landing_),
            "press-b",
            "pressure",
            0
        ));
        agent.signal("HUP");
        wait_scraped(metrics_port, (1, 0));
        let rows = wait_for_rows(&landing_, "press-b's new tag after SIGHUP", |rows| {
            has(rows, "press-b", "pressure", 0)
        });
        assert!(
            rows.iter()
                .filter(|r| r.tag == "pressure")
                .all(|r| r.ts_us > before_hup && r.value == Some(333.0))
        );

        // An invalid edit: the log carries the exact report `edge-agent validate` prints.
        let broken = a.replace(
            "address = 0\n  type = \"u16\"",
            "address = 65535\n  type = \"f32\"",
        );
        assert_ne!(broken, a);
        std::fs::write(&file_, config("gw-hup", &metrics, &[broken, b_edited])).unwrap();
        let validate = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("validate")
            .arg(&file_)
            .output()
            .unwrap();
        assert_eq!(validate.status.code(), Some(78));
        let report = String::from_utf8(validate.stderr).unwrap();
        assert!(report.contains("address"), "{report}");
        agent.signal("HUP");
        wait_scraped(metrics_port, (1, 1));
        let rejected_at = now_us();
        let log = agent.log();
        assert!(
            log.contains("the edited config is rejected and the running sensor map stays in force"),
            "{log}"
        );
        for line in report.lines() {
            assert!(
                log.contains(line),
                "`{line}` is missing from the log:\n{log}"
            );
        }
        // The running map goes on: press-a still reads its register at address 0.
        wait_for_rows(
            &landing_,
            "the running map's readings after the rejection",
            |rows| {
                has(rows, "press-a", "level", rejected_at)
                    && has(rows, "press-b", "pressure", rejected_at)
            },
        );
        agent.signal("TERM");
        agent.wait()
    });
    let (code, log) = step.await.unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(press_a.accepted(), 1, "press-a kept its connection:\n{log}");
    let rows = common::uploaded_rows(&landing);
    assert_everything_uploaded(&rows, &dir.path().join("buffer.db"));
    press_a.stop().await;
}

/// Publishes `count` QoS 1 messages `{"v": i}` to `topic`, one every `pace`, calling `midway`
/// after half of them; returns once the broker acknowledged every one.
async fn publish_paced(port: u16, topic: &str, count: u32, pace: Duration, midway: impl FnOnce()) {
    let mut options = rumqttc::MqttOptions::new("reload-publisher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < count {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                eventloop.poll().await.expect("the broker is up")
            {
                acked += 1;
            }
        }
        eventloop
    });
    let mut midway = Some(midway);
    for i in 0..count {
        if i == count / 2
            && let Some(midway) = midway.take()
        {
            midway();
        }
        client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("{{\"v\": {i}}}"),
            )
            .await
            .unwrap();
        tokio::time::sleep(pace).await;
    }
    tokio::time::timeout(Duration::from_secs(20), acks)
        .await
        .expect("the broker acknowledges every message within 20 s")
        .expect("the publisher's event loop ends without panicking");
}

/// Messages published in the MQTT reload test, 20 ms apart.
const COUNT: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_broker_restarted_by_an_edit_loses_no_message_published_meanwhile() {
    let broker = pipeline_e2e::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let landing = dir.path().join("landing");
    let metrics_port = free_port();
    let mqtt = |unit: &str| {
        format!(
            "\n[[mqtt]]\nname = \"line3\"\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"gw-reload-line3\"\nkeep_alive = \"5s\"\n\n  [[mqtt.subscriptions]]\n  topic = \"plant/+/temp\"\n  device = \"{{1}}\"\n  tag = \"temp\"\n  value = \"/v\"\n{unit}",
            broker.port()
        )
    };
    let metrics = format!("listen = \"127.0.0.1:{metrics_port}\"");
    std::fs::write(&file, config("gw-mqtt-reload", &metrics, &[mqtt("")])).unwrap();
    let agent = AgentProcess::start(&file, &["--reload-interval", "200ms"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("subscribed") {
        assert!(
            Instant::now() < deadline,
            "no subscription within 20 s:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The broker's section changes half-way through a stream of QoS 1 messages: its source
    // restarts while messages keep coming.
    let edited = config("gw-mqtt-reload", &metrics, &[mqtt("  unit = \"degC\"\n")]);
    let file_ = file.clone();
    publish_paced(
        broker.port(),
        "plant/oven-1/temp",
        COUNT,
        Duration::from_millis(20),
        move || std::fs::write(&file_, edited).unwrap(),
    )
    .await;
    let landing_ = landing.clone();
    let rows = tokio::task::spawn_blocking(move || {
        wait_scraped(metrics_port, (1, 0));
        wait_for_rows(&landing_, "every published message", |rows| {
            let mut seen: Vec<f64> = rows.iter().filter_map(|r| r.value).collect();
            seen.sort_by(f64::total_cmp);
            seen.dedup();
            seen.len() == usize::try_from(COUNT).unwrap()
        })
    })
    .await
    .unwrap();
    let log = agent.log();
    assert!(
        log.contains("config reloaded: restarted mqtt/line3"),
        "the edit restarted the broker's source:\n{log}"
    );
    assert!(
        rows.iter().any(|r| r.unit.as_deref() == Some("degC")),
        "the edited mapping is in force"
    );
    assert!(rows.iter().all(|r| r.device == "oven-1" && r.tag == "temp"));

    agent.signal("TERM");
    let (code, log) = tokio::task::spawn_blocking(move || agent.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{log}");
    let rows = common::uploaded_rows(&landing);
    // At least once: a message whose acknowledgement was lost in the restart may come twice,
    // but every one is there, and what the buffer took was all uploaded.
    for i in 0..COUNT {
        assert!(
            rows.iter().any(|r| r.value == Some(f64::from(i))),
            "message {i} is missing"
        );
    }
    assert_everything_uploaded(&rows, &dir.path().join("buffer.db"));
}
