//! Footprint of the agent on a gateway: stripped binary size per target, and the resident memory
//! and CPU of the real `edge-agent` binary polling 10,000 tags every second.
//!
//! It measures the build that ships: before measuring, it runs `cargo build --release -p
//! edge-agent --target <host>` (what `packaging/build-deb.sh` and `cross/build.sh` build, with the
//! release profile's fat LTO; a no-op when that build is fresh, a few minutes when it is not).
//! `cargo bench` itself builds with the bench profile (thin LTO, not stripped), which keeps more
//! code resident and is not what a gateway runs.
//!
//!     cargo bench -p edge-agent --bench footprint
//!     PLANTLINE_BENCH_SECS=300 cargo bench -p edge-agent --bench footprint   # a longer window
//!     PLANTLINE_BENCH_MAX_ROWS=5000 cargo bench -p edge-agent --bench footprint  # smaller batches
//!     PLANTLINE_BENCH_COMPARE=/tmp/edge-agent.old cargo bench -p edge-agent --bench footprint
//!     PLANTLINE_BENCH_AGENT=/tmp/edge-agent cargo bench -p edge-agent --bench footprint  # no build
//!
//! The PLCs are an in-process Modbus TCP register bank (20 devices of 500 tags: u16, f32 in CDAB
//! order and bits of status words); the agent runs as its own process, buffers into SQLite and
//! uploads Parquet batches to a local folder, so its RSS and CPU are its own. It runs with the
//! environment of the packaged systemd unit (`MALLOC_ARENA_MAX=2`, `MALLOC_MMAP_THRESHOLD_=65536`,
//! `MALLOC_TRIM_THRESHOLD_=131072`).
//!
//! RSS is reported by phase: once `/metrics` answers (started), once every tag was read once
//! (first scan), once the first batch was uploaded (first batch), then sampled every second for
//! the window (60 s by default, because allocator fragmentation takes a minute or two to show):
//! steady is the median of those samples, peak the kernel's high-water mark (`VmHWM`) at the end,
//! anon and file the split of the RSS at the end into anonymous memory (heap, stacks) and file
//! pages (the binary's code and data).
//! The baseline, in the same run, is the same binary polling 10 tags: the difference is what the
//! tags cost. `PLANTLINE_BENCH_COMPARE` names another agent binary (a build of an earlier commit,
//! say) to measure at 10,000 tags in the same run, for a before/after on the same noisy machine.
//!
//! Goals from the gateway issue: <= 15 MB stripped on aarch64, <= 20 MB RSS; each figure is
//! printed with its ratio to its goal. Binary sizes of the ARM targets are read from
//! `cross/build.sh` release builds when they exist (MB here are MiB, 1,048,576 bytes).

#[path = "bank/mod.rs"]
mod bank;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RSS_GOAL_MB: f64 = 20.0;
const SIZE_GOAL_MB: f64 = 15.0;
/// How long the agent may take to reach a phase before the benchmark gives up on it.
const PHASE_TIMEOUT: Duration = Duration::from_mins(2);

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
    let agent = std::env::var_os("PLANTLINE_BENCH_AGENT").map_or_else(shipped_build, PathBuf::from);
    println!("footprint benchmark on {}", machine());
    println!("agent: {}", agent.display());
    println!(
        "window {secs} s after the first batch; PLCs: in-process register bank at {}\n",
        bank.addr
    );

    let mut runs = vec![
        (
            "baseline, 10 tags".to_owned(),
            measure(&bank, &agent, 1, 10, secs),
        ),
        (
            "10,000 tags at 1 s".to_owned(),
            measure(&bank, &agent, 20, 500, secs),
        ),
    ];
    if let Some(other) = std::env::var_os("PLANTLINE_BENCH_COMPARE") {
        let other = PathBuf::from(other);
        let name = format!(
            "10,000 tags, {}",
            other
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        runs.push((name, measure(&bank, &other, 20, 500, secs)));
    }
    println!(
        "{:>28}  {:>7} {:>9} {:>9} {:>7} {:>7} {:>6} {:>6}  {:>6} {:>10} {:>10}",
        "RSS in MB:",
        "started",
        "1st scan",
        "1st batch",
        "steady",
        "peak",
        "anon",
        "file",
        "CPU %",
        "readings/s",
        "requests/s"
    );
    for (name, m) in &runs {
        println!(
            "{name:>28}  {:7.1} {:9.1} {:9.1} {:7.1} {:7.1} {:6.1} {:6.1}  {:6.1} {:10.0} {:10.1}",
            m.started_mb,
            m.first_scan_mb,
            m.first_batch_mb,
            m.steady_mb,
            m.peak_mb,
            m.anon_mb,
            m.file_mb,
            m.cpu_percent,
            m.readings_per_s,
            m.requests_per_s
        );
    }
    print_ratios(&runs);
    print_sizes(&agent);
}

