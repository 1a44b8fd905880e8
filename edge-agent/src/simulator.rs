//! A simulated PLC for the demo and for tests: a Modbus TCP server on 127.0.0.1 whose registers
//! move like a small hydraulic press.
//!
//! | tag            | table   | address | type | order | scale | unit  | signal                                   |
//! |----------------|---------|---------|------|-------|-------|-------|------------------------------------------|
//! | `oil_temp`     | holding | 0       | f32  | ABCD  | 1     | degC  | 70 ± 6 slow sine, ± 0.4 noise (63-77)    |
//! | `coolant_temp` | holding | 2       | f32  | ABCD  | 1     | degC  | 66 ± 4 slower sine, ± 0.4 noise (61-71)  |
//! | `pressure`     | holding | 4       | u16  |       | 0.01  | bar   | 5.0 ± 0.6 sine, ± 0.05 noise (4.3-5.7)   |
//! | `part_count`   | holding | 5       | u32  | CDAB  | 1     | parts | starts at 65 530, one part every ~1.4 s  |
//! | `motor_current`| input   | 0       | i16  |       | 0.1   | A     | 12 ± 1.5 sine, ± 0.3 noise; ~1 % spikes to 30-38 |
//!
//! Values change every 100 ms. The noise comes from a fixed-seed generator, so two runs produce
//! the same sequence of register values (what a poller samples from it still depends on timing).
//! Reads outside the table answer "illegal data address"; other functions "illegal function".

use std::f64::consts::TAU;
use std::future::{Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::config::{
    Addressing, ByteOrder, ConfigDuration, DataType, ModbusDevice, ModbusTag, RegisterKind,
};

/// How often the simulated process moves.
pub const UPDATE_INTERVAL: Duration = Duration::from_millis(100);

/// The first value of the part counter: close to 2^16, so the counter's high word changes a
/// minute into a demo and a wrong word order shows at once.
pub const PART_COUNT_START: u32 = 65_530;

const HOLDING_REGISTERS: usize = 7;
const INPUT_REGISTERS: usize = 1;

/// A running simulated PLC. Stops when dropped or on [`SimulatedPlc::shutdown`].
#[derive(Debug)]
pub struct SimulatedPlc {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl SimulatedPlc {
    /// Binds 127.0.0.1 on an ephemeral port and starts serving. Must be called from within a
    /// Tokio runtime.
    pub fn start() -> io::Result<Self> {
        Self::start_with_seed(DEFAULT_SEED)
    }

    /// Like [`SimulatedPlc::start`], with its own noise: two PLCs started with different seeds
    /// look like two machines rather than one machine twice.
    pub fn start_with_seed(seed: u64) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;

        let process = Arc::new(Mutex::new(Process::new(seed)));
        let stop = CancellationToken::new();
        let serve = tokio::spawn(serve(listener, Arc::clone(&process), stop.clone()));
        let update = tokio::spawn(update(process, stop.clone()));
        tracing::info!(component = "simulator", %addr, "simulated PLC listening");
        Ok(Self {
            addr,
            stop,
            tasks: vec![serve, update],
        })
    }

    /// The address the PLC listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sensor-map entry for this PLC: every simulated tag, named `name`, polled every second.
    pub fn device_config(&self, name: &str) -> ModbusDevice {
        use ByteOrder::{ABCD, CDAB};
        use DataType::{F32, I16, U16, U32};
        use RegisterKind::{Holding, Input};
        let tag = |name: &str,
                   register: RegisterKind,
                   address: u16,
                   data_type: DataType,
                   byte_order: ByteOrder,
                   scale: f64,
                   unit: &str| ModbusTag {
            byte_order,
            scale,
            unit: Some(unit.to_owned()),
            ..ModbusTag::new(name, register, address, data_type)
        };
        ModbusDevice {
            name: name.to_owned(),
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
            unit_id: 1,
            bus: None,
            inter_frame_delay: None,
            poll_interval: ConfigDuration::from_secs(1),
            timeout: ConfigDuration::from_secs(1),
            addressing: Addressing::ZeroBased,
            max_gap: ModbusDevice::DEFAULT_MAX_GAP,
            max_registers_per_request: None,
            max_bits_per_request: None,
            tags: vec![
                tag("oil_temp", Holding, 0, F32, ABCD, 1.0, "degC"),
                tag("coolant_temp", Holding, 2, F32, ABCD, 1.0, "degC"),
                tag("pressure", Holding, 4, U16, ABCD, 0.01, "bar"),
                tag("part_count", Holding, 5, U32, CDAB, 1.0, "parts"),
                tag("motor_current", Input, 0, I16, ABCD, 0.1, "A"),
            ],
        }
    }

    /// Stops serving, closes open connections and waits for the server's tasks to end.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            // A task that panicked has stopped as well; there is nothing left to clean up.
            let _ = task.await;
        }
    }
}

