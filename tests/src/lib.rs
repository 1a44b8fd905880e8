//! Test harness: real, independently written peers started on loopback for the end-to-end tests.
//!
//! Every peer runs as a child process on `127.0.0.1` and an ephemeral port, in its own process
//! group, and is killed (the whole group) when its guard is dropped. The Python peers come from two
//! virtual environments that `./tests/run.sh` installs with pinned versions:
//!
//! | peer | guard | stands in for |
//! |---|---|---|
//! | `moto_server` | [`MotoServer`] | S3 (and Kinesis) |
//! | `fakesnow -s` | [`FakeSnow`] | Snowflake's driver protocol |
//! | `tests/peers/modbus_server.py` (pymodbus simulator) | [`PyModbusServer`] | a PLC over Modbus TCP or RTU |
//! | `mosquitto` | [`Mosquitto`] | an MQTT broker |
//! | `DuckDB` + delta extension | [`duckdb_query`] | an independent Delta Lake reader |
//!
//! Invariants the tests rely on:
//! - A peer that is missing, exits early or does not accept connections before its deadline fails
//!   the test with a panic naming the fix (`./tests/run.sh`) and the peer's own stderr. Nothing is
//!   ever skipped silently.
//! - A peer never outlives its guard; if the test process dies without unwinding, the peer notices
//!   its closed stdin (`tests/peers/lifeline.py`) and stops itself.
//! - Nothing binds anything but `127.0.0.1`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use rustix::process::{Pid, Signal, kill_process_group};
use serde_json::Value;
use tempfile::TempDir;

/// How long a peer may take from spawn to accepting connections. Python peers import a lot
/// (moto loads every AWS service model) and the test machines are shared and busy.
pub const PEER_START_DEADLINE: Duration = Duration::from_secs(90);

/// Access key id the S3 peer accepts; moto accepts any, the tests use this one everywhere.
pub const S3_ACCESS_KEY_ID: &str = "plantline-test";
/// Secret access key matching [`S3_ACCESS_KEY_ID`].
pub const S3_SECRET_ACCESS_KEY: &str = "plantline-test-secret";
/// Region the S3 peer and every client in the tests use.
pub const S3_REGION: &str = "us-east-1";

const SETUP_HINT: &str =
    "run ./tests/run.sh to install the test peers (or ./tests/run.sh --install-only)";

/// The cache folder `./tests/run.sh` installs into: `$PLANTLINE_CACHE`, else `~/.cache/plantline`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("PLANTLINE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("plantline")
}

/// A Python virtual environment holding test peers.
#[derive(Debug, Clone)]
pub struct PeerVenv {
    root: PathBuf,
    name: &'static str,
}

impl PeerVenv {
    /// The peers venv (pymodbus, moto, fakesnow, boto3): `$PLANTLINE_PEERS_VENV`, else
    /// `<cache>/venv/peers`. Panics with the setup command when it is not installed.
    pub fn peers() -> Self {
        Self::locate("peers", "PLANTLINE_PEERS_VENV")
    }

    /// The `DuckDB` venv (duckdb and its delta extension): `$PLANTLINE_DUCKDB_VENV`, else
    /// `<cache>/venv/duckdb`. Panics with the setup command when it is not installed.
    pub fn duckdb() -> Self {
        Self::locate("duckdb", "PLANTLINE_DUCKDB_VENV")
    }

    fn locate(name: &'static str, var: &str) -> Self {
        let root = env::var_os(var)
            .filter(|v| !v.is_empty())
            .map_or_else(|| cache_dir().join("venv").join(name), PathBuf::from);
        let venv = Self { root, name };
        assert!(
            venv.root.join("bin").join("python").is_file(),
            "the {name} Python venv was not found at {} (set by {var} or the default cache path): {SETUP_HINT}",
            venv.root.display()
        );
        venv
    }

    /// The venv's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The venv's Python interpreter.
    pub fn python(&self) -> PathBuf {
        self.bin("python")
    }

