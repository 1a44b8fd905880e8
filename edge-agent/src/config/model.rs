//! The agent's configuration file: the sensor map (site, gateway, devices, tags) and the settings
//! for the buffer, the batches and the upload target. Every field has a doc comment and a named
//! default; unknown keys are errors.

use std::path::PathBuf;

use serde::Deserialize;

use crate::duration::ConfigDuration;

/// The whole agent configuration, one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The plant or site this gateway belongs to, copied into every reading (for example `plant-ost`).
    pub site: String,
    /// This gateway's id: lowercase letters, digits, `-` and `_`. It names the gateway's folder in
    /// the raw zone and its watermark in the Delta table, so it must never change or be reused.
    pub gateway: String,
    /// The durable SQLite buffer every reading passes through.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// When a batch is cut from the buffer.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Where batches go.
    pub upload: UploadConfig,
    /// Modbus devices and the tags read from them: Modbus TCP devices, and slaves on a
    /// `[[modbus_bus]]` (those name their bus with `bus`).
    #[serde(default)]
    pub modbus: Vec<ModbusDevice>,
    /// Modbus RTU buses: a serial port, or a serial gateway reached over TCP, shared by the
    /// `[[modbus]]` devices that name it with `bus`.
    #[serde(default)]
    pub modbus_bus: Vec<ModbusBus>,
    /// MQTT brokers and the subscriptions whose messages become readings.
    #[serde(default)]
    pub mqtt: Vec<MqttBroker>,
    /// Folders where machines drop CSV or JSON-lines log files whose rows become readings.
    #[serde(default)]
    pub file_drop: Vec<FileDrop>,
    /// The `/metrics` and `/health` HTTP endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// An optional live stream of committed readings to Amazon Kinesis, beside the durable
    /// S3 path. Leave the table out for no live stream.
    #[serde(default)]
    pub kinesis: Option<KinesisConfig>,
    /// Where the devices sit in the plant (area, line, machine) and what their tags mean,
    /// published with every tag's unit and data type as the gateway's tag catalog. Leave it
    /// out for a catalog with units and data types only.
    #[serde(default)]
    pub assets: Assets,
}

/// The asset hierarchy of the gateway's devices (`[assets]`). It sits apart from `[[modbus]]`,
/// `[[mqtt]]` and `[[file_drop]]` because it is keyed by device name, which covers the devices of
/// every source alike, including those whose names a subscription or a file builds at run time.
/// `site` is the map's top-level `site`: it is in every reading, so it cannot vary per device.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assets {
    /// The plant area of this gateway's devices (for example `press-shop`), unless a device
    /// names its own.
    pub area: Option<String>,
    /// The production line of this gateway's devices (for example `line1`), unless a device
    /// names its own.
    pub line: Option<String>,
    /// The machine of this gateway's devices, for a gateway that serves one machine; usually
    /// given per device instead.
    pub machine: Option<String>,
    /// Per device, by its name as in the readings (`[assets.devices.press-3]`): its own area,
    /// line and machine, and descriptions of its tags.
    #[serde(default)]
    pub devices: std::collections::BTreeMap<String, DeviceAssets>,
}

/// One device's place in the plant (`[assets.devices.<device>]`); a key left out takes the
/// gateway's value from `[assets]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceAssets {
    /// The plant area of the device.
    pub area: Option<String>,
    /// The production line of the device.
    pub line: Option<String>,
    /// The machine the device belongs to or is (for example `press-3`).
    pub machine: Option<String>,
    /// What each tag of the device means, by tag name (`oil_temp = "Hydraulic oil temperature
    /// at the tank return"`). For Modbus tags the tag's own `description` wins; give a tag a
    /// description in one place only.
    #[serde(default)]
    pub descriptions: std::collections::BTreeMap<String, String>,
}

/// The Kinesis live stream: best effort and low latency, never in the way of the S3 batches.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// Name of an existing Kinesis data stream (1-128 letters, digits, `_`, `-` and `.`).
    pub stream: String,
    /// AWS region of the stream.
    #[serde(default = "KinesisConfig::default_region")]
    pub region: String,
    /// Endpoint URL for a Kinesis-compatible server (a test server, a VPC endpoint). Leave out
    /// for AWS.
    pub endpoint: Option<String>,
    /// How many committed readings may wait for Kinesis. When Kinesis is slow or away the
    /// oldest waiting readings are dropped (and counted) so the live queue never grows and never
    /// holds up the buffer; they still reach S3 in the batches.
    #[serde(default = "KinesisConfig::default_queue_capacity")]
    pub queue_capacity: usize,
    /// How long a reading may wait for more readings to share its PutRecords call. Longer
    /// lingers make fewer, fuller calls; shorter ones make the stream more live.
    #[serde(default = "KinesisConfig::default_max_linger")]
    pub max_linger: ConfigDuration,
    /// How long one PutRecords attempt may take before it is abandoned and retried.
    #[serde(default = "KinesisConfig::default_timeout")]
    pub timeout: ConfigDuration,
}

impl KinesisConfig {
    fn default_region() -> String {
        "us-east-1".to_owned()
    }
    fn default_queue_capacity() -> usize {
        10_000
    }
    fn default_max_linger() -> ConfigDuration {
        ConfigDuration::from_millis(500)
    }
    fn default_timeout() -> ConfigDuration {
        ConfigDuration::from_secs(10)
    }
}

