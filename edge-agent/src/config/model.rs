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
    /// Modbus TCP devices and the tags read from them.
    #[serde(default)]
    pub modbus: Vec<ModbusDevice>,
}

/// The SQLite buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Path of the SQLite database. A relative path is resolved against the config file's folder.
    #[serde(default = "BufferConfig::default_path")]
    pub path: PathBuf,
    /// `full` (default): a committed reading survives a power cut. `normal`: faster on slow
    /// flash, but a power cut can lose the readings of the last few hundred milliseconds.
    #[serde(default)]
    pub durability: Durability,
    /// How often buffered readings are committed to SQLite in one transaction.
    #[serde(default = "BufferConfig::default_commit_interval")]
    pub commit_interval: ConfigDuration,
}

impl BufferConfig {
    fn default_path() -> PathBuf {
        PathBuf::from("buffer.db")
    }
    fn default_commit_interval() -> ConfigDuration {
        ConfigDuration::from_millis(200)
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            path: Self::default_path(),
            durability: Durability::default(),
            commit_interval: Self::default_commit_interval(),
        }
    }
}

/// SQLite's `synchronous` setting for the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit is on disk before the reading counts as accepted.
    #[default]
    Full,
    /// Commits reach disk at WAL checkpoints; a power cut may roll back the last commits.
    Normal,
}

/// Batch cutting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is cut as soon as this many readings wait in the buffer.
    #[serde(default = "BatchConfig::default_max_rows")]
    pub max_rows: usize,
    /// A batch is cut when the oldest waiting reading has waited this long, however few there are.
    #[serde(default = "BatchConfig::default_max_age")]
    pub max_age: ConfigDuration,
}

impl BatchConfig {
    fn default_max_rows() -> usize {
        50_000
    }
    fn default_max_age() -> ConfigDuration {
        ConfigDuration::from_secs(60)
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: Self::default_max_rows(),
            max_age: Self::default_max_age(),
        }
    }
}

/// The upload target: exactly one of `s3` or `dir`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadConfig {
    /// An S3 bucket (AWS, or any S3-compatible endpoint).
    pub s3: Option<S3Upload>,
    /// A local folder in place of S3 (demos, or a gateway that shares a mounted drive).
    pub dir: Option<DirUpload>,
}

/// S3 upload settings. Credentials come from the AWS default chain (environment, profile,
/// instance or container role).
#[derive(Debug, Clone, Deserialize)]
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
    /// How long one upload attempt may take before it is abandoned and retried.
    #[serde(default = "S3Upload::default_timeout")]
    pub timeout: ConfigDuration,
}

impl S3Upload {
    fn default_region() -> String {
        "us-east-1".to_owned()
    }
    fn default_timeout() -> ConfigDuration {
        ConfigDuration::from_secs(60)
    }
}

/// Local folder upload settings.
#[derive(Debug, Clone, Deserialize)]
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

/// One Modbus TCP device (a PLC, a power meter, a gateway to a serial bus).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// The device name used in every reading (for example `press-3`).
    pub name: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    #[serde(default = "ModbusDevice::default_port")]
    pub port: u16,
    /// Modbus unit id (slave id); 1 for most PLCs, 255 for some TCP-only devices.
    #[serde(default = "ModbusDevice::default_unit_id")]
    pub unit_id: u8,
    /// How often every tag of this device is read.
    #[serde(default = "ModbusDevice::default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// How long one request may take before the reading is marked bad.
    #[serde(default = "ModbusDevice::default_timeout")]
    pub timeout: ConfigDuration,
    /// The tags (named values) read from this device.
    pub tags: Vec<ModbusTag>,
}

impl ModbusDevice {
    fn default_port() -> u16 {
        502
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
}

/// One value read from a device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTag {
    /// Tag name, unique within the device (for example `oil_temp`).
    pub name: String,
    /// Register table: `holding` (function 3) or `input` (function 4).
    pub register: RegisterKind,
    /// Zero-based register address as sent on the wire (register 40101 in the 4xxxx notation is address 100).
    pub address: u16,
    /// How the register(s) are decoded.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Byte and word order of 32-bit types, named as in most PLC manuals: `ABCD` (big-endian,
    /// high word first; the default), `CDAB` (low word first), `BADC`, `DCBA`.
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
}

impl ModbusTag {
    fn default_scale() -> f64 {
        1.0
    }
}

/// Modbus register tables the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterKind {
    Holding,
    Input,
}

/// Register data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl DataType {
    /// How many 16-bit registers one value occupies.
    pub fn register_count(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
        }
    }
}

/// Byte order of multi-register values; letters name the bytes of the value, A most significant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ByteOrder {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}