    /// An executable installed in the venv's `bin/`; panics with the setup command when missing.
    pub fn bin(&self, program: &str) -> PathBuf {
        let path = self.root.join("bin").join(program);
        assert!(
            path.is_file(),
            "{program} is missing from the {} venv at {}: {SETUP_HINT}",
            self.name,
            self.root.display()
        );
        path
    }
}

/// Wall-clock time in microseconds since the Unix epoch, as readings carry it.
pub fn now_us() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_micros(),
    )
    .expect("microseconds since 1970 fit in i64")
}

/// A helper script shipped in `tests/peers/`.
pub fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it from the ephemeral range).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0 cannot fail while loopback is up")
        .port()
}

/// When a freshly spawned peer counts as ready.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// It accepts TCP connections on `127.0.0.1:<port>`.
    Port(u16),
    /// It printed this text on stdout (peers without a TCP port, such as a serial Modbus server).
    StdoutContains(String),
    /// These files exist (socat's pty links).
    FilesExist(Vec<PathBuf>),
}

/// A running peer process. Dropping the guard kills the peer's whole process group.
#[derive(Debug)]
pub struct ChildPeer {
    name: String,
    child: Child,
    // Held only so the lifeline sees end of file when the guard (or the test process) goes away.
    _lifeline: Option<ChildStdin>,
    port: Option<u16>,
    dir: TempDir,
}

impl ChildPeer {
    /// Spawns `program args…` in a fresh temporary working folder and its own process group, with
    /// stdout and stderr captured to files, and waits until `ready` holds or
    /// [`PEER_START_DEADLINE`] passes. Panics with the peer's output when it exits or times out.
    ///
    /// `lifeline`: the venv whose Python runs `tests/peers/lifeline.py` around the program, so the
    /// peer also stops if the test process dies without dropping the guard.
    pub fn spawn<I, S>(
        name: &str,
        program: impl AsRef<OsStr>,
        args: I,
        ready: &Readiness,
        lifeline: Option<&PeerVenv>,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = tempfile::Builder::new()
            .prefix(&format!("plantline-{name}-"))
            .tempdir()
            .expect("creating a temporary folder cannot fail on a writable /tmp");
        Self::spawn_in(name, dir, program, args, ready, lifeline)
    }

    /// Like [`ChildPeer::spawn`] but in a working folder the caller prepared (a config file, say).
    pub fn spawn_in<I, S>(
        name: &str,
        dir: TempDir,
        program: impl AsRef<OsStr>,
        args: I,
        ready: &Readiness,
        lifeline: Option<&PeerVenv>,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stdout =
            fs::File::create(dir.path().join("stdout.log")).expect("the peer's folder is writable");
        let stderr =
            fs::File::create(dir.path().join("stderr.log")).expect("the peer's folder is writable");
        let mut command = if let Some(venv) = lifeline {
            let mut command = Command::new(venv.python());
            command
                .arg(peer_script("lifeline.py"))
                .arg(program.as_ref());
            command.stdin(Stdio::piped());
            command
        } else {
            let mut command = Command::new(program.as_ref());
            command.stdin(Stdio::null());
            command
        };
        command
            .args(args)
            .current_dir(dir.path())
            .stdout(stdout)
            .stderr(stderr)
            // Python peers buffer stdout when it is a file; readiness lines must arrive at once.
            .env("PYTHONUNBUFFERED", "1");
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().unwrap_or_else(|error| {
            panic!(
                "cannot start the {name} peer ({}): {error}; {SETUP_HINT}",
                Path::new(program.as_ref()).display()
            )
        });
        let lifeline = child.stdin.take();
        tracing::debug!(peer = name, pid = child.id(), "peer spawned");
        let port = match ready {
            Readiness::Port(port) => Some(*port),
            _ => None,
        };
        let mut peer = Self {
            name: name.to_owned(),
            child,
            _lifeline: lifeline,
            port,
            dir,
        };
        peer.wait_ready(ready);
        peer
    }

