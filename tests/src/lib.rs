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
//! | `mosquitto` | [`Mosquitto`] | an MQTT broker (plain, or TLS with certificates from [`TestPki`]) |
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
use std::io::{self, Read as _, Write as _};
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

/// The root of the workspace checkout whose tests run, for the files they read from it
/// (`config-examples/`, fixtures, `tests/peers/`, the packaging scripts).
///
/// Found from the package whose tests run: cargo sets `CARGO_MANIFEST_DIR` when it runs tests and
/// benchmarks. The folder a test was compiled from is not good enough: cargo reuses a build made
/// from another checkout of the workspace in a shared target directory (`./tests/run.sh` shares
/// one per machine) when this checkout's files are older than that build, and the other checkout
/// may have other files or be gone. The folder this library was compiled from is the fallback,
/// for a test binary run without cargo.
pub fn checkout() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .and_then(|package| Path::new(&package).parent().map(Path::to_owned))
        .filter(|root| root.join("config-examples").is_dir() && root.join("Cargo.toml").is_file())
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("this library sits in a folder of the workspace")
                .to_owned()
        })
}

/// A helper script shipped in `tests/peers/` of this [`checkout`].
pub fn peer_script(name: &str) -> PathBuf {
    checkout().join("tests/peers").join(name)
}