/// The `/metrics` (Prometheus text) and `/health` HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint. On by default; it listens on loopback only unless `listen` says
    /// otherwise.
    #[serde(default = "MetricsConfig::default_enabled")]
    pub enabled: bool,
    /// IP address and port to listen on. The default `127.0.0.1:9464` is reachable from the
    /// gateway itself only; `0.0.0.0:9464` (or one interface's address) exposes it to the
    /// plant network. The endpoint has no authentication: expose it only on a trusted network.
    #[serde(default = "MetricsConfig::default_listen")]
    pub listen: String,
    /// Name of an environment variable holding a token that `/status`, `/status.json` and
    /// `/metrics` then require (`Authorization: Bearer <token>`, or `?token=<token>` in a
    /// browser). Set a token before exposing the endpoint beyond loopback. `/health` stays open
    /// for supervisors and load balancers.
    pub token_env: Option<String>,
    /// Like `token_env`, but the token is the first line of this file (readable by the agent's
    /// user only). Use one of the two.
    pub token_file: Option<PathBuf>,
}

impl MetricsConfig {
    fn default_enabled() -> bool {
        true
    }
    fn default_listen() -> String {
        "127.0.0.1:9464".to_owned()
    }

    /// `listen` as a socket address.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: Self::default_enabled(),
            listen: Self::default_listen(),
            token_env: None,
            token_file: None,
        }
    }
}

/// The SQLite buffer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Path of the SQLite database. A relative path is resolved against the config file's folder.
    #[serde(default = "BufferConfig::default_path")]
    pub path: PathBuf,
    /// `full` (default): a committed reading survives a power cut. `normal`: fewer writes on slow
    /// flash, and `kill -9` still loses nothing, but a power cut can roll back roughly the last
    /// 30 seconds of commits (see the `buffer` module docs for the details).
    #[serde(default)]
    pub durability: Durability,
    /// How often buffered readings are committed to SQLite in one transaction.
    #[serde(default = "BufferConfig::default_commit_interval")]
    pub commit_interval: ConfigDuration,
    /// The most the buffer's readings may take: a size like `"512 MiB"`, `"16MiB"`, `"2 GiB"`
    /// (binary units `KiB`, `MiB`, `GiB`; decimal `kB`, `MB`, `GB`; or `B`), or a whole number
    /// of bytes. At least 1 MiB. A reading takes about 60 to 100 bytes. What happens at the
    /// bound is `on_full`.
    #[serde(default = "BufferConfig::default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Readings that waited in the buffer longer than this (counted from their commit, not
    /// from their timestamp) are dropped even when there is room, and reported as a gap. It
    /// must be longer than `batch.max_age`.
    #[serde(default = "BufferConfig::default_max_age")]
    pub max_age: ConfigDuration,
    /// What the buffer does at `max_bytes`: `drop_oldest` (the default: the oldest readings not
    /// being uploaded make room and are reported as a gap) or `backpressure` (the agent stops
    /// taking readings from the sources until an upload frees room; nothing is dropped for
    /// size, but sources lose or delay readings, see the README).
    #[serde(default)]
    pub on_full: FullPolicy,
}

impl BufferConfig {
    fn default_path() -> PathBuf {
        PathBuf::from("buffer.db")
    }
    fn default_commit_interval() -> ConfigDuration {
        ConfigDuration::from_millis(200)
    }
    fn default_max_bytes() -> ByteSize {
        ByteSize(1 << 30)
    }
    fn default_max_age() -> ConfigDuration {
        ConfigDuration::from_secs(7 * 24 * 3600)
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            path: Self::default_path(),
            durability: Durability::default(),
            commit_interval: Self::default_commit_interval(),
            max_bytes: Self::default_max_bytes(),
            max_age: Self::default_max_age(),
            on_full: FullPolicy::default(),
        }
    }
}

/// What the buffer does when it reaches `buffer.max_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Drop the oldest readings that are not part of the batch being uploaded, count them and
    /// send a gap record with the next batch.
    #[default]
    DropOldest,
    /// Stop taking readings from the sources until the batcher frees room.
    Backpressure,
}