    fn wait_ready(&mut self, ready: &Readiness) {
        let started = Instant::now();
        loop {
            let is_ready = match ready {
                Readiness::Port(port) => TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
                    Duration::from_millis(200),
                )
                .is_ok(),
                Readiness::StdoutContains(text) => self.stdout().contains(text.as_str()),
                Readiness::FilesExist(files) => files.iter().all(|f| f.exists()),
            };
            if is_ready {
                tracing::debug!(peer = %self.name, elapsed = ?started.elapsed(), "peer ready");
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the {} peer exited with {status} before it was ready ({ready:?}){}",
                    self.name,
                    self.output_report()
                );
            }
            assert!(
                started.elapsed() <= PEER_START_DEADLINE,
                "the {} peer was not ready ({ready:?}) within {PEER_START_DEADLINE:?}{}",
                self.name,
                self.output_report()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The peer's process id (the lifeline's, when one wraps the peer; both share the group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The loopback port the peer listens on, when it was started with [`Readiness::Port`].
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The peer's temporary working folder, removed when the guard drops.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the peer wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// Everything the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn output_report(&self) -> String {
        let mut report = String::new();
        for (stream, text) in [("stderr", self.stderr()), ("stdout", self.stdout())] {
            if !text.trim().is_empty() {
                let _ = write!(
                    report,
                    "\n--- {} {stream} (last lines) ---\n{}",
                    self.name,
                    tail(&text, 40)
                );
            }
        }
        report
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        // The group id equals the child's pid (process_group(0)); killing the group also reaches
        // the peer under a lifeline and anything the peer forked.
        if let Some(group) = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
            && let Err(error) = kill_process_group(group, Signal::KILL)
            && error != rustix::io::Errno::SRCH
        {
            tracing::warn!(peer = %self.name, pid = self.child.id(), %error, "cannot kill the peer's process group");
        }
        let _ = self.child.wait();
        tracing::debug!(peer = %self.name, pid = self.child.id(), "peer stopped");
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A moto server standing in for S3 on `127.0.0.1:<port>`, with an independent S3 client
/// (boto3 through `tests/peers/s3ctl.py`) to prepare and inspect buckets.
#[derive(Debug)]
pub struct MotoServer {
    venv: PeerVenv,
    peer: ChildPeer,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it accepts connections.
    pub fn start() -> Self {
        let venv = PeerVenv::peers();
        let port = free_port();
        let peer = ChildPeer::spawn(
            "moto",
            venv.bin("moto_server"),
            ["-H", "127.0.0.1", "-p", &port.to_string()],
            &Readiness::Port(port),
            Some(&venv),
        );
        Self { venv, peer }
    }

    /// The S3 endpoint URL: `http://127.0.0.1:<port>`. Use path-style addressing.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.peer
            .port()
            .expect("moto is started with Readiness::Port")
    }

    /// The server process guard (stderr, pid).
    pub fn peer(&self) -> &ChildPeer {
        &self.peer
    }

    /// Creates a bucket with a fresh UUID-based name and returns the name.
    pub fn create_bucket(&self) -> String {
        let bucket = format!("plantline-{}", uuid::Uuid::new_v4());
        self.s3ctl(&["create-bucket", &bucket], None);
        bucket
    }

    /// Writes an object.
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) {
        self.s3ctl(&["put", bucket, key], Some(body));
    }

