//! `edge-agent probe`: reads a device now and shows what the agent would record, so a plant
//! engineer can check a sensor-map line (or a register from the PLC's manual) before deploying.
//!
//! Three modes:
//! - **Tags** ([`probe_tags`]): the device and its tags come from a sensor map; each selected tag
//!   is read once with the device's host, port, unit id and timeout (a slave on a
//!   `[[modbus_bus]]`: over that bus's serial port or serial gateway, with the bus's framing and
//!   the slave's inter-frame delay), and printed as one line with the raw words, the decoded and
//!   scaled value with its unit, and the quality.
//! - **Raw** ([`probe_raw`]): a register range read without a config, over Modbus TCP, RTU over
//!   TCP (a serial gateway) or a serial port; prints every word, and the decoded values when a
//!   type is given.
//! - **MQTT** ([`probe_mqtt`]): listens to a broker of the sensor map for a few seconds on its own
//!   clean session and prints what the mapping makes of every message (see [`mqtt`]).
//!
//! # What always holds
//! - Every network call runs under a timeout; a probe never hangs on a silent device.
//! - A tag line shows exactly what the agent would record: the same decoding
//!   ([`decode_words`], [`decode_bits`]), the same scaling and range check ([`transform::apply`],
//!   `uncertain` when clamped) and `bad` quality wherever the agent would record `bad`. The
//!   device's `addressing` is applied, so a one-based map reads the same registers as the agent.
//! - After a timeout or a broken answer a TCP connection is reopened before the next tag, as the
//!   agent does, so a late answer is never taken for the next tag's. An RTU line is opened once
//!   and kept, as the agent's bus task keeps it: its framing is reset after a timeout or a bad
//!   CRC, and stray bytes are thrown away before each request.
//! - A serial port is opened exclusively: while the agent polls that bus the port is busy, and
//!   the probe says so.
//! - [`ProbeError::exit_code`] is 78 for a bad config or bad arguments and 1 when the device
//!   (or the MQTT broker) did not answer or refused a request.

pub mod mqtt;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use crate::config::{
    AgentConfig, BusTransport, ByteOrder, ConfigDuration, DataType, ModbusBus, ModbusDevice,
    ModbusTag, Parity, RegisterKind,
};
use crate::sources::modbus::decode::{
    TagValue, decode_bits, decode_register_tag, decode_scaled, decode_text, type_name,
};
use crate::sources::modbus::device::{self as modbus_device, CallError};
use crate::sources::modbus::line::Line;
use crate::sources::modbus::plan::PlannedRequest;
use crate::sources::modbus::{PollError, transform};

pub use mqtt::{MqttProbeArgs, MqttProbeSummary, probe_mqtt};

/// The largest register count one read request may ask for (Modbus application protocol, 6.3).
pub const MAX_REGISTERS_PER_READ: u16 = 125;
/// The largest coil or discrete input count one read request may ask for (6.1, 6.2).
pub const MAX_BITS_PER_READ: u16 = 2000;

/// Exit code for a bad config or bad arguments (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when the device did not answer or refused a request.
pub const EXIT_DEVICE: u8 = 1;