/// A size in bytes, written in a config file as a whole number of bytes or as text with a unit
/// (`"512 MiB"`, `"16MiB"`, `"500 MB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Reads `"<whole number>[ ]<unit>"`; the unit is one of B, kB, KiB, MB, MiB, GB, GiB, TB,
    /// TiB (case does not matter) and may be left out for bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| {
            format!("`{s}` does not start with a whole number; write a size like \"512 MiB\"")
        })?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" => 1 << 10,
            "mb" => 1_000_000,
            "mib" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{}`; use B, kB, KiB, MB, MiB, GB or GiB, for example \"512 MiB\"",
                    unit.trim()
                ));
            }
        };
        n.checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    /// The largest binary unit that shows the size exactly (`512 MiB`, `1536 KiB`, `1000 B`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size like \"512 MiB\" or a whole number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::custom(format!("{v} is negative; write a size like \"512 MiB\""))
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// SQLite's `synchronous` setting for the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit is on disk before the reading counts as accepted.
    #[default]
    Full,
    /// Commits reach disk when the OS writes them back or at WAL checkpoints; a power cut may
    /// roll back the commits of roughly the last 30 seconds.
    Normal,
}

/// Batch cutting.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is cut as soon as this many readings wait in the buffer.
    #[serde(default = "BatchConfig::default_max_rows")]
    pub max_rows: usize,
    /// A batch is cut when the oldest waiting reading has waited this long, however few there are.
    #[serde(default = "BatchConfig::default_max_age")]
    pub max_age: ConfigDuration,
    /// While a backlog drains, also upload copies of the newest readings, at most once per
    /// `max_age`, under `gateway=<id>/fresh/` (batch contract v3), so fresh readings reach the
    /// raw zone within about `max_age` instead of behind the backlog. Every reading still goes up
    /// once in the main lane. `false` keeps one lane (for collectors older than contract v3).
    #[serde(default = "BatchConfig::default_fresh_lane")]
    pub fresh_lane: bool,
}

impl BatchConfig {
    fn default_max_rows() -> usize {
        50_000
    }
    fn default_max_age() -> ConfigDuration {
        ConfigDuration::from_secs(60)
    }
    fn default_fresh_lane() -> bool {
        true
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: Self::default_max_rows(),
            max_age: Self::default_max_age(),
            fresh_lane: Self::default_fresh_lane(),
        }
    }
}

/// The upload target: exactly one of `s3` or `dir`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadConfig {
    /// An S3 bucket (AWS, or any S3-compatible endpoint).
    pub s3: Option<S3Upload>,
    /// A local folder in place of S3 (demos, or a gateway that shares a mounted drive).
    pub dir: Option<DirUpload>,
}

/// S3 upload settings. Credentials come from the AWS default chain (environment, profile,
/// instance or container role).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Upload {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix of the raw zone, usually ending in `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// AWS region.
    #[serde(default = "S3Upload::default_region")]
    pub region: String,
    /// Endpoint URL for S3-compatible stores (MinIO, a test server). Leave out for AWS.
    pub endpoint: Option<String>,
    /// Use path-style URLs (`endpoint/bucket/key`); needed by most S3-compatible stores.
    /// Defaults to true when `endpoint` is set.
    pub force_path_style: Option<bool>,
    /// How long one request (a whole batch, or one part of a multipart upload) may take before
    /// it is abandoned and retried. With `max_bytes_per_second` the time the cap needs for the
    /// request's bytes is added.
    #[serde(default = "S3Upload::default_timeout")]
    pub timeout: ConfigDuration,
    /// Batches larger than this go up as a multipart upload, in parts of `part_size`; smaller
    /// ones in one PUT. At least 5 MiB (S3's smallest part).
    #[serde(default = "S3Upload::default_multipart_threshold")]
    pub multipart_threshold: ByteSize,
    /// The size of each part of a multipart upload (the last one may be smaller): 5 MiB to
    /// 5 GiB. A batch that would need more than 10 000 parts uses larger ones.
    #[serde(default = "S3Upload::default_part_size")]
    pub part_size: ByteSize,
    /// The S3 storage class of the batches: `STANDARD`, `STANDARD_IA`, `ONEZONE_IA`,
    /// `INTELLIGENT_TIERING` or `GLACIER_IR`. Leave out for the bucket's default (`STANDARD`).
    /// Classes that need a restore before a read (`GLACIER`, `DEEP_ARCHIVE`) are refused: the
    /// collector reads every batch soon after it lands.
    pub storage_class: Option<String>,
    /// Server-side encryption of the batches: `"AES256"` (SSE-S3, keys managed by S3) or
    /// `"aws:kms"` (SSE-KMS). Leave out for the bucket's default encryption.
    pub sse: Option<String>,
    /// The KMS key for `sse = "aws:kms"`: a key id, key ARN, alias name (`alias/plant-raw`) or
    /// alias ARN. Leave out for the account's AWS managed key `aws/s3`.
    pub kms_key_id: Option<String>,
    /// An upload bandwidth cap for metered links, in bytes per second (`"256 KiB"`, `"1 MB"`,
    /// or a whole number): request bodies are sent no faster than this on average, over any
    /// stretch longer than a few milliseconds. At least 1 KiB. Leave out for no cap.
    pub max_bytes_per_second: Option<ByteSize>,
}

impl S3Upload {
    fn default_region() -> String {
        "us-east-1".to_owned()
    }
    fn default_timeout() -> ConfigDuration {
        ConfigDuration::from_secs(60)
    }
    fn default_multipart_threshold() -> ByteSize {
        ByteSize(8 << 20)
    }
    fn default_part_size() -> ByteSize {
        ByteSize(8 << 20)
    }
}

/// Local folder upload settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirUpload {
    /// The folder that plays the bucket. A relative path is resolved against the config file's folder.
    pub path: PathBuf,
    /// Key prefix of the raw zone inside the folder, usually ending in `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "raw/".to_owned()
}

/// One Modbus device: a Modbus TCP device (a PLC, a power meter) reached at `host`, or a slave
/// on a `[[modbus_bus]]` named by `bus`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// The device name used in every reading (for example `press-3`).
    pub name: String,
    /// Host name or IP address of a Modbus TCP device. Leave out for a slave on a bus.
    #[serde(default)]
    pub host: String,
    /// TCP port of a Modbus TCP device. Not used for a slave on a bus (the bus has the port).
    #[serde(default = "ModbusDevice::default_port")]
    pub port: u16,
    /// Modbus unit id (slave id); 1 for most PLCs, 255 for some TCP-only devices. On a bus,
    /// the slave address set on the device, 1 to 247, unique on its bus.
    #[serde(default = "ModbusDevice::default_unit_id")]
    pub unit_id: u8,
    /// The `[[modbus_bus]]` this device is a slave on, by its `name`; leave out (and give
    /// `host`) for a Modbus TCP device.
    pub bus: Option<String>,
    /// On a bus: how long the line stays silent before a request to this device, when it
    /// needs more than the bus's `inter_frame_delay` (slow devices that need time between
    /// frames). Leave out to use the bus's.
    pub inter_frame_delay: Option<ConfigDuration>,
    /// How often every tag of this device is read.
    #[serde(default = "ModbusDevice::default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// How long one request may take before the reading is marked bad.
    #[serde(default = "ModbusDevice::default_timeout")]
    pub timeout: ConfigDuration,
    /// How the tags' `address` counts: `zero_based` (the default: the address exactly as sent
    /// on the wire) or `one_based` (address 1 is wire address 0, as many PLC manuals count:
    /// register 40001 is `address = 1`). One map uses one convention per device.
    #[serde(default)]
    pub addressing: Addressing,
    /// Read coalescing: tags of one table are read with one request when at most this many
    /// unused registers (or bits) lie between them, up to the protocol maximum of 125 registers
    /// or 2000 bits per request. The registers in between are read and thrown away. `0` merges
    /// only contiguous tags; lower it if the device refuses reads that cross undefined
    /// registers often (the agent learns such holes by itself, at the cost of a few requests).
    #[serde(default = "ModbusDevice::default_max_gap")]
    pub max_gap: u16,
    /// The most holding or input registers this device answers in one request, 1 to 125 (the
    /// protocol maximum, and the default). Many devices have a smaller limit (often 64 or 100)
    /// and refuse a longer read with exception 3 (illegal data value): the agent learns that
    /// limit by itself, at the cost of a few refused requests, and keeps it across restarts.
    /// Set it for a device that answers a long read with exception 4 or not at all.
    pub max_registers_per_request: Option<u16>,
    /// The most coils or discrete inputs this device answers in one request, 1 to 2000 (the
    /// protocol maximum, and the default); learned like `max_registers_per_request`.
    pub max_bits_per_request: Option<u16>,
    /// The tags (named values) read from this device.
    pub tags: Vec<ModbusTag>,
}