    /// Reads an object; `None` when the key does not exist.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let output = self.s3ctl_output(&["get", bucket, key], None);
        match output.status.code() {
            Some(0) => Some(output.stdout),
            Some(2) if String::from_utf8_lossy(&output.stderr).starts_with("NoSuchKey") => None,
            _ => panic!(
                "s3ctl get {bucket}/{key} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// The keys under `prefix`, sorted.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let stdout = self.s3ctl(&["list", bucket, prefix], None);
        String::from_utf8(stdout)
            .expect("S3 keys written by s3ctl are UTF-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Copies every object under `prefix` into `dir` (keys relative to the prefix), e.g. a Delta
    /// table to read with [`duckdb_query`].
    pub fn download_prefix(&self, bucket: &str, prefix: &str, dir: &Path) {
        let dir = dir.to_str().expect("temporary folder paths are UTF-8");
        self.s3ctl(&["download", bucket, prefix, dir], None);
    }

    fn s3ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        let output = self.s3ctl_output(args, stdin);
        assert!(
            output.status.success(),
            "s3ctl {} failed with {}: {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.peer.output_report()
        );
        output.stdout
    }

    fn s3ctl_output(&self, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
        let mut command = Command::new(self.venv.python());
        command
            .arg(peer_script("s3ctl.py"))
            .arg("--endpoint")
            .arg(self.endpoint())
            .args(args);
        run_with_stdin(command, stdin.unwrap_or_default())
    }
}

/// fakesnow serving Snowflake's driver protocol on `127.0.0.1:<port>`.
#[derive(Debug)]
pub struct FakeSnow {
    peer: ChildPeer,
}

impl FakeSnow {
    /// Starts `fakesnow -s --host 127.0.0.1 -p <free port>` with in-memory databases.
    pub fn start() -> Self {
        let venv = PeerVenv::peers();
        let port = free_port();
        let peer = ChildPeer::spawn(
            "fakesnow",
            venv.bin("fakesnow"),
            ["-s", "--host", "127.0.0.1", "-p", &port.to_string()],
            &Readiness::Port(port),
            Some(&venv),
        );
        Self { peer }
    }

    /// The base URL: `http://127.0.0.1:<port>` (login at `/session/v1/login-request`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The port fakesnow listens on.
    pub fn port(&self) -> u16 {
        self.peer
            .port()
            .expect("fakesnow is started with Readiness::Port")
    }

    /// The server process guard (stderr, pid).
    pub fn peer(&self) -> &ChildPeer {
        &self.peer
    }
}

/// A PLC stand-in: `tests/peers/modbus_server.py` on pymodbus 3.16's simulator.
///
/// The register map is JSON: a register entry is a list of 16-bit words or one typed value that
/// the script encodes with Python's `struct` (`u16` to `u64`/`i64`, `f32`, `f64`, in byte order
/// `ABCD`, `CDAB`, `BADC` or `DCBA`); addresses not in the map answer with exception 2 (illegal
/// data address):
///
/// ```json
/// {"device_id": 1, "holding": {"100": [17, 2], "200": {"type": "f32", "order": "CDAB", "value": 1.5}},
///  "input": {"0": [5]}, "coils": {"0": [true, false]}, "discrete": {"8": [true]}}
/// ```
///
/// `device_id` 0 (the default) answers every unit id.
///
/// Several slaves behind one server (an RTU bus, a serial gateway): `{"devices": [map, map]}`,
/// each map as above with its own `device_id` of 1 or more. A unit id none of them has gets no
/// answer at all, as on a serial bus where no device owns that address.
#[derive(Debug)]
pub struct PyModbusServer {
    server: ChildPeer,
    // For RTU: socat's pty pair; dropped after the server so the server never sees a vanished tty.
    _socat: Option<ChildPeer>,
    serial_path: Option<PathBuf>,
}

impl PyModbusServer {
    /// Serves `register_map` over Modbus TCP on `127.0.0.1:<free port>`.
    pub fn start(register_map: &Value) -> Self {
        Self::start_on_port(register_map, free_port())
    }

    /// Serves `register_map` over Modbus TCP on `127.0.0.1:<port>`: a PLC that comes back on the
    /// port it was stopped on, for reconnect tests.
    pub fn start_on_port(register_map: &Value, port: u16) -> Self {
        let venv = PeerVenv::peers();
        let server = ChildPeer::spawn(
            "pymodbus",
            venv.python(),
            [
                peer_script("modbus_server.py").into_os_string(),
                "--port".into(),
                port.to_string().into(),
                "--map".into(),
                register_map.to_string().into(),
            ],
            &Readiness::Port(port),
            Some(&venv),
        );
        Self {
            server,
            _socat: None,
            serial_path: None,
        }
    }

    /// Serves RTU frames (slave address, PDU, CRC) over TCP on `127.0.0.1:<free port>`, as a
    /// serial device server in transparent mode does for the slaves behind it.
    pub fn start_rtu_over_tcp(register_map: &Value) -> Self {
        let venv = PeerVenv::peers();
        let port = free_port();
        let server = ChildPeer::spawn(
            "pymodbus-rtu-over-tcp",
            venv.python(),
            [
                peer_script("modbus_server.py").into_os_string(),
                "--port".into(),
                port.to_string().into(),
                "--framer".into(),
                "rtu".into(),
                "--map".into(),
                register_map.to_string().into(),
            ],
            &Readiness::Port(port),
            Some(&venv),
        );
        Self {
            server,
            _socat: None,
            serial_path: None,
        }
    }

    /// Serves `register_map` over Modbus RTU at 19200 8N1 on one end of a socat pty pair; the
    /// gateway side opens [`PyModbusServer::serial_path`].
    pub fn start_rtu(register_map: &Value) -> Self {
        let venv = PeerVenv::peers();
        let socat_bin = find_system_program("socat", "socat");
        let dir = tempfile::Builder::new()
            .prefix("plantline-rtu-")
            .tempdir()
            .expect("creating a temporary folder cannot fail on a writable /tmp");
        let plc_end = dir.path().join("plc");
        let gateway_end = dir.path().join("gateway");
        let socat = ChildPeer::spawn_in(
            "socat",
            dir,
            socat_bin,
            [
                format!("pty,raw,echo=0,link={}", plc_end.display()),
                format!("pty,raw,echo=0,link={}", gateway_end.display()),
            ],
            &Readiness::FilesExist(vec![plc_end.clone(), gateway_end.clone()]),
            None,
        );
        let server = ChildPeer::spawn(
            "pymodbus-rtu",
            venv.python(),
            [
                peer_script("modbus_server.py").into_os_string(),
                "--serial".into(),
                plc_end.into_os_string(),
                "--map".into(),
                register_map.to_string().into(),
            ],
            &Readiness::StdoutContains("modbus_server ready".to_owned()),
            Some(&venv),
        );
        Self {
            server,
            _socat: Some(socat),
            serial_path: Some(gateway_end),
        }
    }

    /// The TCP address of a server started with [`PyModbusServer::start`] or
    /// [`PyModbusServer::start_rtu_over_tcp`].
    pub fn address(&self) -> SocketAddr {
        let port = self
            .server
            .port()
            .expect("address() is for a Modbus TCP server; this one serves RTU");
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// The serial device the gateway opens, for a server started with [`PyModbusServer::start_rtu`].
    pub fn serial_path(&self) -> &Path {
        self.serial_path
            .as_deref()
            .expect("serial_path() is for a Modbus RTU server; this one serves TCP")
    }

    /// The server process guard (stderr, pid).
    pub fn peer(&self) -> &ChildPeer {
        &self.server
    }
}

/// A Mosquitto MQTT broker on `127.0.0.1:<port>`, anonymous access, no persistence.
#[derive(Debug)]
pub struct Mosquitto {
    peer: ChildPeer,
}

impl Mosquitto {
    /// Starts `mosquitto -c <conf>` with one loopback listener.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts Mosquitto with `extra_config` appended to the loopback listener's configuration
    /// (password files, TLS settings; paths relative to nothing: give absolute ones).
    pub fn start_with_config(extra_config: &str) -> Self {
        let program = find_system_program("mosquitto", "mosquitto");
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("plantline-mosquitto-")
            .tempdir()
            .expect("creating a temporary folder cannot fail on a writable /tmp");
        let conf = dir.path().join("mosquitto.conf");
        let allow_anonymous = if extra_config.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{allow_anonymous}persistence false\nlog_dest stderr\n{extra_config}\n"
            ),
        )
        .expect("the peer's folder is writable");
        let peer = ChildPeer::spawn_in(
            "mosquitto",
            dir,
            program,
            [OsStr::new("-c"), conf.as_os_str()],
            &Readiness::Port(port),
            None,
        );
        Self { peer }
    }

    /// The broker's address.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.peer
            .port()
            .expect("mosquitto is started with Readiness::Port")
    }