/// Why a probe could not show a value.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The sensor map has no device of that name.
    #[error("{}: no device `{device}` in the sensor map; use one of: {}", file.display(), known.join(", "))]
    UnknownDevice {
        file: PathBuf,
        device: String,
        known: Vec<String>,
    },
    /// The device names a bus the sensor map does not have (a map that was not validated).
    #[error("{}: device `{device}` is on bus `{bus}`, which the sensor map does not have; add its [[modbus_bus]]", file.display())]
    UnknownBus {
        file: PathBuf,
        device: String,
        bus: String,
    },
    /// The device has no tag of that name.
    #[error("{}: device `{device}` has no tag `{tag}`; use one of: {}", file.display(), known.join(", "))]
    UnknownTag {
        file: PathBuf,
        device: String,
        tag: String,
        known: Vec<String>,
    },
    /// The sensor map has no MQTT broker of that name.
    #[error("{}: no MQTT broker `{broker}` in the sensor map; use one of: {}", file.display(), one_of(known))]
    UnknownBroker {
        file: PathBuf,
        broker: String,
        known: Vec<String>,
    },
    /// The broker has no subscription with that topic filter.
    #[error("{}: broker `{broker}` has no subscription `{subscription}`; use one of: {}", file.display(), one_of(known))]
    UnknownSubscription {
        file: PathBuf,
        broker: String,
        subscription: String,
        known: Vec<String>,
    },
    /// The broker's section cannot be used as it is (a password that cannot be read).
    #[error("{}: {reason}", file.display())]
    MqttConfig { file: PathBuf, reason: String },
    /// The MQTT broker could not be reached or broke off.
    #[error("cannot reach MQTT broker `{broker}` at {host}:{port}: {reason}")]
    BrokerUnreachable {
        broker: String,
        host: String,
        port: u16,
        reason: String,
    },
    /// The broker refused a subscription (an ACL, a broker limit).
    #[error(
        "broker `{broker}` refused the subscription to `{filter}`; check the broker's ACL for this user"
    )]
    SubscriptionRefused { broker: String, filter: String },
    /// The command-line arguments of a raw probe do not describe a valid read; every problem is
    /// listed.
    #[error("{}", problems.join("\n"))]
    InvalidArguments { problems: Vec<String> },
    /// The host name did not resolve.
    #[error("cannot resolve {host}:{port} for {device}: {reason}")]
    Resolve {
        device: String,
        host: String,
        port: u16,
        reason: String,
    },
    /// The TCP connection or the serial port could not be opened.
    #[error("cannot connect to {device}: {reason}")]
    Connect { device: String, reason: String },
    /// The device did not answer in time.
    #[error("{device} did not answer within {timeout} reading {registers}")]
    Timeout {
        device: String,
        registers: Registers,
        timeout: ConfigDuration,
    },
    /// The device answered with a Modbus exception.
    #[error("{device} refused {registers}: exception {} ({code})", u8::from(*code))]
    Exception {
        device: String,
        registers: Registers,
        code: ExceptionCode,
    },
    /// The connection broke or the device answered out of protocol.
    #[error("{device} broke off reading {registers}: {reason}")]
    Transport {
        device: String,
        registers: Registers,
        reason: String,
    },
}

impl ProbeError {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownDevice { .. }
            | Self::UnknownBus { .. }
            | Self::UnknownTag { .. }
            | Self::UnknownBroker { .. }
            | Self::UnknownSubscription { .. }
            | Self::MqttConfig { .. }
            | Self::InvalidArguments { .. } => EXIT_CONFIG,
            Self::Resolve { .. }
            | Self::BrokerUnreachable { .. }
            | Self::SubscriptionRefused { .. }
            | Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Exception { .. }
            | Self::Transport { .. } => EXIT_DEVICE,
        }
    }

    /// Whether the connection must be reopened before the next request.
    fn breaks_connection(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
    }
}

/// The names a user can choose from, for an error message.
fn one_of(known: &[String]) -> String {
    if known.is_empty() {
        "(none configured)".to_owned()
    } else {
        known.join(", ")
    }
}

/// A register range as named in messages: `holding 100` or `holding 100-101`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    /// The table.
    pub kind: RegisterKind,
    /// First register address (zero-based, as on the wire).
    pub first: u16,
    /// How many registers.
    pub count: u16,
}

impl fmt::Display for Registers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = u32::from(self.first) + u32::from(self.count.max(1)) - 1;
        if last == u32::from(self.first) {
            write!(f, "{} {}", self.kind.name(), self.first)
        } else {
            write!(f, "{} {}-{last}", self.kind.name(), self.first)
        }
    }
}