impl ModbusDevice {
    /// The `port` when the sensor map leaves it out: Modbus TCP's registered port.
    pub const DEFAULT_PORT: u16 = 502;
    fn default_port() -> u16 {
        Self::DEFAULT_PORT
    }
    fn default_unit_id() -> u8 {
        1
    }
    fn default_poll_interval() -> ConfigDuration {
        ConfigDuration::from_secs(1)
    }
    fn default_timeout() -> ConfigDuration {
        ConfigDuration::from_secs(1)
    }
    /// The `max_gap` when the sensor map leaves it out.
    pub const DEFAULT_MAX_GAP: u16 = 10;
    fn default_max_gap() -> u16 {
        Self::DEFAULT_MAX_GAP
    }
}

/// A Modbus RTU bus: one serial line (or one serial gateway reached over TCP) and the slaves
/// on it. One task owns the line and sends one request at a time; each slave keeps its own
/// poll interval, timeout and backoff.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusBus {
    /// The bus name that devices give as `bus` (for example `line5-rs485`).
    pub name: String,
    /// `rtu` (a serial port on the gateway: an RS-485 or RS-232 adapter) or `rtu_over_tcp`
    /// (RTU frames with their CRC sent over TCP to a serial device server in transparent mode).
    pub transport: BusTransport,
    /// For `rtu`: the serial port, for example `/dev/ttyUSB0` or `/dev/ttyAMA0`.
    pub serial_port: Option<String>,
    /// For `rtu_over_tcp`: host name or IP address of the serial gateway.
    pub host: Option<String>,
    /// For `rtu_over_tcp`: the gateway's TCP port for this serial line (often 4001 or 502;
    /// see the gateway's settings).
    pub port: Option<u16>,
    /// Bits per second on the serial line. For `rtu_over_tcp` it is the line behind the
    /// gateway and only sets the default `inter_frame_delay`.
    #[serde(default = "ModbusBus::default_baud_rate")]
    pub baud_rate: u32,
    /// `none`, `even` (the default of the Modbus serial line specification) or `odd`.
    #[serde(default)]
    pub parity: Parity,
    /// Data bits per character: 8 (the default; what Modbus RTU uses) or 7.
    #[serde(default = "ModbusBus::default_data_bits")]
    pub data_bits: u8,
    /// Stop bits per character: 1 (the default) or 2 (what the specification asks for
    /// without parity; many devices use 1 all the same).
    #[serde(default = "ModbusBus::default_stop_bits")]
    pub stop_bits: u8,
    /// How long the line stays silent between the end of one frame and the next request.
    /// Leave out for the Modbus specification's 3.5 character times at `baud_rate` (1.75 ms
    /// above 19200 baud). A device may ask for more with its own `inter_frame_delay`.
    pub inter_frame_delay: Option<ConfigDuration>,
}

impl ModbusBus {
    fn default_baud_rate() -> u32 {
        19_200
    }
    fn default_data_bits() -> u8 {
        8
    }
    fn default_stop_bits() -> u8 {
        1
    }

    /// Bits on the line per character: start bit, data bits, parity bit, stop bits.
    pub fn character_bits(&self) -> u32 {
        let parity = u32::from(self.parity != Parity::None);
        1 + u32::from(self.data_bits) + parity + u32::from(self.stop_bits)
    }

    /// The silent interval between frames when the map gives none: 3.5 character times at
    /// the baud rate, and a fixed 1.75 ms above 19200 baud (Modbus over serial line
    /// specification, 2.5.1.1: timers that fine are impractical at high rates).
    pub fn default_inter_frame_delay(&self) -> std::time::Duration {
        const ABOVE_19200: std::time::Duration = std::time::Duration::from_micros(1750);
        if self.baud_rate == 0 || self.baud_rate > 19_200 {
            return ABOVE_19200;
        }
        // 3.5 characters are 7 half characters; in microseconds, rounded up.
        let bits_in_7_halves = u64::from(self.character_bits()) * 7;
        let micros = (bits_in_7_halves * 1_000_000).div_ceil(2 * u64::from(self.baud_rate));
        std::time::Duration::from_micros(micros)
    }

    /// The bus's inter-frame delay: the configured one, else the specification's.
    pub fn inter_frame_delay(&self) -> std::time::Duration {
        self.inter_frame_delay
            .map_or_else(|| self.default_inter_frame_delay(), |delay| delay.0)
    }

    /// The line as a plant engineer writes it: `/dev/ttyUSB0 19200 8E1`, or
    /// `rtu over tcp 10.0.0.9:4001`.
    pub fn describe(&self) -> String {
        match self.transport {
            BusTransport::Rtu => format!(
                "{} {} {}{}{}",
                self.serial_port.as_deref().unwrap_or_default(),
                self.baud_rate,
                self.data_bits,
                self.parity.letter(),
                self.stop_bits
            ),
            BusTransport::RtuOverTcp => format!(
                "rtu over tcp {}:{}",
                self.host.as_deref().unwrap_or_default(),
                self.port.unwrap_or_default()
            ),
        }
    }
}