    /// The broker process guard (stderr, pid).
    pub fn peer(&self) -> &ChildPeer {
        &self.peer
    }
}

/// Runs `sql` in `DuckDB` with the Delta extension loaded from the `DuckDB` venv (no autoinstall, no
/// network) and returns the last statement's rows as JSON objects, column name to value.
/// Timestamps, decimals and other values JSON cannot hold come back as their string form.
///
/// Read a Delta table the collector wrote with `SELECT … FROM delta_scan('<local table path>')`;
/// for a table on the S3 peer, [`MotoServer::download_prefix`] it first.
pub fn duckdb_query(sql: &str) -> Vec<Value> {
    let venv = PeerVenv::duckdb();
    let mut command = Command::new(venv.python());
    command.arg(peer_script("duckdb_query.py"));
    let output = run_with_stdin(command, sql.as_bytes());
    assert!(
        output.status.success(),
        "DuckDB query failed with {}:\n{sql}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("duckdb_query.py printed no JSON array of rows: {other:?}"),
    }
}

fn run_with_stdin(mut command: Command, stdin: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}; {SETUP_HINT}"));
    let mut pipe = child.stdin.take().expect("stdin was configured as piped");
    let body = stdin.to_vec();
    // Writing from another thread: a large body would otherwise deadlock against a full stdout pipe.
    let writer = thread::spawn(move || pipe.write_all(&body));
    let output = child
        .wait_with_output()
        .expect("waiting for a spawned helper cannot fail");
    match writer
        .join()
        .expect("the stdin writer thread does not panic")
    {
        // A helper that exits without reading its input reports why on stderr; keep that error.
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            panic!("cannot write to {command:?}: {error}")
        }
        _ => {}
    }
    output
}