/// What a probe printed, and whether anything failed (exit code 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The output, one line per tag (tags mode) or per register and decoded value (raw mode).
    pub lines: Vec<String>,
    /// A tag could not be read because the device did not answer or refused the request.
    pub device_failed: bool,
}

/// How a probe reaches the device.
#[derive(Debug, Clone)]
enum Target {
    /// Modbus TCP.
    Tcp { host: String, port: u16 },
    /// An RTU line: a serial port, or a serial gateway over TCP; the bus's `inter_frame_delay`
    /// is the silence before each request.
    Rtu(ModbusBus),
}

/// Where to connect and how the device is named in messages.
struct Endpoint {
    label: String,
    target: Target,
    unit_id: u8,
    timeout: ConfigDuration,
}

/// An open connection to the device.
enum Conn {
    Tcp(Context),
    Rtu(Line),
}

impl Conn {
    /// Whether it must be reopened after `err` before the next request: a TCP connection after
    /// a timeout or a broken answer (a late answer would be taken for the next one's), an RTU
    /// line only when the line itself failed (it resets its framing otherwise).
    fn broken_by(&self, err: &ProbeError) -> bool {
        match self {
            Conn::Tcp(_) => err.breaks_connection(),
            Conn::Rtu(line) => !line.is_open(),
        }
    }

    async fn close(self, timeout: ConfigDuration) {
        match self {
            Conn::Tcp(mut conn) => {
                let _ = tokio::time::timeout(timeout.0, conn.disconnect()).await;
            }
            Conn::Rtu(mut line) => line.close(timeout.0).await,
        }
    }
}

/// Reads the tags of `device` (all, or only `tag`) from a loaded sensor map once each.
///
/// `file` is the sensor map's path, for messages. A device that cannot be reached is an error;
/// a tag the device refuses or does not answer is a `bad` line and sets
/// [`Report::device_failed`].
pub async fn probe_tags(
    config: &AgentConfig,
    file: &Path,
    device: &str,
    tag: Option<&str>,
) -> Result<Report, ProbeError> {
    let Some(dev) = config.modbus.iter().find(|d| d.name == device) else {
        return Err(ProbeError::UnknownDevice {
            file: file.to_owned(),
            device: device.to_owned(),
            known: config.modbus.iter().map(|d| d.name.clone()).collect(),
        });
    };
    let tags: Vec<&ModbusTag> = match tag {
        None => dev.tags.iter().collect(),
        Some(name) => {
            let Some(found) = dev.tags.iter().find(|t| t.name == name) else {
                return Err(ProbeError::UnknownTag {
                    file: file.to_owned(),
                    device: device.to_owned(),
                    tag: name.to_owned(),
                    known: dev.tags.iter().map(|t| t.name.clone()).collect(),
                });
            };
            vec![found]
        }
    };
    let endpoint = device_endpoint(config, file, dev)?;

    let mut conn = Some(connect(&endpoint).await?);
    let mut report = Report {
        lines: Vec::with_capacity(tags.len()),
        device_failed: false,
    };
    for tag in tags {
        // The sensor map's address may count from 1; the wire always counts from 0. A
        // validated map has no address that maps to nothing.
        let first = dev.addressing.wire_address(tag.address).unwrap_or(0);
        let registers = Registers {
            kind: tag.register,
            first,
            count: tag.register_count(),
        };
        let connection = match conn.as_mut() {
            Some(connection) => connection,
            None => conn.insert(connect(&endpoint).await?),
        };
        let place = match (tag.data_type, tag.bit) {
            (DataType::Bit, Some(bit)) => format!("bit {bit} of {registers}"),
            _ => registers.to_string(),
        };
        let line = match read(connection, &endpoint, &registers).await {
            Ok(answer) => {
                let (shown, decoded) = match &answer {
                    Answer::Words(words) => (format_words(words), decode_register_tag(words, tag)),
                    Answer::Bits(bits) => (
                        format_bits(bits),
                        decode_bits(bits, tag.data_type).map(TagValue::Number),
                    ),
                };
                let value = match decoded {
                    Ok(raw) => {
                        let (value, quality) = transform::apply_value(raw, tag);
                        let quality = quality.as_str();
                        match &tag.unit {
                            Some(unit) => format!("{value} {unit}, {quality}"),
                            None => format!("{value}, {quality}"),
                        }
                    }
                    Err(err) => format!("bad: {err}"),
                };
                format!("{}: {place} = {shown} -> {value}", tag.name)
            }
            Err(err) => {
                report.device_failed = true;
                if connection.broken_by(&err) {
                    conn = None;
                }
                format!("{}: {place} -> bad: {err}", tag.name)
            }
        };
        report.lines.push(line);
    }
    if let Some(conn) = conn {
        conn.close(endpoint.timeout).await;
    }
    Ok(report)
}