impl Drop for SimulatedPlc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    process: Arc<Mutex<Process>>,
    stop: CancellationToken,
) {
    let service = Arc::new(PlcService { process });
    let server = Server::new(listener);
    let on_connected = |stream, peer| {
        let service = Arc::clone(&service);
        async move { accept_tcp_connection(stream, peer, |_| Ok(Some(Arc::clone(&service)))) }
    };
    let on_error = |err: io::Error| {
        tracing::debug!(component = "simulator", error = %err, "client connection ended with an error");
    };
    // Dropping the serve future (on stop) also cancels the per-connection tasks it spawned.
    tokio::select! {
        () = stop.cancelled() => {}
        result = server.serve(&on_connected, on_error) => {
            if let Err(err) = result {
                tracing::error!(component = "simulator", error = %err, "simulated PLC stopped accepting connections");
            }
        }
    }
}

async fn update(process: Arc<Mutex<Process>>, stop: CancellationToken) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(UPDATE_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let t = started.elapsed().as_secs_f64();
        process
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .step(t);
    }
}

struct PlcService {
    process: Arc<Mutex<Process>>,
}

impl tokio_modbus::server::Service for PlcService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        let process = self.process.lock().unwrap_or_else(PoisonError::into_inner);
        ready(match request {
            Request::ReadHoldingRegisters(address, count) => {
                read(&process.holding, address, count).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(address, count) => {
                read(&process.input, address, count).map(Response::ReadInputRegisters)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

fn read(table: &[u16], address: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
    let start = usize::from(address);
    let end = start + usize::from(count);
    if count == 0 || end > table.len() {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(table[start..end].to_vec())
}

/// The noise seed of [`SimulatedPlc::start`].
const DEFAULT_SEED: u64 = 0x5EED_CAFE_F00D_D00D;

/// The simulated machine and its register image.
struct Process {
    holding: [u16; HOLDING_REGISTERS],
    input: [u16; INPUT_REGISTERS],
    parts: u32,
    noise: Noise,
}

impl Process {
    fn new(seed: u64) -> Self {
        let mut process = Self {
            holding: [0; HOLDING_REGISTERS],
            input: [0; INPUT_REGISTERS],
            parts: PART_COUNT_START,
            // xorshift never leaves zero.
            noise: Noise(if seed == 0 { DEFAULT_SEED } else { seed }),
        };
        process.step(0.0);
        process
    }

    /// Moves the process to `t` seconds after start and rewrites the registers.
    fn step(&mut self, t: f64) {
        let wave = |period: f64, phase: f64| (TAU * t / period + phase).sin();
        let oil = 70.0 + 6.0 * wave(90.0, 0.0) + self.noise.between(-0.4, 0.4);
        let coolant = 66.0 + 4.0 * wave(150.0, 1.0) + self.noise.between(-0.4, 0.4);
        let pressure = 5.0 + 0.6 * wave(30.0, 0.5) + self.noise.between(-0.05, 0.05);
        let current = if self.noise.between(0.0, 1.0) < 0.01 {
            self.noise.between(30.0, 38.0)
        } else {
            12.0 + 1.5 * wave(20.0, 2.0) + self.noise.between(-0.3, 0.3)
        };
        if self.noise.between(0.0, 1.0) < 0.07 {
            self.parts = self.parts.wrapping_add(1);
        }

        let [oil_hi, oil_lo] = split(f32_bits(oil));
        let [coolant_hi, coolant_lo] = split(f32_bits(coolant));
        let [parts_hi, parts_lo] = split(self.parts);
        self.holding = [
            oil_hi,
            oil_lo,
            coolant_hi,
            coolant_lo,
            to_register(pressure * 100.0),
            // CDAB: low word first.
            parts_lo,
            parts_hi,
        ];
        self.input = [to_register(current * 10.0)];
    }
}

#[allow(clippy::cast_possible_truncation)] // The process values are small, f32 holds them as a PLC would.
fn f32_bits(value: f64) -> u32 {
    (value as f32).to_bits()
}

fn split(value: u32) -> [u16; 2] {
    let [a, b, c, d] = value.to_be_bytes();
    [u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])]
}

/// Rounds a raw value into a register; the simulated signals stay well inside i16 and u16.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn to_register(raw: f64) -> u16 {
    // A negative raw value is stored in two's complement, as a PLC stores an INT.
    (raw.round() as i32) as u16
}

/// xorshift64*: tiny, fast and plenty for sensor noise. Not for anything secret.
struct Noise(u64);

impl Noise {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform value in `[low, high)`.
    fn between(&mut self, low: f64, high: f64) -> f64 {
        // The top 53 bits make an exactly representable fraction in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + unit * (high - low)
    }
}

#[cfg(test)]
// The counter is compared exactly: it is an integer carried in an f64.
#[allow(clippy::float_cmp)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::contract::Quality;
    use crate::sources::modbus::run_device;

    #[test]
    fn the_register_image_encodes_every_signal_as_the_sensor_map_says() {
        let mut process = Process::new(DEFAULT_SEED);
        for step in 0..3000 {
            process.step(f64::from(step) * 0.1);
            let words = |range: std::ops::Range<usize>| process.holding[range].to_vec();
            let oil = crate::sources::modbus::decode::decode(
                &words(0..2),
                DataType::F32,
                ByteOrder::ABCD,
            )
            .unwrap();
            assert!((63.0..=77.0).contains(&oil), "oil {oil}");
            let coolant = crate::sources::modbus::decode::decode(
                &words(2..4),
                DataType::F32,
                ByteOrder::ABCD,
            )
            .unwrap();
            assert!((61.0..=71.0).contains(&coolant), "coolant {coolant}");
            let pressure = f64::from(process.holding[4]) * 0.01;
            assert!((4.3..=5.7).contains(&pressure), "pressure {pressure}");
            let parts = crate::sources::modbus::decode::decode(
                &words(5..7),
                DataType::U32,
                ByteOrder::CDAB,
            )
            .unwrap();
            assert_eq!(parts, f64::from(process.parts));
            let current = f64::from(process.input[0].cast_signed()) * 0.1;
            assert!((10.0..=38.0).contains(&current), "current {current}");
        }
        // 3000 steps at a 7 % chance each: the counter moved, and crossed 2^16.
        assert!(process.parts > 65_536, "{}", process.parts);
    }

    #[test]
    fn reads_outside_the_table_are_refused() {
        let table = [1, 2, 3];
        assert_eq!(read(&table, 1, 2), Ok(vec![2, 3]));
        assert_eq!(read(&table, 2, 2), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(read(&table, 0, 0), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(
            read(&table, u16::MAX, u16::MAX),
            Err(ExceptionCode::IllegalDataAddress)
        );
    }

    #[tokio::test]
    async fn the_modbus_poller_reads_plausible_good_values_from_the_simulator() {
        let plc = SimulatedPlc::start().unwrap();
        let mut device = plc.device_config("press-1");
        device.poll_interval = ConfigDuration::from_millis(50);
        let (tx, mut rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run_device(device, tx, stop.clone()));

        let mut seen = std::collections::HashMap::new();
        for _ in 0..10 {
            let reading = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a reading within 5 s")
                .expect("the poller is running");
            assert_eq!(reading.device, "press-1");
            assert_eq!(reading.quality, Quality::Good, "{reading:?}");
            let value = reading.value.expect("a good reading has a value");
            let (range, unit) = match reading.tag.as_str() {
                "oil_temp" => (63.0..=77.0, "degC"),
                "coolant_temp" => (61.0..=71.0, "degC"),
                "pressure" => (4.3..=5.7, "bar"),
                "part_count" => (
                    f64::from(PART_COUNT_START)..=f64::from(PART_COUNT_START + 1000),
                    "parts",
                ),
                "motor_current" => (10.0..=38.0, "A"),
                other => panic!("unexpected tag {other}"),
            };
            assert!(range.contains(&value), "{} = {value}", reading.tag);
            assert_eq!(reading.unit.as_deref(), Some(unit));
            seen.insert(reading.tag, value);
        }
        assert_eq!(seen.len(), 5);

        stop.cancel();
        poller.await.unwrap();
        plc.shutdown().await;
    }
}