/// A program from the system (Debian packages), looked up on `PATH` and in the `sbin` folders
/// that a non-root `PATH` lacks.
fn find_system_program(program: &str, debian_package: &str) -> PathBuf {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} was not found on PATH (Debian package {debian_package}): {SETUP_HINT}"
            )
        })
}

/// What headless Chromium made of a page: the DOM after its scripts ran.
#[derive(Debug)]
pub struct RenderedPage {
    /// The serialised DOM (`--dump-dom`).
    pub dom: String,
}

/// Loads `url` in headless Chromium (Debian package `chromium`), lets its scripts run for up to
/// `script_time` of virtual time, and returns the DOM; with `screenshot`, also saves a PNG of the
/// page there. Each call uses a fresh profile and the flags that keep Chromium off the network,
/// so only the page's own loopback requests leave the browser.
pub fn headless_chromium(
    url: &str,
    script_time: Duration,
    screenshot: Option<&Path>,
) -> RenderedPage {
    let chromium = find_system_program("chromium", "chromium");
    let profile = tempfile::Builder::new()
        .prefix("plantline-chromium-")
        .tempdir()
        .expect("creating a temporary folder cannot fail on a writable /tmp");
    let run = |extra: &[String]| {
        let mut command = Command::new(&chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={}", script_time.as_millis()))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null());
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}: {SETUP_HINT}", chromium.display()));
        assert!(
            output.status.success(),
            "chromium failed on {url}: {}\n{}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), 20)
        );
        output
    };
    let dom = String::from_utf8_lossy(&run(&["--dump-dom".to_owned()]).stdout).into_owned();
    if let Some(path) = screenshot {
        run(&[format!("--screenshot={}", path.display())]);
        assert!(
            path.is_file(),
            "chromium did not write the screenshot {}",
            path.display()
        );
    }
    RenderedPage { dom }
}