/// How a bus reaches its serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusTransport {
    /// A serial port on the gateway.
    Rtu,
    /// RTU frames over a TCP connection to a serial device server.
    RtuOverTcp,
}

impl BusTransport {
    /// The name as written in the sensor map.
    pub fn name(self) -> &'static str {
        match self {
            BusTransport::Rtu => "rtu",
            BusTransport::RtuOverTcp => "rtu_over_tcp",
        }
    }
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity: the Modbus serial line specification's default.
    #[default]
    Even,
    /// Odd parity.
    Odd,
}

impl Parity {
    /// The letter of the usual `8E1` notation.
    pub fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

/// How a device's tag addresses map to the addresses sent on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Addressing {
    /// `address` is the wire address: the first register is 0.
    #[default]
    ZeroBased,
    /// `address` counts from 1: the wire address is `address - 1`, so 0 does not exist.
    OneBased,
}

impl Addressing {
    /// The wire address of a configured address, or `None` when it does not exist
    /// (`address = 0` under `one_based`).
    pub fn wire_address(self, address: u16) -> Option<u16> {
        match self {
            Addressing::ZeroBased => Some(address),
            Addressing::OneBased => address.checked_sub(1),
        }
    }

    /// The name as written in the sensor map.
    pub fn name(self) -> &'static str {
        match self {
            Addressing::ZeroBased => "zero_based",
            Addressing::OneBased => "one_based",
        }
    }
}

/// One value read from a device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTag {
    /// Tag name, unique within the device (for example `oil_temp`).
    pub name: String,
    /// Register table: `coil` (function 1, read/write bits), `discrete` (function 2, read-only
    /// bits), `holding` (function 3) or `input` (function 4).
    pub register: RegisterKind,
    /// Register (or bit) address, counted as the device's `addressing` says: with the default
    /// `zero_based` it is the address as sent on the wire (register 40101 in the 4xxxx notation
    /// is address 100), with `one_based` it is one more.
    pub address: u16,
    /// How the register(s) are decoded: `bool` for coils and discrete inputs; `bit`, `u16`,
    /// `i16`, `u32`, `i32`, `f32`, `u64`, `i64`, `f64` or `string` for holding and input
    /// registers. 64-bit integers beyond 2^53 lose their lowest bits in the `f64` value column;
    /// a `string` is sent as text (the batch's `value_text` column), never as a number.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// For `type = "bit"` only: which bit of the register, 0 (least significant) to 15.
    pub bit: Option<u8>,
    /// For `type = "string"` only, and required there: how many registers the string occupies,
    /// 1 to 125. Each register holds two ASCII characters, so `length = 10` reads up to 20.
    pub length: Option<u16>,
    /// Byte and word order of multi-register types, named as in most PLC manuals and Telegraf:
    /// `ABCD` (big-endian, high word first; the default), `CDAB` (word order reversed, low word
    /// first), `BADC` (bytes swapped in each word), `DCBA` (little-endian). For 16-bit types and
    /// `bit`, `BADC` and `DCBA` swap the register's two bytes. A `string` is read register by
    /// register: `ABCD` takes each register's high byte first, `BADC` its low byte first.
    #[serde(default)]
    pub byte_order: ByteOrder,
    /// Multiplier applied to the decoded number: value = raw * scale + offset.
    #[serde(default = "ModbusTag::default_scale")]
    pub scale: f64,
    /// Added after scaling.
    #[serde(default)]
    pub offset: f64,
    /// Engineering unit carried with every reading (for example `degC`, `bar`, `A`, `kWh`).
    pub unit: Option<String>,
    /// What the value is, in words, for the tag catalog (for example `"Hydraulic oil
    /// temperature at the tank return"`). Not sent with the readings.
    pub description: Option<String>,
    /// Engineering range `[min, max]` of the scaled value. A value outside it is clamped to the
    /// nearer limit and its quality becomes `uncertain` (a broken sensor or a wrong scale).
    pub range: Option<[f64; 2]>,
    /// Report by exception: a value is sent only when it differs from the last sent value by
    /// more than this (in engineering units), or when `heartbeat` is due. Leave out to keep
    /// every sample.
    pub deadband: Option<f64>,
    /// Report by exception like `deadband`, but relative: more than this percentage of the last
    /// sent value's magnitude. Use either `deadband` or `deadband_percent`.
    pub deadband_percent: Option<f64>,
    /// With a deadband, send the value at least this often even when it has not changed, so a
    /// quiet tag still proves it is alive. Alone (no deadband), any change is sent at once and
    /// an unchanged value every `heartbeat`.
    pub heartbeat: Option<ConfigDuration>,
}

impl ModbusTag {
    fn default_scale() -> f64 {
        1.0
    }

    /// A tag with every optional key at its default (scale 1, no transform, every sample kept).
    pub fn new(
        name: impl Into<String>,
        register: RegisterKind,
        address: u16,
        data_type: DataType,
    ) -> Self {
        Self {
            name: name.into(),
            register,
            address,
            data_type,
            bit: None,
            length: None,
            byte_order: ByteOrder::default(),
            scale: Self::default_scale(),
            offset: 0.0,
            unit: None,
            description: None,
            range: None,
            deadband: None,
            deadband_percent: None,
            heartbeat: None,
        }
    }

    /// A `type = "string"` tag of `length` registers (two characters each).
    pub fn string(
        name: impl Into<String>,
        register: RegisterKind,
        address: u16,
        length: u16,
    ) -> Self {
        Self {
            length: Some(length),
            ..Self::new(name, register, address, DataType::String)
        }
    }

