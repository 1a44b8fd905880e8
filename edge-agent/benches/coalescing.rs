//! Read coalescing: how many requests one scan of a 1000-tag device costs with the agent's read
//! plan, against the naive one-request-per-tag loop, and what that does to scans and readings per
//! second, both measured in the same run against the same in-process register bank.
//!
//!     cargo bench -p edge-agent --bench coalescing
//!     PLANTLINE_BENCH_SECS=30 cargo bench -p edge-agent --bench coalescing   # longer windows
//!
//! The map is generated, not checked in: 1000 tags on one device, of every register type (u16,
//! i16 in tenths, u32, f32 in CDAB order, f64, bits of status words) in holding and input
//! registers, plus coils and discrete inputs, with small gaps (read along) and large ones (a new
//! request) between them. It is loaded and validated like a sensor map on a gateway.
//!
//! - **agent**: the agent's own Modbus TCP task (`run_device`) with a poll interval of 1 µs, so
//!   it scans as fast as the device answers: the read plan, decoding, transform and the reading
//!   channel, as on a gateway.
//! - **naive**: one request per tag on one connection, each decoded and transformed the same
//!   way, scan after scan.
//! - **agent, device limit 64**: the agent against a bank that refuses reads of more than 64
//!   registers with exception 3; the agent learns the limit in its first scan.
//!
//! Requests are counted by the bank. Loopback round trips are far shorter than a PLC's (often
//! 5-50 ms), so on a plant network the scan-rate ratio grows toward the request ratio.

#[path = "bank/mod.rs"]
mod bank;

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use edge_agent::Reading;
use edge_agent::config::{ModbusDevice, ModbusTag, RegisterKind, load_str};
use edge_agent::sources::modbus::decode::{decode_bits, decode_register_tag};
use edge_agent::sources::modbus::plan::{Planner, TagSpan};
use edge_agent::sources::modbus::run_device;
use edge_agent::sources::modbus::transform::apply_value;
use tokio::sync::mpsc;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{Request, Response, Slave};
use tokio_util::sync::CancellationToken;

const TAGS: usize = 1000;

/// Figures of one contender over its window.
struct Figures {
    requests: u64,
    scans: f64,
    readings: u64,
    secs: f64,
}