/// How a sensor map's device is reached: at its host, or over its bus's line.
fn device_endpoint(
    config: &AgentConfig,
    file: &Path,
    dev: &ModbusDevice,
) -> Result<Endpoint, ProbeError> {
    Ok(match &dev.bus {
        None => Endpoint {
            label: format!(
                "{} (unit {} at {}:{})",
                dev.name, dev.unit_id, dev.host, dev.port
            ),
            target: Target::Tcp {
                host: dev.host.clone(),
                port: dev.port,
            },
            unit_id: dev.unit_id,
            timeout: dev.timeout,
        },
        Some(name) => {
            let Some(bus) = config.modbus_bus.iter().find(|bus| &bus.name == name) else {
                return Err(ProbeError::UnknownBus {
                    file: file.to_owned(),
                    device: dev.name.clone(),
                    bus: name.clone(),
                });
            };
            // The slave's own pause when it asks for more than the bus's, as the agent does.
            let gap = dev
                .inter_frame_delay
                .map_or(bus.inter_frame_delay(), |own| {
                    own.0.max(bus.inter_frame_delay())
                });
            Endpoint {
                label: format!(
                    "{} (unit {} on bus {}, {})",
                    dev.name,
                    dev.unit_id,
                    bus.name,
                    bus.describe()
                ),
                target: Target::Rtu(ModbusBus {
                    inter_frame_delay: Some(ConfigDuration(gap)),
                    ..bus.clone()
                }),
                unit_id: dev.unit_id,
                timeout: dev.timeout,
            }
        }
    })
}

/// The arguments of a raw probe as given on the command line, before they are checked.
#[derive(Debug, Clone)]
pub struct RawArgs {
    /// Host name or IP address of the device, or of the serial gateway with `rtu_over_tcp`;
    /// empty with `serial`.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Send RTU frames (with their CRC) over the TCP connection, as to a serial device server.
    pub rtu_over_tcp: bool,
    /// The serial port of an RTU line, in place of `host`.
    pub serial: Option<String>,
    /// Bits per second on the serial line (with `rtu_over_tcp`: the line behind the gateway,
    /// which only sets the pause between frames).
    pub baud_rate: u32,
    /// `none`, `even` or `odd`.
    pub parity: String,
    /// 1 or 2.
    pub stop_bits: u8,
    /// Modbus unit id.
    pub unit_id: u8,
    /// Register table as written in a sensor map (`holding`, `input`).
    pub register: String,
    /// First register, zero-based.
    pub address: u16,
    /// Registers to read; defaults to what one value of `data_type` needs, or 1.
    pub count: Option<u16>,
    /// Decode the words as this sensor-map type (`f32`, `u16`, ...); `string` reads the whole
    /// range as one text.
    pub data_type: Option<String>,
    /// Byte order of the decoded type (`ABCD`, `CDAB`, `BADC`, `DCBA`).
    pub byte_order: Option<String>,
    /// Multiplier applied after decoding.
    pub scale: Option<f64>,
    /// Added after scaling.
    pub offset: Option<f64>,
    /// How long the device may take to connect and to answer.
    pub timeout: ConfigDuration,
}