    /// How many registers (or, for `bool`, bits) the tag occupies: its `length` for a string
    /// (1 while a string has none, which validation refuses), the type's width otherwise.
    pub fn register_count(&self) -> u16 {
        match (self.data_type, self.length) {
            (DataType::String, Some(length)) => length.max(1),
            (data_type, _) => data_type.register_count(),
        }
    }
}

/// Modbus tables the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    /// Coils: read/write bits, function 1.
    Coil,
    /// Discrete inputs: read-only bits, function 2.
    Discrete,
    /// Holding registers: read/write 16-bit words, function 3.
    Holding,
    /// Input registers: read-only 16-bit words, function 4.
    Input,
}

impl RegisterKind {
    /// Whether the table holds single bits (coils, discrete inputs) rather than 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }

    /// The name as written in the sensor map.
    pub fn name(self) -> &'static str {
        match self {
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete",
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
        }
    }
}

/// Value types: numbers (sent in the batch's `value` column) and fixed-length ASCII strings
/// (sent as text in `value_text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One coil or discrete input: 0.0 or 1.0.
    Bool,
    /// One bit of a holding or input register (see [`ModbusTag::bit`]): 0.0 or 1.0.
    Bit,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// Fixed-length ASCII text, two characters per register, `length` registers (see
    /// [`ModbusTag::length`]); trailing NULs and spaces are not part of the text.
    String,
}

impl DataType {
    /// How many 16-bit registers (or, for `bool`, bits) one value occupies. A `string`'s width
    /// is its tag's `length`, which this type does not know: it answers 1 (one register, two
    /// characters), so code that has the tag asks [`ModbusTag::register_count`] instead.
    pub fn register_count(self) -> u16 {
        match self {
            DataType::Bool | DataType::Bit | DataType::U16 | DataType::I16 | DataType::String => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }

    /// The name as written in the sensor map.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::Bit => "bit",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        }
    }

    /// Whether the value is text (`value_text`) rather than a number (`value`).
    pub fn is_text(self) -> bool {
        self == DataType::String
    }
}

/// Byte order of multi-register values; letters name the bytes of the value, A most significant.
/// For 64-bit values the same four names generalise as in Telegraf: `ABCD` big-endian, `CDAB`
/// word order reversed, `BADC` bytes swapped in each word, `DCBA` little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ByteOrder {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}

/// One MQTT broker (MQTT 3.1.1 or 5, over TCP or TLS) and what to subscribe to on it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBroker {
    /// A name for this broker in logs and error messages (for example `line2-broker`).
    pub name: String,
    /// Host name or IP address of the broker. With `[mqtt.tls]` the broker's certificate must
    /// name this host (or `tls.server_name`).
    pub host: String,
    /// TCP port of the broker; 1883 by default, 8883 (`mqtts`) with `[mqtt.tls]`. Read it with
    /// [`MqttBroker::port`].
    pub port: Option<u16>,
    /// The protocol version: `"3.1.1"` (the default) or `"5"`. The delivery guarantees are the
    /// same; with 5 the session's lifetime is `session_expiry`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// The client id the agent connects with. With `clean_session = false` the broker keeps the
    /// session (subscriptions and unacknowledged QoS 1 messages) under this id, so it must be
    /// unique on the broker and stay the same across restarts.
    pub client_id: String,
    /// How often the client pings an idle connection; the broker drops the connection after 1.5
    /// times this without traffic.
    #[serde(default = "MqttBroker::default_keep_alive")]
    pub keep_alive: ConfigDuration,
    /// `false` (the default): a persistent session, so QoS 1 messages published while the agent
    /// was away are delivered when it returns. `true` starts from nothing on every connect.
    /// With `protocol = "5"` this is the CONNECT's clean start flag.
    #[serde(default)]
    pub clean_session: bool,
    /// `protocol = "5"` only: how long the broker keeps the persistent session (subscriptions and
    /// queued QoS 1 messages) after the agent disconnected; messages for a longer absence are
    /// lost. 1s to 4294967295s, default `"168h"` (a week). With 3.1.1 the broker decides
    /// (Mosquitto: `persistent_client_expiration`, never by default).
    pub session_expiry: Option<ConfigDuration>,
    /// User name for the broker's password authentication.
    pub username: Option<String>,
    /// Name of the environment variable holding the password (never written in the map).
    pub password_env: Option<String>,
    /// File holding the password (its first line, without the line end). A relative path is
    /// resolved against the config file's folder.
    pub password_file: Option<PathBuf>,
    /// TLS to the broker: present means the connection is encrypted and the broker's certificate
    /// is checked against `ca_file`.
    pub tls: Option<MqttTls>,
    /// The topic filters to subscribe to and how their messages become readings.
    pub subscriptions: Vec<MqttSubscription>,
    /// How many bad payloads of this broker the buffer keeps in its dead-letter table (time,
    /// subscription, topic, reason and the first 256 bytes each; `edge-agent buffer` shows the
    /// latest). Past this the oldest are dropped, and counted. 1 to 100000.
    #[serde(default = "MqttBroker::default_max_dead_letters")]
    pub max_dead_letters: u32,
    /// The largest message the agent accepts from the broker (a size like "1 MiB"; 1 KiB to
    /// 256 MiB). A larger message ends the connection and, at QoS 1, comes again at every
    /// reconnect, so keep this above the largest payload a device sends (Sparkplug B births
    /// with hundreds of metrics reach tens of kilobytes).
    #[serde(default = "MqttBroker::default_max_packet_size")]
    pub max_packet_size: ByteSize,
}

impl MqttBroker {
    /// The MQTT port without TLS.
    pub const PLAIN_PORT: u16 = 1883;
    /// The MQTT over TLS port (`mqtts`).
    pub const TLS_PORT: u16 = 8883;
    /// How long an MQTT 5 broker keeps the session by default: a week.
    pub const DEFAULT_SESSION_EXPIRY: ConfigDuration = ConfigDuration::from_secs(7 * 24 * 3600);