impl Figures {
    fn requests_per_scan(&self) -> f64 {
        self.requests as f64 / self.scans.max(f64::MIN_POSITIVE)
    }
    fn scans_per_s(&self) -> f64 {
        self.scans / self.secs
    }
    fn readings_per_s(&self) -> f64 {
        self.readings as f64 / self.secs
    }
    fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

fn main() {
    let secs: u64 = std::env::var("PLANTLINE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let window = Duration::from_secs(secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (map, gaps) = generated_map();
    let config = load_str(&map, Path::new("coalescing-bench.toml"))
        .unwrap_or_else(|err| panic!("the generated map is valid: {err}"));
    let template = config.modbus[0].clone();
    assert_eq!(template.tags.len(), TAGS);
    let planned = planned_requests(&template);

    println!("coalescing benchmark on {}", machine());
    println!(
        "{TAGS} tags on one device (u16, i16, u32, f32 CDAB, f64, status-word bits, coils, discrete inputs; \
         {gaps} gaps of 3 to 40 registers), max_gap {}, {secs} s per contender after a 1 s warm-up",
        template.max_gap
    );
    println!("read plan: {planned} requests per scan\n");

    let (agent, naive, limited) = runtime.block_on(async {
        let bank = bank::Bank::start().await;
        let agent = measure_agent(&bank, &template, window).await;
        let naive = measure_naive(&bank, &template, window).await;
        let limited_bank = bank::Bank::start_with_limit(Some(64)).await;
        let limited = measure_agent(&limited_bank, &template, window).await;
        (agent, naive, limited)
    });

    println!(
        "{:>26} {:>14} {:>10} {:>12} {:>12}",
        "", "requests/scan", "scans/s", "readings/s", "requests/s"
    );
    for (name, f) in [
        ("agent (coalesced)", &agent),
        ("naive (one per tag)", &naive),
        ("agent, device limit 64", &limited),
    ] {
        println!(
            "{name:>26} {:>14.1} {:>10.2} {:>12.0} {:>12.0}",
            f.requests_per_scan(),
            f.scans_per_s(),
            f.readings_per_s(),
            f.requests_per_s()
        );
    }
    println!(
        "\nagent vs naive: {:.1}x fewer requests per scan, {:.1}x the scans/s, {:.1}x the readings/s",
        naive.requests_per_scan() / agent.requests_per_scan(),
        agent.scans_per_s() / naive.scans_per_s().max(f64::MIN_POSITIVE),
        agent.readings_per_s() / naive.readings_per_s().max(f64::MIN_POSITIVE)
    );
    println!(
        "device limit 64 (learned): {:.1}x the requests per scan of the unlimited plan, still {:.1}x fewer than naive",
        limited.requests_per_scan() / agent.requests_per_scan(),
        naive.requests_per_scan() / limited.requests_per_scan()
    );
}

/// The 1000-tag sensor map, and how many gaps it has.
fn generated_map() -> (String, usize) {
    let mut map = String::from(
        "site = \"bench\"\ngateway = \"gw-bench\"\n\n[upload.dir]\npath = \"outbox\"\n\n\
         [[modbus]]\nname = \"plc-1000\"\nhost = \"127.0.0.1\"\ntimeout = \"2s\"\n",
    );
    // Next free address per table: holding, input, coil, discrete.
    let mut next = [0_u32; 4];
    let mut gaps = 0;
    for i in 0..TAGS {
        let table = match i % 10 {
            8 => 2,
            9 => 3,
            _ if (i / 10) % 2 == 0 => 0,
            _ => 1,
        };
        // Now and then unused registers: a few are read along, many start a new request.
        let gap = match i % 97 {
            13 => 3,
            50 => 40,
            _ => 0,
        };
        if gap > 0 {
            gaps += 1;
            next[table] += gap;
        }
        let register = ["holding", "input", "coil", "discrete"][table];
        let address = next[table];
        let (data_type, extra, width) = match (table, i % 10) {
            (2 | 3, _) => ("bool", String::new(), 1),
            (_, 0 | 1) => ("u16", String::new(), 1),
            (_, 2) => ("i16", "scale = 0.1\nunit = \"degC\"\n".to_owned(), 1),
            (_, 3) => ("u32", String::new(), 2),
            (_, 4) => ("f32", "byte_order = \"CDAB\"\n".to_owned(), 2),
            (_, 5) => ("f64", String::new(), 4),
            // Two flags of one status word.
            (_, 6) => ("bit", "bit = 0\n".to_owned(), 0),
            _ => ("bit", "bit = 7\n".to_owned(), 1),
        };
        let _ = write!(
            map,
            "\n  [[modbus.tags]]\n  name = \"t{i:04}\"\n  register = \"{register}\"\n  address = {address}\n  type = \"{data_type}\"\n{extra}"
        );
        next[table] += width;
    }
    (map, gaps)
}

/// How many requests one scan of `device` sends, by the agent's planner.
fn planned_requests(device: &ModbusDevice) -> usize {
    let spans = device
        .tags
        .iter()
        .enumerate()
        .map(|(tag, t)| TagSpan {
            tag,
            kind: t.register,
            start: t.address,
            count: t.register_count(),
        })
        .collect();
    Planner::new(spans, device.max_gap).requests().len()
}

/// The agent's device task against `bank` for `window` after a warm-up.
async fn measure_agent(bank: &bank::Bank, template: &ModbusDevice, window: Duration) -> Figures {
    let device = ModbusDevice {
        port: bank.addr.port(),
        poll_interval: edge_agent::config::ConfigDuration(Duration::from_micros(1)),
        ..template.clone()
    };
    let (tx, mut rx) = mpsc::channel(8192);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_device(device, tx, stop.clone()));
    // The receiver is drained on a blocking thread, so the runtime's workers serve the agent
    // and the bank.
    let mut rx = tokio::task::spawn_blocking(move || {
        drain(&mut rx, Instant::now() + Duration::from_secs(1));
        rx
    })
    .await
    .expect("the warm-up drain ends");
    let requests_before = bank.requests();
    let started = Instant::now();
    let readings = tokio::task::spawn_blocking(move || drain(&mut rx, started + window))
        .await
        .expect("the drain ends");
    let secs = started.elapsed().as_secs_f64();
    let requests = bank.requests() - requests_before;
    stop.cancel();
    let _ = task.await;
    Figures {
        requests,
        scans: readings as f64 / TAGS as f64,
        readings,
        secs,
    }
}

/// Takes readings from `rx` until `until`; how many it took.
fn drain(rx: &mut mpsc::Receiver<Reading>, until: Instant) -> u64 {
    let mut readings = 0_u64;
    while Instant::now() < until {
        match rx.try_recv() {
            Ok(_) => readings += 1,
            Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
    readings
}

/// One request per tag, decoded and transformed, scan after scan, for `window` after a warm-up.
async fn measure_naive(bank: &bank::Bank, template: &ModbusDevice, window: Duration) -> Figures {
    let mut conn = tokio_modbus::client::tcp::connect_slave(bank.addr, Slave(template.unit_id))
        .await
        .expect("connect to the bank");
    let warm_up = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm_up {
        for tag in &template.tags {
            read_one(&mut conn, tag).await;
        }
    }
    let requests_before = bank.requests();
    let started = Instant::now();
    let end = started + window;
    let mut readings = 0_u64;
    'scans: loop {
        for tag in &template.tags {
            if Instant::now() >= end {
                break 'scans;
            }
            if read_one(&mut conn, tag).await {
                readings += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let requests = bank.requests() - requests_before;
    let _ = conn.disconnect().await;
    Figures {
        requests,
        scans: readings as f64 / TAGS as f64,
        readings,
        secs,
    }
}

/// Reads, decodes and transforms one tag with a request of its own; whether it read good.
async fn read_one(conn: &mut Context, tag: &ModbusTag) -> bool {
    let (start, count) = (tag.address, tag.register_count());
    let request = match tag.register {
        RegisterKind::Coil => Request::ReadCoils(start, count),
        RegisterKind::Discrete => Request::ReadDiscreteInputs(start, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
        RegisterKind::Input => Request::ReadInputRegisters(start, count),
    };
    let value = match conn.call(request).await {
        Ok(Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words))) => {
            decode_register_tag(&words, tag).ok()
        }
        Ok(Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits))) => {
            decode_bits(&bits, tag.data_type)
                .ok()
                .map(edge_agent::sources::modbus::decode::TagValue::Number)
        }
        _ => None,
    };
    value.map(|value| apply_value(value, tag)).is_some()
}

/// The CPU model and core count, for the figures' context.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpu}, {cores} cores")
}