/// A checked raw probe.
#[derive(Debug, Clone)]
pub struct RawProbe {
    target: Target,
    unit_id: u8,
    registers: Registers,
    decode: Option<RawDecode>,
    timeout: ConfigDuration,
}

#[derive(Debug, Clone, Copy)]
struct RawDecode {
    data_type: DataType,
    byte_order: ByteOrder,
    scale: f64,
    offset: f64,
}

impl RawProbe {
    /// Checks the arguments; every problem is reported at once, each naming the option and the fix.
    pub fn new(args: RawArgs) -> Result<Self, ProbeError> {
        let mut problems = Vec::new();
        let register = parse_enum::<RegisterKind>(&args.register.to_ascii_lowercase())
            .map_err(|e| problems.push(format!("--register {}: {e}", args.register)))
            .ok();
        let data_type = args.data_type.as_ref().and_then(|text| {
            parse_enum::<DataType>(&text.to_ascii_lowercase())
                .map_err(|e| problems.push(format!("--type {text}: {e}")))
                .ok()
        });
        let byte_order = match &args.byte_order {
            None => Some(ByteOrder::default()),
            Some(text) => parse_enum::<ByteOrder>(&text.to_ascii_uppercase())
                .map_err(|e| problems.push(format!("--byte-order {text}: {e}")))
                .ok(),
        };
        if let (Some(register), Some(data_type)) = (register, data_type) {
            problems.extend(type_misfit(register, data_type));
        }
        let scale = args.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale == 0.0 {
            problems.push(format!(
                "--scale {scale}: use a finite, non-zero multiplier such as 0.1"
            ));
        }
        let offset = args.offset.unwrap_or(0.0);
        if !offset.is_finite() {
            problems.push(format!(
                "--offset {offset}: use a finite number such as -40"
            ));
        }
        let width = data_type.map_or(1, DataType::register_count);
        let count = args.count.unwrap_or(width);
        let max = if register.is_some_and(RegisterKind::is_bits) {
            MAX_BITS_PER_READ
        } else {
            MAX_REGISTERS_PER_READ
        };
        if !(1..=max).contains(&count) {
            problems.push(format!(
                "--count {count}: one request reads 1 to {max} {}; use a count in that range",
                if max == MAX_BITS_PER_READ {
                    "bits"
                } else {
                    "registers"
                }
            ));
        } else if u32::from(args.address) + u32::from(count) - 1 > u32::from(u16::MAX) {
            problems.push(format!(
                "--address {} --count {count}: the range ends past the last address 65535; use an address of at most {}",
                args.address,
                u16::MAX - (count - 1)
            ));
        }
        if let Some(data_type) = data_type
            && !count.is_multiple_of(width)
        {
            problems.push(format!(
                "--count {count}: {} values take {width} registers each; use a multiple of {width}",
                type_name(data_type)
            ));
        }
        if args.timeout.0.is_zero() {
            problems.push(
                "--timeout 0s: a timeout of 0s fails every request; use for example 1s".to_owned(),
            );
        }
        let (unit_id, first, timeout) = (args.unit_id, args.address, args.timeout);
        let target = raw_target(args, &mut problems);
        let (Some(register), Some(byte_order), Some(target), true) =
            (register, byte_order, target, problems.is_empty())
        else {
            return Err(ProbeError::InvalidArguments { problems });
        };
        Ok(Self {
            target,
            unit_id,
            registers: Registers {
                kind: register,
                first,
                count,
            },
            decode: data_type.map(|data_type| RawDecode {
                data_type,
                byte_order,
                scale,
                offset,
            }),
            timeout,
        })
    }
}