    /// The port to connect to: the configured one, else 1883, or 8883 with TLS.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls.is_some() {
            Self::TLS_PORT
        } else {
            Self::PLAIN_PORT
        })
    }

    /// How long an MQTT 5 broker keeps the session after a disconnect (`session_expiry`, or its
    /// default); zero with `clean_session = true`.
    pub fn session_expiry(&self) -> ConfigDuration {
        if self.clean_session {
            ConfigDuration::from_secs(0)
        } else {
            self.session_expiry.unwrap_or(Self::DEFAULT_SESSION_EXPIRY)
        }
    }

    /// Resolves the relative paths of files (password, TLS) against `base`, the config file's
    /// folder.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let tls = self.tls.as_mut();
        let files = self
            .password_file
            .iter_mut()
            .chain(tls.into_iter().flat_map(|tls| {
                std::iter::once(&mut tls.ca_file)
                    .chain(tls.client_cert_file.as_mut())
                    .chain(tls.client_key_file.as_mut())
            }));
        for file in files {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
    }

    fn default_max_dead_letters() -> u32 {
        crate::buffer::dead_letter::DEFAULT_MAX_DEAD_LETTERS
    }
    /// The default `max_packet_size`: 1 MiB.
    pub const DEFAULT_MAX_PACKET_SIZE: u64 = 1 << 20;
    fn default_max_packet_size() -> ByteSize {
        ByteSize(Self::DEFAULT_MAX_PACKET_SIZE)
    }
    /// `max_packet_size` in bytes, for the MQTT client (the check keeps it within MQTT's limit).
    pub fn max_packet_bytes(&self) -> u32 {
        u32::try_from(self.max_packet_size.0).unwrap_or(u32::MAX)
    }
    fn default_keep_alive() -> ConfigDuration {
        ConfigDuration::from_secs(30)
    }
}

/// The MQTT protocol version spoken to a broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

impl std::fmt::Display for MqttProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        })
    }
}

/// TLS to an MQTT broker (`[mqtt.tls]`). Files are PEM; relative paths are resolved against the
/// config file's folder. The private key is read by the agent only, never logged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// The CA certificate(s) the broker's certificate must chain to (PEM, one or more
    /// certificates). For a broker with a public certificate, the system's bundle
    /// (`/etc/ssl/certs/ca-certificates.crt` on Debian).
    pub ca_file: PathBuf,
    /// The agent's certificate (PEM, the chain from the agent's certificate up) for a broker
    /// that asks for client certificates; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// The private key of `client_cert_file` (PEM: PKCS#8 `PRIVATE KEY`, RSA `RSA PRIVATE KEY`
    /// or EC `EC PRIVATE KEY`, not encrypted); readable by the agent's user only.
    pub client_key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not `host`: for a broker reached
    /// by IP address whose certificate names its DNS name.
    pub server_name: Option<String>,
}

/// One topic filter and the mapping of its messages to readings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSubscription {
    /// Topic filter, with `+` for one topic level and a trailing `#` for any number of levels
    /// (for example `plant/+/+/telemetry`).
    pub topic: String,
    /// Quality of service of the subscription: 1 (the default: the broker keeps a message until
    /// the agent acknowledges it, which happens only after it is in the buffer) or 0 (at most
    /// once: lost when the agent is away or stops before committing it).
    #[serde(default = "MqttSubscription::default_qos")]
    pub qos: u8,
    /// What the payload is: `json` (the default), `number` (the payload is one number in
    /// text, like `21.5`) or `sparkplug_b` (Sparkplug B edge nodes; device, tag, value, time
    /// and unit come from the messages, so the mapping keys below are left out).
    #[serde(default)]
    pub payload: PayloadFormat,
    /// The device of the readings: literal text with `{N}` standing for level N of the message's
    /// topic, counted from 0 (`{1}` is `press-3` in `plant/press-3/oil_temp/telemetry`).
    /// Required for `json` and `number`; not used with `sparkplug_b` (the edge node, or
    /// `<edge node>/<device>`).
    #[serde(default)]
    pub device: String,
    /// The tag of the reading, with `{N}` like `device`. For one value per message; leave out
    /// when `fields` lists several.
    pub tag: Option<String>,
    /// JSON pointer (RFC 6901) to the value in a `json` payload, for example `/value` or
    /// `/data/temp`; `""` is the whole payload. For one value per message.
    pub value: Option<String>,
    /// Several values in one JSON message, one reading each.
    #[serde(default)]
    pub fields: Vec<MqttField>,
    /// JSON pointer to the reading's time in a `json` payload. Leave out to use the time the
    /// message arrived at the agent.
    pub timestamp: Option<String>,
    /// How `timestamp` is written: `epoch_s`, `epoch_ms`, `epoch_us` (a number, or a number in
    /// a string) or `rfc3339` (`2024-05-01T12:00:00.250Z`). Required with `timestamp`.
    pub timestamp_format: Option<TimestampFormat>,
    /// Engineering unit carried with every reading (a field's own `unit` wins).
    pub unit: Option<String>,
    /// Multiplier applied to the number in the payload: value = raw * scale + offset (a
    /// field's own `scale` wins).
    #[serde(default = "MqttSubscription::default_scale")]
    pub scale: f64,
    /// Added after scaling (a field's own `offset` wins).
    #[serde(default)]
    pub offset: f64,
    /// What the value is: `number` (the default) or `string`, as for Modbus tags. A `string`
    /// value is recorded as text (the batch's `value_text` column) as the payload has it; with
    /// `number` a text that is not a number is a bad payload (`not_numeric`). Applies to `tag`
    /// and `value`; each of `fields` has its own `type`.
    #[serde(rename = "type", default)]
    pub value_type: ValueType,
    /// `sparkplug_b` only: when data comes from an edge node (or a device of it) whose birth the
    /// agent has not seen, as after an agent restart, ask the node for its births again: an
    /// `NCMD` with `Node Control/Rebirth` = true, at most once per edge node every 30 s. `true`
    /// by default; `false` when another host application (Ignition) alone may send commands.
    pub rebirth: Option<bool>,
}

