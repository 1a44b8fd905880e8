//! Footprint of the agent on a gateway: stripped binary size per target, and the resident memory
//! and CPU of the real `edge-agent` binary polling 10,000 tags every second.
//!
//!     cargo bench -p edge-agent --bench footprint
//!     PLANTLINE_BENCH_SECS=300 cargo bench -p edge-agent --bench footprint   # a longer window
//!     PLANTLINE_BENCH_MAX_ROWS=5000 cargo bench -p edge-agent --bench footprint  # smaller batches
//!
//! The PLCs are an in-process Modbus TCP register bank (20 devices of 500 tags: u16, f32 in CDAB
//! order and bits of status words); the agent runs as its own process, buffers into SQLite and
//! uploads Parquet batches to a local folder, so its RSS and CPU are its own. It runs with the
//! environment of the packaged systemd unit (`MALLOC_ARENA_MAX=2`); the window is 60 s by default
//! because allocator fragmentation takes a minute or two to show. The baseline, in the
//! same run, is the same binary polling 10 tags: the difference is what the tags cost. Goals from
//! the gateway issue: <= 15 MB stripped on aarch64, <= 20 MB RSS. Binary sizes of the ARM targets
//! are read from `cross/build.sh` release builds when they exist.

#[path = "bank/mod.rs"]
mod bank;

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RSS_GOAL_MB: f64 = 20.0;
const SIZE_GOAL_MB: f64 = 15.0;

fn main() {
    let secs: u64 = std::env::var("PLANTLINE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let bank = runtime.block_on(bank::Bank::start());
    println!("footprint benchmark on {}", machine());
    println!(
        "window {secs} s after a 10 s warm-up; PLCs: in-process register bank at {}\n",
        bank.addr
    );

    let baseline = measure(&bank, 1, 10, secs);
    let full = measure(&bank, 20, 500, secs);
    for (name, m) in [
        ("baseline, 10 tags", &baseline),
        ("10,000 tags at 1 s", &full),
    ] {
        println!(
            "{name:>20}: RSS {:6.1} MB (peak {:6.1} MB), CPU {:5.1} % of one core, {:7.0} readings/s, {:6.1} requests/s",
            m.rss_mb, m.peak_mb, m.cpu_percent, m.readings_per_s, m.requests_per_s
        );
    }
    println!(
        "\nRSS at 10,000 tags: {:.2}x the baseline, {:.2} of the {RSS_GOAL_MB} MB goal; {:.1} KB per tag above the baseline",
        full.rss_mb / baseline.rss_mb,
        full.rss_mb / RSS_GOAL_MB,
        (full.rss_mb - baseline.rss_mb) * 1024.0 / 9990.0
    );
    println!(
        "CPU at 10,000 tags: {:.2}x the baseline",
        full.cpu_percent / baseline.cpu_percent.max(0.01)
    );

    println!("\nstripped binary size (release profile):");
    let host = PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"));
    print_size(std::env::consts::ARCH, &host);
    let target_dir = host
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_owned);
    for triple in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        let binary = target_dir.join(triple).join("release").join("edge-agent");
        if binary.is_file() {
            print_size(triple, &binary);
        } else {
            println!("{triple:>32}: not built (cross/build.sh {triple})");
        }
    }
}

fn print_size(name: &str, binary: &Path) {
    let bytes = std::fs::metadata(binary).map_or(0, |m| m.len());
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1_048_576.0;
    println!(
        "{name:>32}: {mb:6.2} MB, {:.2} of the {SIZE_GOAL_MB} MB goal ({})",
        mb / SIZE_GOAL_MB,
        binary.display()
    );
}

struct Measurement {
    rss_mb: f64,
    peak_mb: f64,
    cpu_percent: f64,
    readings_per_s: f64,
    requests_per_s: f64,
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Runs the agent on `devices` x `tags` for a warm-up and `secs`, sampling it once a second.
fn measure(bank: &bank::Bank, devices: usize, tags: usize, secs: u64) -> Measurement {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let metrics_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, sensor_map(bank.addr, metrics_port, devices, tags))
        .expect("writing the sensor map");
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            // As the packaged systemd unit runs it (see packaging/edge-agent.service).
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the agent"),
    );
    let pid = agent.0.id();
    std::thread::sleep(Duration::from_secs(10));

    let ticks_per_s = clock_ticks();
    let (cpu0, readings0, requests0, t0) = (
        cpu_ticks(pid),
        readings(metrics_port),
        bank.requests(),
        Instant::now(),
    );
    let mut rss = Vec::new();
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(status_kb(pid, "VmRSS:"));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, readings1, requests1) = (cpu_ticks(pid), readings(metrics_port), bank.requests());
    let peak = status_kb(pid, "VmHWM:");
    drop(agent);

    #[allow(clippy::cast_precision_loss)]
    Measurement {
        rss_mb: rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0,
        peak_mb: peak as f64 / 1024.0,
        cpu_percent: (cpu1 - cpu0) as f64 / ticks_per_s / elapsed * 100.0,
        readings_per_s: (readings1 - readings0) as f64 / elapsed,
        requests_per_s: (requests1 - requests0) as f64 / elapsed,
    }
}

fn sensor_map(plc: SocketAddr, metrics_port: u16, devices: usize, tags: usize) -> String {
    // The batch size bounds the batcher's working set; the agent's default unless asked.
    let max_rows = std::env::var("PLANTLINE_BENCH_MAX_ROWS")
        .map(|rows| format!("max_rows = {rows}\n"))
        .unwrap_or_default();
    let mut map = format!(
        r#"site = "bench"
gateway = "gw-footprint"

[batch]
max_age = "10s"
{max_rows}
[upload.dir]
path = "landing"

[metrics]
listen = "127.0.0.1:{metrics_port}"
"#
    );
    // Per device: 60 % u16, 20 % f32 (CDAB), 20 % bits of status words.
    let words = tags * 3 / 5;
    let floats = tags / 5;
    let bits = tags - words - floats;
    for d in 0..devices {
        let _ = write!(
            map,
            "\n[[modbus]]\nname = \"plc-{d:02}\"\nhost = \"{}\"\nport = {}\npoll_interval = \"1s\"\n",
            plc.ip(),
            plc.port()
        );
        for t in 0..words {
            let _ = write!(
                map,
                "\n  [[modbus.tags]]\n  name = \"w{t:04}\"\n  register = \"holding\"\n  address = {t}\n  type = \"u16\"\n  scale = 0.1\n  unit = \"degC\"\n"
            );
        }
        for t in 0..floats {
            let _ = write!(
                map,
                "\n  [[modbus.tags]]\n  name = \"f{t:04}\"\n  register = \"input\"\n  address = {}\n  type = \"f32\"\n  byte_order = \"CDAB\"\n",
                t * 2
            );
        }
        for t in 0..bits {
            let _ = write!(
                map,
                "\n  [[modbus.tags]]\n  name = \"b{t:04}\"\n  register = \"holding\"\n  address = {}\n  type = \"bit\"\n  bit = {}\n",
                2000 + t / 16,
                t % 16
            );
        }
    }
    map
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Readings the agent committed, summed over `plantline_agent_readings_total`.
fn readings(port: u16) -> u64 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the agent's /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the scrape");
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .expect("reading the scrape");
    text.lines()
        .filter(|l| l.starts_with("plantline_agent_readings_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The command name in parentheses may hold spaces: count fields after its closing one.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5) are utime and stime; `rest` starts at field 3.
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `kB` line of `/proc/PID/status`.
fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    format!("{} ({cpu}, {cores} cores)", std::env::consts::ARCH)
}