/// Where a raw probe goes: Modbus TCP, RTU over TCP, or a serial port with its framing.
fn raw_target(args: RawArgs, problems: &mut Vec<String>) -> Option<Target> {
    if !args.rtu_over_tcp && args.serial.is_none() {
        return Some(Target::Tcp {
            host: args.host,
            port: args.port,
        });
    }
    let parity = parse_enum::<Parity>(&args.parity.to_ascii_lowercase())
        .map_err(|e| problems.push(format!("--parity {}: {e}", args.parity)))
        .ok();
    if args.baud_rate == 0 {
        problems.push(
            "--baud 0: carries no data; use the rate set on the slaves, for example --baud 9600 or 19200"
                .to_owned(),
        );
    }
    if !matches!(args.stop_bits, 1 | 2) {
        problems.push(format!(
            "--stop-bits {}: does not exist on a serial line; use 1 or 2",
            args.stop_bits
        ));
    }
    if !(1..=247).contains(&args.unit_id) {
        problems.push(format!(
            "--unit {}: not a slave address on a serial line (0 is broadcast, which no slave answers; 248 and up are reserved); use the address set on the device, 1 to 247",
            args.unit_id
        ));
    }
    let (transport, serial_port, host, port) = match args.serial {
        Some(path) => (BusTransport::Rtu, Some(path), None, None),
        None => (
            BusTransport::RtuOverTcp,
            None,
            Some(args.host),
            Some(args.port),
        ),
    };
    Some(Target::Rtu(ModbusBus {
        name: "probe".to_owned(),
        transport,
        serial_port,
        host,
        port,
        baud_rate: args.baud_rate,
        parity: parity?,
        data_bits: 8,
        stop_bits: args.stop_bits,
        inter_frame_delay: None,
    }))
}

/// Why `data_type` cannot be read from `register`, if it cannot.
fn type_misfit(register: RegisterKind, data_type: DataType) -> Option<String> {
    let fits = if register.is_bits() {
        data_type == DataType::Bool
    } else {
        data_type != DataType::Bool && data_type != DataType::Bit
    };
    if fits {
        return None;
    }
    let (table, fix) = if register.is_bits() {
        ("bits", "--type bool or leave --type out")
    } else {
        (
            "registers",
            "a word type (u16, i16, u32, i32, u64, i64, f32, f64) or string; read a bit as u16 and look at the hex",
        )
    };
    Some(format!(
        "--type {}: does not fit {} {table}; use {fix}",
        data_type.name(),
        register.name()
    ))
}

/// Reads a raw register range once. Prints one line per register (or bit), then one per
/// decoded value.
pub async fn probe_raw(probe: &RawProbe) -> Result<Report, ProbeError> {
    let label = match &probe.target {
        Target::Tcp { host, port } => format!("unit {} at {host}:{port}", probe.unit_id),
        Target::Rtu(bus) => format!("unit {} on {}", probe.unit_id, bus.describe()),
    };
    let endpoint = Endpoint {
        label,
        target: probe.target.clone(),
        unit_id: probe.unit_id,
        timeout: probe.timeout,
    };
    let mut conn = connect(&endpoint).await?;
    let result = read(&mut conn, &endpoint, &probe.registers).await;
    // A TCP device that did not answer in time is not asked to close politely either.
    if !result.as_ref().is_err_and(|err| conn.broken_by(err)) {
        conn.close(endpoint.timeout).await;
    }
    let kind = probe.registers.kind.name();
    // u32 addresses: counting past address 65535 must not overflow.
    let first = u32::from(probe.registers.first);
    let mut lines = Vec::new();
    match result? {
        Answer::Bits(bits) => {
            // A bit read answers in whole bytes; the padding bits are not the device's.
            let count = usize::from(probe.registers.count);
            for (address, bit) in (first..).zip(bits.iter().take(count)) {
                lines.push(format!("{kind} {address} = {}", u8::from(*bit)));
            }
        }
        Answer::Words(words) => {
            for (address, word) in (first..).zip(&words) {
                lines.push(format!("{kind} {address} = 0x{word:04X} ({word})"));
            }
            if let Some(decode) = probe.decode {
                // A string is the whole range; other types repeat at their width.
                let width = if decode.data_type.is_text() {
                    words.len().max(1)
                } else {
                    usize::from(decode.data_type.register_count())
                };
                for (address, chunk) in (first..).step_by(width).zip(words.chunks(width)) {
                    let value = if decode.data_type.is_text() {
                        let length = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
                        decode_text(chunk, length, decode.byte_order)
                            .map_or_else(|err| format!("bad: {err}"), |t| format!("{t:?}"))
                    } else {
                        decode_scaled(
                            chunk,
                            decode.data_type,
                            decode.byte_order,
                            decode.scale,
                            decode.offset,
                        )
                        .map_or_else(|err| format!("bad: {err}"), |v| v.to_string())
                    };
                    lines.push(format!(
                        "{} {:?} at {kind} {address} -> {value}",
                        type_name(decode.data_type),
                        decode.byte_order
                    ));
                }
            }
        }
    }
    Ok(Report {
        lines,
        device_failed: false,
    })
}