/// One plain HTTP/1.1 GET to a server on 127.0.0.1 over a fresh connection (10 s read timeout);
/// `headers` are extra header lines, each ending in `\r\n`, or empty. Returns the status code
/// and the body.
pub fn http_get(port: u16, path: &str, headers: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let malformed = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP response: {response:?}"),
        )
    };
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// The value of a `key: value kB` line of a `/proc` file (`/proc/self/status`, `/proc/PID/status`,
/// `/proc/meminfo`), in KiB; `None` when the file or the line is missing. `key` includes its colon.
pub fn proc_kib(path: &str, key: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The paths of the entries of `folder`, sorted (batch and catalog keys sort by seq and time);
/// none when the folder does not exist (yet).
pub fn sorted_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(folder)
        .map(|entries| {
            entries
                .map(|e| e.expect("a listed entry can be read").path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
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

    /// Creates a bucket with the given name (for a server started again with
    /// [`StoppedMoto::start_again`], which forgot every bucket).
    pub fn create_named_bucket(&self, bucket: &str) {
        self.s3ctl(&["create-bucket", bucket], None);
    }

    /// Stops the server, as an S3 outage: its port refuses connections until
    /// [`StoppedMoto::start_again`]. moto keeps everything in memory, so the buckets and objects
    /// are gone; save what the test needs first.
    pub fn stop(self) -> StoppedMoto {
        let port = self.port();
        drop(self.peer);
        StoppedMoto {
            venv: self.venv,
            port,
        }
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

/// A [`MotoServer`] that was stopped; its port stays reserved for [`StoppedMoto::start_again`].
#[derive(Debug)]
pub struct StoppedMoto {
    venv: PeerVenv,
    port: u16,
}

impl StoppedMoto {
    /// The port the server listened on, and will again.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts a fresh, empty moto server on the same port (same endpoint URL for the clients).
    pub fn start_again(self) -> MotoServer {
        let peer = ChildPeer::spawn(
            "moto",
            self.venv.bin("moto_server"),
            ["-H", "127.0.0.1", "-p", &self.port.to_string()],
            &Readiness::Port(self.port),
            Some(&self.venv),
        );
        MotoServer {
            venv: self.venv,
            peer,
        }
    }
}

/// fakesnow serving Snowflake's driver protocol on `127.0.0.1:<port>`.
///
/// fakesnow keeps its databases in memory, so [`FakeSnow::stop`] loses them, unless a session
/// logged in with the session parameter `FAKESNOW_DB_PATH` = [`FakeSnow::db_path`]: its
/// database then lives in `<db_path>/<DATABASE>.db` and a [`FakeSnow::restart`] finds it again.
/// fakesnow attaches such a file once per login and DuckDB refuses a second attachment in the
/// same process, so only one session per server run may use it.
#[derive(Debug)]
pub struct FakeSnow {
    peer: Option<ChildPeer>,
    port: u16,
    db_dir: TempDir,
}

impl FakeSnow {
    /// Starts `fakesnow -s --host 127.0.0.1 -p <free port>` with in-memory databases.
    pub fn start() -> Self {
        let port = free_port();
        let db_dir = tempfile::Builder::new()
            .prefix("plantline-fakesnow-db-")
            .tempdir()
            .expect("creating a temporary folder cannot fail on a writable /tmp");
        Self {
            peer: Some(Self::spawn(port)),
            port,
            db_dir,
        }
    }

    fn spawn(port: u16) -> ChildPeer {
        let venv = PeerVenv::peers();
        ChildPeer::spawn(
            "fakesnow",
            venv.bin("fakesnow"),
            ["-s", "--host", "127.0.0.1", "-p", &port.to_string()],
            &Readiness::Port(port),
            Some(&venv),
        )
    }

    /// The base URL: `http://127.0.0.1:<port>` (login at `/session/v1/login-request`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The port fakesnow listens on; it stays the same across [`FakeSnow::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A folder for persistent databases (see the type's docs), removed with the guard.
    pub fn db_path(&self) -> &Path {
        self.db_dir.path()
    }

    /// The server process guard (stderr, pid). Panics while the server is stopped.
    pub fn peer(&self) -> &ChildPeer {
        self.peer
            .as_ref()
            .expect("fakesnow is running (it was stopped and not restarted)")
    }

    /// True between [`FakeSnow::stop`] and [`FakeSnow::restart`].
    pub fn is_stopped(&self) -> bool {
        self.peer.is_none()
    }

    /// Kills the server (`SIGKILL` to its process group, like a crash): open sessions and
    /// uncommitted transactions are gone, the port refuses connections until a restart.
    pub fn stop(&mut self) {
        drop(self.peer.take());
    }

    /// Starts the server again on the same port. Databases in [`FakeSnow::db_path`] are found
    /// again by the next login that names the folder; sessions are not.
    pub fn restart(&mut self) {
        self.stop();
        self.peer = Some(Self::spawn(self.port));
    }

    /// How many statements (`/queries/v1/query-request`) the running server has answered.
    pub fn statements_answered(&self) -> usize {
        let peer = self.peer();
        let count = |text: String| text.matches("POST /queries/v1/query-request").count();
        count(peer.stdout()) + count(peer.stderr())
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

/// A Mosquitto MQTT broker on `127.0.0.1:<port>`, no persistence: anonymous access on plain
/// TCP ([`Mosquitto::start`]), or TLS with a password file and optionally required client
/// certificates ([`Mosquitto::start_tls`]). It speaks MQTT 3.1.1 and 5 on the same listener.
#[derive(Debug)]
pub struct Mosquitto {
    peer: ChildPeer,
}

/// Certificates for TLS tests, made at run time in a temporary folder (never committed): a CA,
/// a broker certificate it signed for `127.0.0.1`, `localhost` and [`TestPki::BROKER_NAME`], a
/// client certificate it signed, and a second CA that signed nothing the broker holds. Keys are
/// ECDSA P-256 in PKCS#8 PEM; every file is PEM.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// The DNS name in the broker's certificate besides `localhost` (for a server name override).
    pub const BROKER_NAME: &str = "broker.plantline.test";

    /// Generates the CA, the broker's and the client's certificates and keys, and the other CA.
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let dir = tempfile::Builder::new()
            .prefix("plantline-pki-")
            .tempdir()
            .expect("creating a temporary folder cannot fail on a writable /tmp");
        let write = |name: &str, pem: &str| {
            fs::write(dir.path().join(name), pem).expect("the PKI folder is writable");
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("aws-lc-rs generates P-256 keys");
            let mut params = CertificateParams::new(Vec::<String>::new())
                .expect("no subject alternative names to parse");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).expect("a CA certificate signs");
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("Plantline test CA");
        write("ca.pem", &ca_pem);
        let (other_ca_pem, _) = ca("Plantline unrelated CA");
        write("other-ca.pem", &other_ca_pem);
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("aws-lc-rs generates P-256 keys");
            let mut params =
                CertificateParams::new(names).expect("the test names are valid DNS names");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            (params, key)
        };
        let (mut server, server_key) = leaf(
            vec!["localhost".to_owned(), Self::BROKER_NAME.to_owned()],
            "mosquitto",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        server
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .expect("the CA signs the broker's certificate");
        write("server.pem", &server_cert.pem());
        write("server.key", &server_key.serialize_pem());
        let (client, client_key) = leaf(
            Vec::new(),
            "edge-agent",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .expect("the CA signs the client's certificate");
        write("client.pem", &client_cert.pem());
        write("client.key", &client_key.serialize_pem());
        Self { dir }
    }

    /// The folder holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the broker's and the client's certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed neither certificate.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The broker's certificate.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The broker's private key.
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client's certificate (CN `edge-agent`).
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client's private key.
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

/// How a TLS broker ([`Mosquitto::start_tls`]) lets clients in.
#[derive(Debug, Clone, Default)]
pub struct MosquittoTls {
    /// `(user, password)` pairs of its password file; no anonymous access when not empty.
    pub users: Vec<(String, String)>,
    /// Clients must present a certificate signed by the test CA.
    pub require_client_certificate: bool,
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

    /// Starts Mosquitto with one TLS listener on loopback, its certificate from `pki`, and the
    /// users and client-certificate rule of `tls`. The password file is written with
    /// `mosquitto_passwd` into the broker's own folder.
    pub fn start_tls(pki: &TestPki, tls: &MosquittoTls) -> Self {
        let mut extra = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
            pki.ca_file().display(),
            pki.server_cert_file().display(),
            pki.server_key_file().display(),
            tls.require_client_certificate
        );
        if tls.users.is_empty() {
            extra.push_str("allow_anonymous true\n");
        } else {
            let passwords = pki.dir().join(format!("passwd-{}", uuid::Uuid::new_v4()));
            let tool = find_system_program("mosquitto_passwd", "mosquitto");
            for (i, (user, password)) in tls.users.iter().enumerate() {
                let mut command = Command::new(&tool);
                // -c creates the file for the first user; -b takes the password as an argument.
                if i == 0 {
                    command.arg("-c");
                }
                let output = command
                    .arg("-b")
                    .arg(&passwords)
                    .args([user, password])
                    .output()
                    .expect("mosquitto_passwd runs");
                assert!(
                    output.status.success(),
                    "mosquitto_passwd failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let _ = writeln!(
                extra,
                "allow_anonymous false\npassword_file {}",
                passwords.display()
            );
        }
        Self::start_with_config(&extra)
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

/// How long the Sparkplug B publisher may take for its whole script.
const SPARKPLUG_PUBLISHER_DEADLINE: Duration = Duration::from_mins(1);

/// Runs `tests/peers/sparkplug_publisher.py`, a Sparkplug B edge node written with paho-mqtt and
/// Google's protobuf runtime (an encoder independent of the agent's), against the broker on
/// `127.0.0.1:port`. `script` is the list of sessions its docstring describes. Returns its output
/// once it exited 0, which it does only after the broker acknowledged every message (and, for a
/// session that ends with `"die"`, after it dropped the connection so the broker publishes the
/// will). Panics with its stderr when it fails or runs past a minute. Blocking: call it from
/// `spawn_blocking` in async tests.
pub fn publish_sparkplug(port: u16, script: &Value) -> String {
    let python = PeerVenv::peers().python();
    let dir =
        tempfile::tempdir().expect("creating a temporary folder cannot fail on a writable /tmp");
    let path = dir.path().join("script.json");
    fs::write(&path, script.to_string()).expect("the temporary folder is writable");
    let mut child = Command::new(&python)
        .arg(peer_script("sparkplug_publisher.py"))
        .args(["--port", &port.to_string()])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}: {SETUP_HINT}", python.display()));
    let deadline = Instant::now() + SPARKPLUG_PUBLISHER_DEADLINE;
    while child
        .try_wait()
        .expect("waiting on a child process cannot fail")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .expect("the killed child is reaped");
            panic!(
                "sparkplug_publisher.py did not finish within {}s:\n{}",
                SPARKPLUG_PUBLISHER_DEADLINE.as_secs(),
                tail(&String::from_utf8_lossy(&output.stderr), 20)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child
        .wait_with_output()
        .expect("the exited child's output is readable");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sparkplug_publisher.py failed with {}: {}\n(paho-mqtt or protobuf missing? {SETUP_HINT})",
        output.status,
        tail(&stderr, 20)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// kinesalite (npm, pinned in `tests/peers/kinesalite/package-lock.json`) serving Kinesis on
/// `127.0.0.1:<port>`, in memory, through `tests/peers/kinesalite/serve.js`. Unlike moto it hands
/// out sequence numbers shaped like AWS's (56 digits, increasing per shard). Streams go from
/// CREATING to ACTIVE in about 20 ms. Any credentials are accepted; requests must be signed.
#[derive(Debug)]
pub struct Kinesalite {
    peer: ChildPeer,
    port: u16,
}

impl Kinesalite {
    /// Starts kinesalite on a free port and waits for its ready line. Panics naming
    /// `./tests/run.sh --install-only` when node or the npm install in `<cache>/node/kinesalite`
    /// is missing, or was made from another `package-lock.json` than the checkout's.
    pub fn start() -> Self {
        const INSTALL_HINT: &str =
            "run ./tests/run.sh --install-only to install it (npm ci of tests/peers/kinesalite)";
        let source = peer_script("kinesalite");
        let installed = cache_dir().join("node").join("kinesalite");
        let modules = installed.join("node_modules");
        assert!(
            modules.join("kinesalite").join("package.json").is_file(),
            "kinesalite is not installed in {} (PLANTLINE_CACHE or ~/.cache/plantline): {INSTALL_HINT}",
            modules.display()
        );
        let lock = |dir: &Path| fs::read(dir.join("package-lock.json")).ok();
        assert!(
            lock(&installed) == lock(&source),
            "kinesalite in {} was installed from another package-lock.json than {}: {INSTALL_HINT}",
            installed.display(),
            source.display()
        );
        let node = find_system_program("node", "nodejs");
        let port = free_port();
        let peer = ChildPeer::spawn(
            "kinesalite",
            node,
            [
                source.join("serve.js").into_os_string(),
                port.to_string().into(),
                modules.into_os_string(),
            ],
            &Readiness::StdoutContains(format!("kinesalite ready on 127.0.0.1:{port}")),
            None,
        );
        Self { peer, port }
    }

    /// The Kinesis endpoint URL: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port kinesalite listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process guard (stdout, stderr, pid).
    pub fn peer(&self) -> &ChildPeer {
        &self.peer
    }

    /// Stops the server (kills its process group by PID); every stream and record is gone.
    pub fn stop(self) {
        drop(self.peer);
    }
}