/// The target folder `cargo bench` builds into (the bench profile's binaries are in its `release`).
fn target_dir() -> PathBuf {
    let bench_build = Path::new(env!("CARGO_BIN_EXE_edge-agent"));
    bench_build
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_owned)
}

/// Builds the agent as it ships, with the release profile for this machine's target, and returns
/// the binary. The explicit `--target` keeps it apart from the bench profile's `release` folder.
fn shipped_build() -> PathBuf {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("running {} -vV for the host target: {e}", rustc.display()));
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .unwrap_or_else(|| panic!("{} -vV names no host target", rustc.display()));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let target_dir = target_dir();
    let args = [
        "build",
        "--release",
        "-p",
        "edge-agent",
        "--bin",
        "edge-agent",
        "--target",
        &host,
    ];
    eprintln!(
        "building the shipped agent: cargo {} (a no-op when it is fresh)",
        args.join(" ")
    );
    let status = Command::new(&cargo)
        .args(args)
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(pipeline_e2e::checkout())
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", Path::new(&cargo).display()));
    assert!(
        status.success(),
        "cargo {} failed ({status}); fix the build, or name a binary to measure with \
         PLANTLINE_BENCH_AGENT=<path to edge-agent>",
        args.join(" ")
    );
    target_dir.join(host).join("release").join("edge-agent")
}

/// The 10,000-tag figures against the goals, the baseline and the compared binary.
fn print_ratios(runs: &[(String, Measurement)]) {
    let (baseline, full) = (&runs[0].1, &runs[1].1);
    println!(
        "\nRSS at 10,000 tags: steady {:.1} MB = {:.2} of the {RSS_GOAL_MB} MB goal, peak {:.1} MB = {:.2} of it",
        full.steady_mb,
        full.steady_mb / RSS_GOAL_MB,
        full.peak_mb,
        full.peak_mb / RSS_GOAL_MB,
    );
    println!(
        "against the 10-tag baseline: steady {:.2}x, peak {:.2}x; {:.2} KB per tag above it (steady)",
        full.steady_mb / baseline.steady_mb,
        full.peak_mb / baseline.peak_mb,
        (full.steady_mb - baseline.steady_mb) * 1024.0 / 9990.0
    );
    println!(
        "CPU at 10,000 tags: {:.1} % of one core, {:.2}x the baseline",
        full.cpu_percent,
        full.cpu_percent / baseline.cpu_percent.max(0.01)
    );
    if let Some((name, other)) = runs.get(2) {
        println!(
            "{name}: steady {:.2}x, peak {:.2}x, CPU {:.2}x this build's",
            other.steady_mb / full.steady_mb,
            other.peak_mb / full.peak_mb,
            other.cpu_percent / full.cpu_percent.max(0.01)
        );
    }
}

/// Sizes of the measured binary and of the ARM release builds `cross/build.sh` made in the same
/// target folder.
fn print_sizes(agent: &Path) {
    println!("\nbinary size (release builds are stripped):");
    print_size(std::env::consts::ARCH, agent, None);
    let target_dir = target_dir();
    for triple in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        let binary = target_dir.join(triple).join("release").join("edge-agent");
        let goal = triple.starts_with("aarch64").then_some(SIZE_GOAL_MB);
        if binary.is_file() {
            print_size(triple, &binary, goal);
        } else {
            println!("{triple:>32}: not built (cross/build.sh {triple})");
        }
    }
}

/// Prints a binary's size, with its ratio to `goal` (the issue sets one for aarch64 only).
fn print_size(name: &str, binary: &Path, goal: Option<f64>) {
    let meta = std::fs::metadata(binary);
    let bytes = meta.as_ref().map_or(0, std::fs::Metadata::len);
    let built = meta
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or_else(String::new, |age| {
            format!(", built {} min ago", age.as_secs() / 60)
        });
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1_048_576.0;
    let ratio = goal.map_or_else(String::new, |g| {
        format!(", {:.2} of the {g} MB goal", mb / g)
    });
    println!(
        "{name:>32}: {mb:6.2} MB{ratio} ({}{built})",
        binary.display()
    );
}