/// `0x42F6 0xE979 (17142 59769)`.
fn format_words(words: &[u16]) -> String {
    let hex: Vec<String> = words.iter().map(|w| format!("0x{w:04X}")).collect();
    let dec: Vec<String> = words.iter().map(u16::to_string).collect();
    format!("{} ({})", hex.join(" "), dec.join(" "))
}

/// Parses a value the way the sensor map spells it, so the accepted names always match the
/// config's and serde's message lists the choices.
fn parse_enum<'de, T: Deserialize<'de>>(text: &'de str) -> Result<T, serde::de::value::Error> {
    T::deserialize(text.into_deserializer())
}

/// The one bit a tag reads: `1` or `0`. A bit read answers in whole bytes; the padding bits
/// are not the device's.
fn format_bits(bits: &[bool]) -> String {
    bits.first()
        .map_or_else(|| "no bits".to_owned(), |b| u8::from(*b).to_string())
}

/// What a read answered.
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

async fn connect(endpoint: &Endpoint) -> Result<Conn, ProbeError> {
    let connect_error = |reason: String| ProbeError::Connect {
        device: endpoint.label.clone(),
        reason,
    };
    let bus = match &endpoint.target {
        Target::Tcp { host, port } => {
            return connect_tcp(endpoint, host, *port).await.map(Conn::Tcp);
        }
        Target::Rtu(bus) => bus,
    };
    let mut line = Line::new(bus.clone());
    match line.open(endpoint.timeout.0).await {
        Ok(()) => Ok(Conn::Rtu(line)),
        Err(PollError::Resolve { host, port, reason }) => Err(ProbeError::Resolve {
            device: endpoint.label.clone(),
            host,
            port,
            reason,
        }),
        Err(PollError::Connect { source, .. })
            if bus.transport == BusTransport::Rtu
                && source.kind() == std::io::ErrorKind::ResourceBusy =>
        {
            Err(connect_error(format!(
                "{source}; another program has the port open (the agent, while it polls this bus): probe while it is stopped (systemctl stop edge-agent)"
            )))
        }
        Err(PollError::Connect { source, .. }) => Err(connect_error(source.to_string())),
        Err(other) => Err(connect_error(other.to_string())),
    }
}