/// Whether a value from a payload or a dropped file is a number or text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// A number (JSON `true`/`false` count as 1 and 0, text holding a number is read as one).
    #[default]
    Number,
    /// Text, recorded in the batch's `value_text` column, never as a number; scale and offset
    /// do not apply.
    String,
}

impl MqttSubscription {
    fn default_qos() -> u8 {
        1
    }
    fn default_scale() -> f64 {
        1.0
    }
}

/// One of several values in a JSON message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttField {
    /// The tag of this value's readings, with `{N}` for topic levels as in `device`.
    pub tag: String,
    /// JSON pointer (RFC 6901) to the value, for example `/temp`.
    pub value: String,
    /// Engineering unit; defaults to the subscription's `unit`.
    pub unit: Option<String>,
    /// Multiplier; defaults to the subscription's `scale`.
    pub scale: Option<f64>,
    /// Added after scaling; defaults to the subscription's `offset`.
    pub offset: Option<f64>,
    /// `number` or `string`; defaults to the subscription's `type`.
    #[serde(rename = "type")]
    pub value_type: Option<ValueType>,
}

/// How an MQTT payload is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// A JSON document; values and the timestamp are found by JSON pointer.
    #[default]
    Json,
    /// The whole payload is one number in text (`21.5`, `-3`, `1e3`); the timestamp is the
    /// arrival time.
    Number,
    /// Sparkplug B (protobuf) from edge nodes: births give each metric's name, alias and
    /// datatype, data messages the values, deaths mark the tags stale
    /// ([`crate::sources::mqtt::sparkplug`]).
    #[serde(rename = "sparkplug_b")]
    SparkplugB,
}

/// How a timestamp in a payload is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Seconds since the Unix epoch, fractions allowed.
    EpochS,
    /// Milliseconds since the Unix epoch.
    EpochMs,
    /// Microseconds since the Unix epoch.
    EpochUs,
    /// RFC 3339 text with an offset, for example `2024-05-01T12:00:00.250Z`.
    Rfc3339,
}

/// A folder where a machine (a test stand, a CNC controller) drops CSV or JSON-lines files.
/// Each settled file is read once, its readings are committed to the buffer, then it moves to
/// `done/` (or `failed/`, with a reason file) inside the folder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrop {
    /// A name for this source in logs and error messages (for example `test-stand-2`).
    pub name: String,
    /// The folder to watch. A relative path is resolved against the config file's folder.
    pub folder: PathBuf,
    /// `csv` (a header line names the columns) or `jsonl` (one JSON object per line).
    pub format: FileFormat,
    /// The field separator of `csv` files, one character: `,` (the default), `;` or a tab.
    #[serde(default = "FileDrop::default_delimiter")]
    pub delimiter: char,
    /// A pattern the file name must match, where `*` is any text and `{name}` captures a
    /// non-empty part for `{file.name}` in `device` and `tag` (for example
    /// `"{station}_*.csv"`). Leave out to take every file. A file that does not match goes to
    /// `failed/`.
    pub file_name: Option<String>,
    /// A file is read only once its size and modification time have not changed for this long,
    /// so a file still being written is left alone.
    #[serde(default = "FileDrop::default_settle")]
    pub settle: ConfigDuration,
    /// How often the folder is listed.
    #[serde(default = "FileDrop::default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// The column (CSV header name, or top-level JSON key) holding each row's time.
    pub timestamp: String,
    /// How `timestamp` is written: `rfc3339`, `epoch_s`, `epoch_ms`, `epoch_us`, or a pattern
    /// with `%Y %m %d %H %M %S %f` read as UTC (for example `"%d.%m.%Y %H:%M:%S"`).
    pub timestamp_format: String,
    /// The device of the readings: literal text, `{column}` for a column's value in the row,
    /// `{file.name}` for a part captured by `file_name`.
    pub device: String,
    /// The value columns; each gives one reading per row.
    pub values: Vec<FileValue>,
}

impl FileDrop {
    fn default_delimiter() -> char {
        ','
    }
    fn default_settle() -> ConfigDuration {
        ConfigDuration::from_secs(2)
    }
    fn default_poll_interval() -> ConfigDuration {
        ConfigDuration::from_secs(1)
    }
}

/// One value column of a dropped file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileValue {
    /// The column (CSV header name, or top-level JSON key) holding the number. An empty cell
    /// (or a JSON `null` or missing key) gives no reading for that row.
    pub column: String,
    /// The tag of the readings, with `{column}` and `{file.name}` as in `device`; defaults to
    /// the column's name.
    pub tag: Option<String>,
    /// Engineering unit carried with every reading.
    pub unit: Option<String>,
    /// Multiplier applied to the number: value = raw * scale + offset.
    #[serde(default = "FileValue::default_scale")]
    pub scale: f64,
    /// Added after scaling.
    #[serde(default)]
    pub offset: f64,
    /// `number` (the default) or `string`: a `string` column is recorded as text (the batch's
    /// `value_text` column), as the file has it; with `number` a cell that is not a number
    /// fails the row.
    #[serde(rename = "type", default)]
    pub value_type: ValueType,
}

impl FileValue {
    fn default_scale() -> f64 {
        1.0
    }
}

/// The layout of a dropped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Comma-separated values with a header line; fields may be quoted with `"`.
    Csv,
    /// One JSON object per line; blank lines are skipped.
    Jsonl,
}