#[derive(Debug)]
struct Measurement {
    started_mb: f64,
    first_scan_mb: f64,
    first_batch_mb: f64,
    steady_mb: f64,
    peak_mb: f64,
    /// At the end of the window: anonymous memory (heap, stacks) and file pages (the binary's
    /// code and data, shared libraries) of the RSS.
    anon_mb: f64,
    file_mb: f64,
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

/// Runs `binary` on `devices` x `tags` through its start-up phases and a window of `secs`,
/// sampling its RSS once a second in the window.
fn measure(
    bank: &bank::Bank,
    binary: &Path,
    devices: usize,
    tags: usize,
    secs: u64,
) -> Measurement {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let metrics_port = pipeline_e2e::free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, sensor_map(bank.addr, metrics_port, devices, tags))
        .expect("writing the sensor map");
    let agent = Agent(
        Command::new(binary)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            // As the packaged systemd unit runs it (see packaging/edge-agent.service).
            .env("MALLOC_ARENA_MAX", "2")
            .env("MALLOC_MMAP_THRESHOLD_", "65536")
            .env("MALLOC_TRIM_THRESHOLD_", "131072")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the agent {}: {e}", binary.display())),
    );
    let pid = agent.0.id();
    let rss_mb = || status_kb(pid, "VmRSS:") as f64 / 1024.0;
    let all_tags = (devices * tags) as u64;
    wait_for(binary, "/metrics to answer", || {
        scrape(metrics_port).is_some()
    });
    let started_mb = rss_mb();
    wait_for(binary, "every tag to be read once", || {
        counter(metrics_port, "plantline_agent_readings_total{") >= all_tags
    });
    let first_scan_mb = rss_mb();
    wait_for(binary, "the first batch upload", || {
        counter(metrics_port, "plantline_agent_batches_uploaded_total") >= 1
    });
    let first_batch_mb = rss_mb();

    let ticks_per_s = clock_ticks();
    let (cpu0, readings0, requests0, t0) = (
        cpu_ticks(pid),
        counter(metrics_port, "plantline_agent_readings_total{"),
        bank.requests(),
        Instant::now(),
    );
    let mut rss = Vec::new();
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_mb());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, readings1, requests1) = (
        cpu_ticks(pid),
        counter(metrics_port, "plantline_agent_readings_total{"),
        bank.requests(),
    );
    let peak_mb = status_kb(pid, "VmHWM:") as f64 / 1024.0;
    let anon_mb = status_kb(pid, "RssAnon:") as f64 / 1024.0;
    let file_mb = status_kb(pid, "RssFile:") as f64 / 1024.0;
    drop(agent);
    rss.sort_by(f64::total_cmp);

    #[allow(clippy::cast_precision_loss)]
    Measurement {
        started_mb,
        first_scan_mb,
        first_batch_mb,
        steady_mb: rss.get(rss.len() / 2).copied().unwrap_or(0.0),
        peak_mb,
        anon_mb,
        file_mb,
        cpu_percent: (cpu1 - cpu0) as f64 / ticks_per_s / elapsed * 100.0,
        readings_per_s: (readings1 - readings0) as f64 / elapsed,
        requests_per_s: (requests1 - requests0) as f64 / elapsed,
    }
}

/// Polls `reached` twice a second until it holds; panics with `what` after [`PHASE_TIMEOUT`].
fn wait_for(binary: &Path, what: &str, mut reached: impl FnMut() -> bool) {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while !reached() {
        assert!(
            Instant::now() < deadline,
            "{} did not get to {what} within {PHASE_TIMEOUT:?}",
            binary.display()
        );
        std::thread::sleep(Duration::from_millis(500));
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

/// The agent's `/metrics` page; `None` while it does not answer yet.
fn scrape(port: u16) -> Option<String> {
    pipeline_e2e::http_get(port, "/metrics", "")
        .ok()
        .map(|(_, body)| body)
}

/// A counter summed over the series whose line starts with `prefix`; 0 when there is none.
fn counter(port: u16, prefix: &str) -> u64 {
    scrape(port)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
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

/// A `kB` line of `/proc/PID/status`; 0 once the process is gone.
fn status_kb(pid: u32, key: &str) -> u64 {
    pipeline_e2e::proc_kib(&format!("/proc/{pid}/status"), key).unwrap_or(0)
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
    let memory_gb =
        pipeline_e2e::proc_kib("/proc/meminfo", "MemTotal:").unwrap_or(0) as f64 / 1_048_576.0;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} ({}): {cpu}, {cores} cores, {memory_gb:.1} GB RAM, Linux {}",
        host.trim(),
        std::env::consts::ARCH,
        kernel.trim()
    )
}