async fn connect_tcp(endpoint: &Endpoint, host: &str, port: u16) -> Result<Context, ProbeError> {
    let timeout = endpoint.timeout;
    let resolve_error = |reason: String| ProbeError::Resolve {
        device: endpoint.label.clone(),
        host: host.to_owned(),
        port,
        reason,
    };
    let lookup = tokio::net::lookup_host((host, port));
    let addr: SocketAddr = match tokio::time::timeout(timeout.0, lookup).await {
        Err(_) => return Err(resolve_error(format!("no answer within {timeout}"))),
        Ok(Err(err)) => return Err(resolve_error(err.to_string())),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| resolve_error("the name has no address".to_owned()))?,
    };
    let connecting = tokio_modbus::client::tcp::connect_slave(addr, Slave(endpoint.unit_id));
    match tokio::time::timeout(timeout.0, connecting).await {
        Err(_) => Err(ProbeError::Connect {
            device: endpoint.label.clone(),
            reason: format!("no answer within {timeout}"),
        }),
        Ok(Err(err)) => Err(ProbeError::Connect {
            device: endpoint.label.clone(),
            reason: err.to_string(),
        }),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// One read request under the endpoint's timeout.
async fn read(
    conn: &mut Conn,
    endpoint: &Endpoint,
    registers: &Registers,
) -> Result<Answer, ProbeError> {
    match conn {
        Conn::Tcp(conn) => read_tcp(conn, endpoint, registers).await,
        Conn::Rtu(line) => read_rtu(line, endpoint, registers).await,
    }
}

/// One read request on an RTU line, after the line's inter-frame silence.
async fn read_rtu(
    line: &mut Line,
    endpoint: &Endpoint,
    registers: &Registers,
) -> Result<Answer, ProbeError> {
    let gap = match &endpoint.target {
        Target::Rtu(bus) => bus.inter_frame_delay(),
        Target::Tcp { .. } => Duration::ZERO,
    };
    let request = PlannedRequest {
        kind: registers.kind,
        start: registers.first,
        count: registers.count,
        tags: Vec::new(),
    };
    let outcome = line
        .exchange(endpoint.unit_id, gap, &request, endpoint.timeout.0)
        .await;
    match outcome {
        Ok(modbus_device::Answer::Words(words)) => Ok(Answer::Words(words)),
        Ok(modbus_device::Answer::Bits(bits)) => Ok(Answer::Bits(bits)),
        Err(CallError::Timeout) => Err(ProbeError::Timeout {
            device: endpoint.label.clone(),
            registers: registers.clone(),
            timeout: endpoint.timeout,
        }),
        Err(CallError::Exception(code)) => Err(ProbeError::Exception {
            device: endpoint.label.clone(),
            registers: registers.clone(),
            code,
        }),
        Err(CallError::Garbled(reason) | CallError::Stray(reason) | CallError::Broken(reason)) => {
            Err(ProbeError::Transport {
                device: endpoint.label.clone(),
                registers: registers.clone(),
                reason,
            })
        }
    }
}

/// One read request on a Modbus TCP connection under the endpoint's timeout.
async fn read_tcp(
    conn: &mut Context,
    endpoint: &Endpoint,
    registers: &Registers,
) -> Result<Answer, ProbeError> {
    let (first, count) = (registers.first, registers.count);
    let request = match registers.kind {
        RegisterKind::Coil => Request::ReadCoils(first, count),
        RegisterKind::Discrete => Request::ReadDiscreteInputs(first, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(first, count),
        RegisterKind::Input => Request::ReadInputRegisters(first, count),
    };
    let transport = |reason: String| ProbeError::Transport {
        device: endpoint.label.clone(),
        registers: registers.clone(),
        reason,
    };
    // `Client::call` rather than `Reader::read_*`: those assert the register count in debug
    // builds, and a short answer must be shown, not crash the probe.
    match tokio::time::timeout(endpoint.timeout.0, conn.call(request)).await {
        Err(_) => Err(ProbeError::Timeout {
            device: endpoint.label.clone(),
            registers: registers.clone(),
            timeout: endpoint.timeout,
        }),
        Ok(Err(err)) => Err(transport(err.to_string())),
        Ok(Ok(Err(code))) => Err(ProbeError::Exception {
            device: endpoint.label.clone(),
            registers: registers.clone(),
            code,
        }),
        Ok(Ok(Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)))) => {
            Ok(Answer::Words(words))
        }
        Ok(Ok(Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)))) => {
            Ok(Answer::Bits(bits))
        }
        Ok(Ok(Ok(other))) => Err(transport(format!("a read was answered with {other:?}"))),
    }
}
