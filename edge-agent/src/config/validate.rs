//! Semantic checks of a parsed configuration.
//!
//! Parsing (types, unknown keys, missing keys) is serde's job; this module checks what a type
//! cannot express: ranges, uniqueness, registers that collide. It collects every problem instead
//! of stopping at the first, so a plant engineer fixes a sensor map in one round. Each problem
//! names the key path (`modbus[1].tags[3].name`), says what is wrong and how to fix it;
//! [`super::load_file`] adds the file name and the line.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::ConfigDuration;
use super::model::{
    Addressing, AgentConfig, BusTransport, ByteOrder, DataType, ModbusBus, ModbusDevice, ModbusTag,
    RegisterKind, UploadConfig,
};
use crate::contract;
use crate::sources::modbus::plan::{MAX_BITS, MAX_REGISTERS};

/// The shortest poll interval accepted: faster polling overloads most PLCs' communication
/// processors and fills the buffer faster than any uplink drains it.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The shortest batch age accepted: shorter ages make one tiny object per poll.
pub const MIN_BATCH_AGE: Duration = Duration::from_secs(1);

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the problem is, as a key path: `modbus[1].tags[3].name`.
    pub key: String,
    /// The 1-based line of that key (or of the nearest enclosing table), when known.
    pub line: Option<usize>,
    /// What is wrong and how to fix it, as `<problem>; <fix>`.
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Checks a parsed configuration and returns every problem found, in the order the keys are
/// defined in [`AgentConfig`]; an empty list means the configuration is usable.
pub fn validate(config: &AgentConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    if config.site.trim().is_empty() {
        problems.push(Problem::new(
            "site",
            "the site name is empty; name the plant or site this gateway belongs to, for example site = \"plant-ost\"",
        ));
    }
    if contract::check_gateway_id(&config.gateway).is_err() {
        problems.push(Problem::new(
            "gateway",
            format!(
                "gateway id `{}` is not allowed; use 1-64 characters of lowercase letters, digits, `-` and `_`, starting with a letter or digit",
                config.gateway
            ),
        ));
    }
    check_interval(
        &mut problems,
        "buffer.commit_interval",
        config.buffer.commit_interval,
        Duration::from_millis(1),
        "\"200ms\"",
    );
    if config.batch.max_rows == 0 {
        problems.push(Problem::new(
            "batch.max_rows",
            "a batch of at most 0 rows can never be cut; use at least 1, for example 50000",
        ));
    }
    check_interval(
        &mut problems,
        "batch.max_age",
        config.batch.max_age,
        MIN_BATCH_AGE,
        "\"60s\"",
    );
    check_buffer_bounds(&mut problems, config);
    check_upload(&mut problems, &config.upload);

    let mut first_use: HashMap<&str, usize> = HashMap::new();
    for (i, device) in config.modbus.iter().enumerate() {
        let key = format!("modbus[{i}]");
        if let Some(first) = first_use.get(device.name.as_str()) {
            problems.push(Problem::new(
                format!("{key}.name"),
                format!(
                    "duplicate device name `{}` (first used by modbus[{first}]); device names must be unique within a gateway",
                    device.name
                ),
            ));
        } else {
            first_use.insert(&device.name, i);
        }
        check_device(&mut problems, &key, device);
    }
    check_buses(&mut problems, &config.modbus_bus, &config.modbus);
    check_metrics(&mut problems, &config.metrics);
    if let Some(kinesis) = &config.kinesis {
        check_kinesis(&mut problems, kinesis);
    }
    problems.extend(crate::sources::mqtt::check::check_brokers(&config.mqtt));
    problems.extend(crate::sources::file_drop::check::check_file_drops(
        &config.file_drop,
    ));
    check_assets(&mut problems, config);
    problems
}

/// `[assets]` and the tags' descriptions: no empty names, no device that no source can
/// produce, one description per tag.
fn check_assets(problems: &mut Vec<Problem>, config: &AgentConfig) {
    let empty = |value: &Option<String>| value.as_deref().is_some_and(|v| v.trim().is_empty());
    let assets = &config.assets;
    for (name, value) in [
        ("area", &assets.area),
        ("line", &assets.line),
        ("machine", &assets.machine),
    ] {
        if empty(value) {
            problems.push(Problem::new(
                format!("assets.{name}"),
                format!("the {name} is empty; name it, for example {name} = \"{}\", or leave the key out", example_asset(name)),
            ));
        }
    }
    // Subscriptions and dropped files may build device names from topics and file contents,
    // so a device named only in `[assets]` may still turn up at run time.
    let devices_built_at_run_time = config
        .mqtt
        .iter()
        .any(|broker| !broker.subscriptions.is_empty())
        || config
            .file_drop
            .iter()
            .any(|drop| drop.device.contains('{'));
    let literal_devices: std::collections::BTreeSet<&str> = config
        .modbus
        .iter()
        .map(|d| d.name.as_str())
        .chain(config.file_drop.iter().map(|d| d.device.as_str()))
        .collect();
    for (device, own) in &assets.devices {
        let key = format!("assets.devices.{device}");
        if !devices_built_at_run_time && !literal_devices.contains(device.as_str()) {
            problems.push(Problem::new(
                key.clone(),
                format!(
                    "no source of this map has a device named `{device}`; use the device's name as in [[modbus]] `name` (known: {}), or remove the table",
                    literal_devices.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for (name, value) in [
            ("area", &own.area),
            ("line", &own.line),
            ("machine", &own.machine),
        ] {
            if empty(value) {
                problems.push(Problem::new(
                    format!("{key}.{name}"),
                    format!("the {name} is empty; name it, for example {name} = \"{}\", or leave the key out to use [assets] {name}", example_asset(name)),
                ));
            }
        }
        let modbus = config.modbus.iter().find(|d| &d.name == device);
        for (tag, text) in &own.descriptions {
            let tag_key = format!("{key}.descriptions.{tag}");
            if text.trim().is_empty() {
                problems.push(Problem::new(
                    tag_key.clone(),
                    "the description is empty; say what the value is, for example \"Hydraulic oil temperature\", or remove the key",
                ));
            }
            let Some(modbus) = modbus else { continue };
            match modbus.tags.iter().position(|t| &t.name == tag) {
                None => problems.push(Problem::new(
                    tag_key,
                    format!("device `{device}` has no tag `{tag}`; use a tag name from its [[modbus.tags]], or remove the key"),
                )),
                Some(j) if modbus.tags[j].description.is_some() => problems.push(Problem::new(
                    tag_key,
                    format!("tag `{tag}` of `{device}` also has a `description` in its [[modbus.tags]]; keep one of the two"),
                )),
                Some(_) => {}
            }
        }
    }
    for (i, device) in config.modbus.iter().enumerate() {
        for (j, tag) in device.tags.iter().enumerate() {
            if empty(&tag.description) {
                problems.push(Problem::new(
                    format!("modbus[{i}].tags[{j}].description"),
                    "the description is empty; say what the value is, for example description = \"Hydraulic oil temperature\", or leave the key out",
                ));
            }
        }
    }
}

fn example_asset(name: &str) -> &'static str {
    match name {
        "area" => "press-shop",
        "line" => "line1",
        _ => "press-3",
    }
}

fn check_metrics(problems: &mut Vec<Problem>, metrics: &super::model::MetricsConfig) {
    match metrics.listen_addr() {
        Err(_) => problems.push(Problem::new(
            "metrics.listen",
            format!(
                "`{}` is not an IP address and port; write it like \"127.0.0.1:9464\" (this gateway only) or \"0.0.0.0:9464\" (every interface)",
                metrics.listen
            ),
        )),
        Ok(addr) if addr.port() == 0 => problems.push(Problem::new(
            "metrics.listen",
            format!(
                "port 0 would pick a different port at every start, so nothing could scrape it; use a fixed port, for example \"{}:9464\"",
                addr.ip()
            ),
        )),
        Ok(_) => {}
    }
    if metrics.token_env.is_some() && metrics.token_file.is_some() {
        problems.push(Problem::new(
            "metrics.token_file",
            "both token_env and token_file are set; keep one of them".to_owned(),
        ));
    }
    if metrics
        .token_env
        .as_deref()
        .is_some_and(|name| name.is_empty() || name.contains('=') || name.contains('\0'))
    {
        problems.push(Problem::new(
            "metrics.token_env",
            "is not an environment variable name; write the variable's name, for example token_env = \"PLANTLINE_STATUS_TOKEN\"".to_owned(),
        ));
    }
}

/// Kinesis allows at most this many readings to wait: beyond it a slow stream costs the gateway
/// more memory than a live view is worth (the readings still reach S3).
const MAX_KINESIS_QUEUE: usize = 1_000_000;

fn check_kinesis(problems: &mut Vec<Problem>, kinesis: &super::model::KinesisConfig) {
    let name_ok = (1..=128).contains(&kinesis.stream.len())
        && kinesis
            .stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok {
        problems.push(Problem::new(
            "kinesis.stream",
            format!(
                "`{}` is not a Kinesis stream name; use 1-128 letters, digits, `_`, `-` and `.`, for example stream = \"plantline-live\"",
                kinesis.stream
            ),
        ));
    }
    if kinesis.region.trim().is_empty() {
        problems.push(Problem::new(
            "kinesis.region",
            "the region is empty; name the stream's AWS region, for example region = \"eu-central-1\"",
        ));
    }
    if let Some(endpoint) = &kinesis.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        problems.push(Problem::new(
            "kinesis.endpoint",
            format!(
                "`{endpoint}` is not an http or https URL; write it like \"https://kinesis.example.com\", or leave it out for AWS"
            ),
        ));
    }
    if !(1..=MAX_KINESIS_QUEUE).contains(&kinesis.queue_capacity) {
        problems.push(Problem::new(
            "kinesis.queue_capacity",
            format!(
                "{} readings is outside 1..={MAX_KINESIS_QUEUE}; use for example 10000 (about a minute of 150 readings/s)",
                kinesis.queue_capacity
            ),
        ));
    }
    if kinesis.max_linger.0 > Duration::from_mins(1) {
        problems.push(Problem::new(
            "kinesis.max_linger",
            format!(
                "{} is longer than the maximum of 1m, which is no longer a live stream; use for example \"500ms\"",
                kinesis.max_linger
            ),
        ));
    }
    check_interval(
        problems,
        "kinesis.timeout",
        kinesis.timeout,
        Duration::from_secs(1),
        "\"10s\"",
    );
}

/// The smallest `buffer.max_bytes` accepted: below it the buffer's own tables and one small
/// batch already fill it.
const MIN_BUFFER_BYTES: u64 = 1 << 20;

/// Room per reading of a batch that `buffer.max_bytes` must leave: a reading takes 60 to 100
/// bytes in SQLite, and the batch being uploaded should fill at most about half the buffer so
/// new readings still have room while it goes out.
const BYTES_PER_BATCH_ROW: u64 = 200;

fn check_buffer_bounds(problems: &mut Vec<Problem>, config: &AgentConfig) {
    let max_bytes = config.buffer.max_bytes;
    if max_bytes.0 < MIN_BUFFER_BYTES {
        problems.push(Problem::new(
            "buffer.max_bytes",
            format!(
                "{max_bytes} is below the minimum of 1 MiB; use at least that, for example max_bytes = \"16 MiB\""
            ),
        ));
    } else {
        let rows = u64::try_from(config.batch.max_rows).unwrap_or(u64::MAX);
        let needed = rows.saturating_mul(BYTES_PER_BATCH_ROW);
        if max_bytes.0 < needed {
            problems.push(Problem::new(
                "buffer.max_bytes",
                format!(
                    "{max_bytes} leaves too little room for a batch of batch.max_rows = {rows} readings (about {} with room to keep recording while it uploads); raise max_bytes to at least that or lower batch.max_rows",
                    super::ByteSize(needed.div_ceil(1 << 20) << 20)
                ),
            ));
        }
    }
    if config.buffer.max_age <= config.batch.max_age {
        problems.push(Problem::new(
            "buffer.max_age",
            format!(
                "{} is not longer than batch.max_age ({}), so readings would be dropped before their batch is due; use a longer age, for example max_age = \"168h\"",
                config.buffer.max_age, config.batch.max_age
            ),
        ));
    }
}

fn check_interval(
    problems: &mut Vec<Problem>,
    key: &str,
    value: ConfigDuration,
    min: Duration,
    example: &str,
) {
    if value.0 < min {
        problems.push(Problem::new(
            key,
            format!(
                "{value} is shorter than the minimum of {}; use at least that, for example {example}",
                ConfigDuration(min)
            ),
        ));
    }
}

fn check_upload(problems: &mut Vec<Problem>, upload: &UploadConfig) {
    match (&upload.s3, &upload.dir) {
        (None, None) => problems.push(Problem::new(
            "upload",
            "no upload target; add an [upload.s3] table or an [upload.dir] table",
        )),
        (Some(_), Some(_)) => problems.push(Problem::new(
            "upload",
            "both [upload.s3] and [upload.dir] are set; keep exactly one of them",
        )),
        _ => {}
    }
    if let Some(s3) = &upload.s3 {
        if s3.bucket.is_empty() {
            problems.push(Problem::new(
                "upload.s3.bucket",
                "the bucket name is empty; name the S3 bucket that holds the raw zone",
            ));
        } else if !is_bucket_name(&s3.bucket) {
            problems.push(Problem::new(
                "upload.s3.bucket",
                format!(
                    "`{}` is not a valid S3 bucket name; use 3-63 lowercase letters, digits, `.` and `-`, starting and ending with a letter or digit",
                    s3.bucket
                ),
            ));
        }
        check_prefix(problems, "upload.s3.prefix", &s3.prefix);
        if let Some(endpoint) = &s3.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push(Problem::new(
                "upload.s3.endpoint",
                format!(
                    "`{endpoint}` is not an http or https URL; write it like \"https://s3.example.com:9000\", or leave it out for AWS"
                ),
            ));
        }
        check_interval(
            problems,
            "upload.s3.timeout",
            s3.timeout,
            Duration::from_secs(1),
            "\"60s\"",
        );
        check_s3_transfer(problems, s3);
    }
    if let Some(dir) = &upload.dir {
        if dir.path.as_os_str().is_empty() {
            problems.push(Problem::new(
                "upload.dir.path",
                "the folder path is empty; name the folder that plays the bucket, for example path = \"outbox\"",
            ));
        }
        check_prefix(problems, "upload.dir.prefix", &dir.prefix);
    }
}

/// S3's smallest part of a multipart upload (every part but the last).
const MIN_PART_BYTES: u64 = 5 << 20;
/// S3's largest part.
const MAX_PART_BYTES: u64 = 5 << 30;
/// The slowest bandwidth cap accepted: below it one default batch takes hours.
const MIN_BYTES_PER_SECOND: u64 = 1 << 10;

/// Storage classes whose objects can be read at once (the collector reads every batch soon
/// after it lands).
pub(crate) const STORAGE_CLASSES: [&str; 5] = [
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
];

/// The `sse` values: SSE-S3 and SSE-KMS.
pub(crate) const SSE_MODES: [&str; 2] = ["AES256", "aws:kms"];

fn check_s3_transfer(problems: &mut Vec<Problem>, s3: &super::model::S3Upload) {
    if s3.multipart_threshold.0 < MIN_PART_BYTES {
        problems.push(Problem::new(
            "upload.s3.multipart_threshold",
            format!(
                "{} is below S3's smallest part of 5 MiB; use at least that, for example multipart_threshold = \"8 MiB\"",
                s3.multipart_threshold
            ),
        ));
    }
    if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&s3.part_size.0) {
        problems.push(Problem::new(
            "upload.s3.part_size",
            format!(
                "{} is outside the part sizes S3 accepts (5 MiB to 5 GiB); use a size in that range, for example part_size = \"8 MiB\"",
                s3.part_size
            ),
        ));
    }
    if let Some(class) = &s3.storage_class {
        if matches!(class.as_str(), "GLACIER" | "DEEP_ARCHIVE") {
            problems.push(Problem::new(
                "upload.s3.storage_class",
                format!(
                    "`{class}` objects cannot be read before they are restored, so the collector could not pick up the batches; use \"STANDARD\" (or \"GLACIER_IR\"), and archive older batches with a lifecycle rule"
                ),
            ));
        } else if !STORAGE_CLASSES.contains(&class.as_str()) {
            problems.push(Problem::new(
                "upload.s3.storage_class",
                format!(
                    "`{class}` is not a storage class the batches can use; use one of {} (in capitals), or leave the key out for the bucket's default",
                    STORAGE_CLASSES.join(", ")
                ),
            ));
        }
    }
    let kms = match s3.sse.as_deref() {
        None => false,
        Some(mode) if SSE_MODES.contains(&mode) => mode == "aws:kms",
        Some(mode) => {
            problems.push(Problem::new(
                "upload.s3.sse",
                format!(
                    "`{mode}` is not a server-side encryption mode; use \"AES256\" (SSE-S3) or \"aws:kms\" (SSE-KMS), or leave the key out for the bucket's default encryption"
                ),
            ));
            // Checking kms_key_id against a mode that does not exist would only add noise.
            true
        }
    };
    match s3.kms_key_id.as_deref() {
        Some(id) if id.trim().is_empty() => problems.push(Problem::new(
            "upload.s3.kms_key_id",
            "the KMS key is empty; name the key (id, ARN or alias/<name>), or leave the key out for the AWS managed key aws/s3",
        )),
        Some(_) if !kms => problems.push(Problem::new(
            "upload.s3.kms_key_id",
            "a KMS key is only used with SSE-KMS; add sse = \"aws:kms\", or remove kms_key_id",
        )),
        _ => {}
    }
    if let Some(rate) = s3.max_bytes_per_second
        && rate.0 < MIN_BYTES_PER_SECOND
    {
        problems.push(Problem::new(
            "upload.s3.max_bytes_per_second",
            format!(
                "{rate} per second is below the minimum of 1 KiB, at which one batch would take hours; use at least that, for example max_bytes_per_second = \"256 KiB\", or leave the key out for no cap"
            ),
        ));
    }
}

fn check_prefix(problems: &mut Vec<Problem>, key: &str, prefix: &str) {
    if prefix.starts_with('/') {
        problems.push(Problem::new(
            key,
            format!(
                "prefix `{prefix}` starts with `/`; object keys have no leading slash, write it like \"raw/\""
            ),
        ));
    }
}

fn check_device(problems: &mut Vec<Problem>, key: &str, device: &ModbusDevice) {
    if device.name.is_empty() {
        problems.push(Problem::new(
            format!("{key}.name"),
            "the device name is empty; name the device as readings should carry it, for example name = \"press-3\"",
        ));
    } else if !is_safe_name(&device.name) {
        problems.push(Problem::new(
            format!("{key}.name"),
            format!(
                "device name `{}` is not allowed; use 1-64 letters, digits, `-`, `_` and `.`, starting with a letter or digit",
                device.name
            ),
        ));
    }
    check_device_link(problems, key, device);
    check_interval(
        problems,
        &format!("{key}.poll_interval"),
        device.poll_interval,
        MIN_POLL_INTERVAL,
        "\"1s\"",
    );
    if device.timeout.0.is_zero() {
        problems.push(Problem::new(
            format!("{key}.timeout"),
            "a timeout of 0s fails every request; give the device time to answer, for example \"1s\"",
        ));
    }
    // Two tags 1999 bits apart still fit one 2000-bit request; a larger gap never can.
    if device.max_gap > MAX_BITS - 1 {
        problems.push(Problem::new(
            format!("{key}.max_gap"),
            format!(
                "max_gap {} is more than one request can span (2000 bits, 125 registers); use 0 (contiguous tags only) to 1999, for example max_gap = 10",
                device.max_gap
            ),
        ));
    }
    check_request_limits(problems, key, device);
    if device.tags.is_empty() {
        problems.push(Problem::new(
            format!("{key}.tags"),
            format!(
                "device `{}` has no tags; add at least one [[modbus.tags]] table, or remove the device",
                device.name
            ),
        ));
    }

    let mut first_use: HashMap<&str, usize> = HashMap::new();
    for (j, tag) in device.tags.iter().enumerate() {
        let tag_key = format!("{key}.tags[{j}]");
        if first_use.contains_key(tag.name.as_str()) {
            problems.push(Problem::new(
                format!("{tag_key}.name"),
                format!(
                    "duplicate tag name `{}` in device `{}`; tag names must be unique within a device",
                    tag.name, device.name
                ),
            ));
        } else {
            first_use.insert(&tag.name, j);
        }
        check_tag(problems, &tag_key, tag, device);
        for earlier in &device.tags[..j] {
            if earlier.register == tag.register && overlaps(earlier, tag) {
                problems.push(Problem::new(
                    format!("{tag_key}.address"),
                    format!(
                        "tag `{}` ({}) overlaps tag `{}` ({}); give each tag its own registers",
                        tag.name,
                        describe_registers(tag),
                        earlier.name,
                        describe_registers(earlier)
                    ),
                ));
            }
        }
    }
}

/// `max_registers_per_request` and `max_bits_per_request`: within the protocol's maximum, and
/// wide enough for every tag (a tag is always read in one request).
fn check_request_limits(problems: &mut Vec<Problem>, key: &str, device: &ModbusDevice) {
    if let Some(limit) = device.max_registers_per_request {
        if !(1..=MAX_REGISTERS).contains(&limit) {
            problems.push(Problem::new(
                format!("{key}.max_registers_per_request"),
                format!(
                    "{limit} registers per request is outside 1..={MAX_REGISTERS} (the protocol's maximum); use the limit from the device's manual, for example max_registers_per_request = 64, or leave it out for {MAX_REGISTERS}"
                ),
            ));
        } else if let Some(widest) = device
            .tags
            .iter()
            .filter(|tag| !tag.register.is_bits())
            .max_by_key(|tag| tag.register_count())
            .filter(|tag| tag.register_count() > limit)
        {
            let width = widest.register_count();
            problems.push(Problem::new(
                format!("{key}.max_registers_per_request"),
                format!(
                    "max_registers_per_request = {limit} is less than tag `{}` takes ({}, {width} registers), and a tag is always read in one request; use at least {width}",
                    widest.name,
                    widest.data_type.name()
                ),
            ));
        }
    }
    if let Some(limit) = device.max_bits_per_request
        && !(1..=MAX_BITS).contains(&limit)
    {
        problems.push(Problem::new(
            format!("{key}.max_bits_per_request"),
            format!(
                "{limit} bits per request is outside 1..={MAX_BITS} (the protocol's maximum); use the limit from the device's manual, for example max_bits_per_request = 256, or leave it out for {MAX_BITS}"
            ),
        ));
    }
}

/// How the device is reached: `host` and `port` for Modbus TCP, or `bus` (checked against the
/// buses in [`check_buses`]) for a slave on a serial line.
fn check_device_link(problems: &mut Vec<Problem>, key: &str, device: &ModbusDevice) {
    let Some(bus) = &device.bus else {
        if device.host.trim().is_empty() {
            problems.push(Problem::new(
                format!("{key}.host"),
                "the host is empty; give the device's IP address or host name, or bus = \"<name>\" for a slave on a [[modbus_bus]]",
            ));
        }
        if device.port == 0 {
            problems.push(Problem::new(
                format!("{key}.port"),
                "port 0 cannot be connected to; use the device's Modbus TCP port, usually 502",
            ));
        }
        if device.inter_frame_delay.is_some() {
            problems.push(Problem::new(
                format!("{key}.inter_frame_delay"),
                "inter_frame_delay only applies to slaves on a serial bus; remove it, or add bus = \"<name>\"",
            ));
        }
        return;
    };
    if !device.host.is_empty() {
        problems.push(Problem::new(
            format!("{key}.host"),
            format!(
                "both host and bus = \"{bus}\" are set; a device is either Modbus TCP (host) or a slave on a bus (bus): remove one of them (a serial gateway's address belongs in its [[modbus_bus]])"
            ),
        ));
    }
    if device.port != ModbusDevice::DEFAULT_PORT {
        problems.push(Problem::new(
            format!("{key}.port"),
            format!(
                "port only applies to Modbus TCP devices; remove it (a serial gateway's port belongs in the [[modbus_bus]] named `{bus}`)"
            ),
        ));
    }
    if let Some(delay) = device.inter_frame_delay
        && delay.0 > MAX_INTER_FRAME_DELAY
    {
        problems.push(Problem::new(
            format!("{key}.inter_frame_delay"),
            format!(
                "{delay} between frames is longer than the maximum of {}; leave it out for the bus's, or use a few milliseconds, for example \"5ms\"",
                ConfigDuration(MAX_INTER_FRAME_DELAY)
            ),
        ));
    }
    match device.unit_id {
        0 => problems.push(Problem::new(
            format!("{key}.unit_id"),
            "unit id 0 is the broadcast address, which no slave answers; use the slave address set on the device, 1 to 247",
        )),
        248..=255 => problems.push(Problem::new(
            format!("{key}.unit_id"),
            format!(
                "unit id {} is reserved on a serial bus; use the slave address set on the device, 1 to 247",
                device.unit_id
            ),
        )),
        _ => {}
    }
}

/// The most slaves one bus table can hold by address (1 to 247).
const MAX_SLAVE_ADDRESS: u8 = 247;

/// The buses, and the devices that name them.
fn check_buses(problems: &mut Vec<Problem>, buses: &[ModbusBus], devices: &[ModbusDevice]) {
    let mut first_use: HashMap<&str, usize> = HashMap::new();
    // Which bus first used a serial port or a gateway address.
    let mut lines: HashMap<String, &str> = HashMap::new();
    for (k, bus) in buses.iter().enumerate() {
        let key = format!("modbus_bus[{k}]");
        // The devices naming a repeated bus name are checked with the first bus of that name.
        let mut repeated = false;
        if bus.name.is_empty() || !is_safe_name(&bus.name) {
            problems.push(Problem::new(
                format!("{key}.name"),
                format!(
                    "bus name `{}` is not allowed; use 1-64 letters, digits, `-`, `_` and `.`, starting with a letter or digit, for example name = \"line5-rs485\"",
                    bus.name
                ),
            ));
        } else if let Some(first) = first_use.get(bus.name.as_str()) {
            repeated = true;
            problems.push(Problem::new(
                format!("{key}.name"),
                format!(
                    "duplicate bus name `{}` (first used by modbus_bus[{first}]); bus names must be unique within a gateway",
                    bus.name
                ),
            ));
        } else {
            first_use.insert(&bus.name, k);
        }
        if let Some(line) = check_bus_line(problems, &key, bus) {
            if let Some(other) = lines.get(&line) {
                problems.push(Problem::new(
                    format!("{key}.name"),
                    format!(
                        "bus `{}` uses {line}, which bus `{other}` uses already; one line is one bus: put all the slaves on that line under one [[modbus_bus]]",
                        bus.name
                    ),
                ));
            } else {
                lines.insert(line, &bus.name);
            }
        }
        check_bus_framing(problems, &key, bus);
        if repeated {
            continue;
        }
        let mut slaves = devices
            .iter()
            .enumerate()
            .filter(|(_, device)| device.bus.as_ref() == Some(&bus.name))
            .peekable();
        if slaves.peek().is_none() {
            problems.push(Problem::new(
                format!("{key}.name"),
                format!(
                    "no [[modbus]] device is on bus `{}`; add bus = \"{}\" to the devices on this line, or remove the bus",
                    bus.name, bus.name
                ),
            ));
        }
        let mut unit_ids: HashMap<u8, (usize, &str)> = HashMap::new();
        for (i, device) in slaves {
            if let Some((first, name)) = unit_ids.get(&device.unit_id) {
                problems.push(Problem::new(
                    format!("modbus[{i}].unit_id"),
                    format!(
                        "unit id {} is already used on bus `{}` by device `{name}` (modbus[{first}]); every slave on a bus needs its own address, 1 to {MAX_SLAVE_ADDRESS}",
                        device.unit_id, bus.name
                    ),
                ));
            } else {
                unit_ids.insert(device.unit_id, (i, &device.name));
            }
        }
    }
    for (i, device) in devices.iter().enumerate() {
        let Some(name) = &device.bus else {
            continue;
        };
        if buses.iter().any(|bus| &bus.name == name) {
            continue;
        }
        let fix = if buses.is_empty() {
            format!(
                "add a [[modbus_bus]] table with name = \"{name}\" and its serial_port (or host and port of a serial gateway)"
            )
        } else {
            let mut known: Vec<String> = Vec::new();
            for bus in buses {
                let name = format!("`{}`", bus.name);
                if !known.contains(&name) {
                    known.push(name);
                }
            }
            format!(
                "use one of {}, or add a [[modbus_bus]] named `{name}`",
                known.join(", ")
            )
        };
        problems.push(Problem::new(
            format!("modbus[{i}].bus"),
            format!("no [[modbus_bus]] is named `{name}`; {fix}"),
        ));
    }
}

/// Where the bus's line is: the serial port or the gateway's address, as a text that is equal
/// for two buses on one line; `None` when the keys for the transport are missing.
fn check_bus_line(problems: &mut Vec<Problem>, key: &str, bus: &ModbusBus) -> Option<String> {
    let transport = bus.transport.name();
    match bus.transport {
        BusTransport::Rtu => {
            for (name, set) in [("host", bus.host.is_some()), ("port", bus.port.is_some())] {
                if set {
                    problems.push(Problem::new(
                        format!("{key}.{name}"),
                        format!(
                            "{name} only applies to transport = \"rtu_over_tcp\"; an rtu bus is on the gateway's own serial_port: remove {name}, or set transport = \"rtu_over_tcp\""
                        ),
                    ));
                }
            }
            match bus.serial_port.as_deref().map(str::trim) {
                None => problems.push(Problem::new(
                    format!("{key}.serial_port"),
                    format!(
                        "transport = \"{transport}\" needs the serial port; add serial_port = \"/dev/ttyUSB0\" (the RS-485 adapter's device)"
                    ),
                )),
                Some("") => problems.push(Problem::new(
                    format!("{key}.serial_port"),
                    "the serial port is empty; name the device, for example serial_port = \"/dev/ttyUSB0\"",
                )),
                Some(port) => return Some(format!("serial port {port}")),
            }
            None
        }
        BusTransport::RtuOverTcp => {
            if bus.serial_port.is_some() {
                problems.push(Problem::new(
                    format!("{key}.serial_port"),
                    "serial_port only applies to transport = \"rtu\"; an rtu_over_tcp bus is reached at host and port: remove serial_port, or set transport = \"rtu\"",
                ));
            }
            let host = bus.host.as_deref().map(str::trim);
            match host {
                None => problems.push(Problem::new(
                    format!("{key}.host"),
                    format!(
                        "transport = \"{transport}\" needs the serial gateway's address; add host = \"10.0.0.9\" (its IP address or host name)"
                    ),
                )),
                Some("") => problems.push(Problem::new(
                    format!("{key}.host"),
                    "the host is empty; give the serial gateway's IP address or host name",
                )),
                Some(_) => {}
            }
            match bus.port {
                None => problems.push(Problem::new(
                    format!("{key}.port"),
                    format!(
                        "transport = \"{transport}\" needs the gateway's TCP port for this serial line; add it from the gateway's settings, for example port = 4001"
                    ),
                )),
                Some(0) => problems.push(Problem::new(
                    format!("{key}.port"),
                    "port 0 cannot be connected to; use the gateway's TCP port for this serial line, for example 4001",
                )),
                Some(_) => {}
            }
            match (host, bus.port) {
                (Some(host), Some(port)) if !host.is_empty() && port != 0 => {
                    Some(format!("gateway {host}:{port}"))
                }
                _ => None,
            }
        }
    }
}

/// Baud rate and character framing.
fn check_bus_framing(problems: &mut Vec<Problem>, key: &str, bus: &ModbusBus) {
    if bus.baud_rate == 0 {
        problems.push(Problem::new(
            format!("{key}.baud_rate"),
            "baud rate 0 carries no data; use the rate set on the slaves, for example baud_rate = 9600 or 19200",
        ));
    }
    match bus.data_bits {
        8 => {}
        7 => problems.push(Problem::new(
            format!("{key}.data_bits"),
            "RTU frames are 8-bit bytes, which 7 data bits cannot carry (7 data bits is Modbus ASCII, which the agent does not speak); set the slaves to RTU with 8 data bits and use data_bits = 8",
        )),
        other => problems.push(Problem::new(
            format!("{key}.data_bits"),
            format!("data_bits = {other} is not a Modbus setting; use 8"),
        )),
    }
    if !matches!(bus.stop_bits, 1 | 2) {
        problems.push(Problem::new(
            format!("{key}.stop_bits"),
            format!(
                "stop_bits = {} does not exist on a serial line; use 1 or 2",
                bus.stop_bits
            ),
        ));
    }
    if let Some(delay) = bus.inter_frame_delay
        && delay.0 > MAX_INTER_FRAME_DELAY
    {
        problems.push(Problem::new(
            format!("{key}.inter_frame_delay"),
            format!(
                "{delay} between frames is longer than the maximum of {}; leave it out for the Modbus default (3.5 characters), or use a few milliseconds, for example \"5ms\"",
                ConfigDuration(MAX_INTER_FRAME_DELAY)
            ),
        ));
    }
}

/// The longest silence between frames accepted: beyond it a bus with a few slaves could not
/// keep a one-second poll rate, and no device needs that much.
const MAX_INTER_FRAME_DELAY: Duration = Duration::from_secs(1);

fn check_tag(problems: &mut Vec<Problem>, key: &str, tag: &ModbusTag, device: &ModbusDevice) {
    if tag.name.is_empty() {
        problems.push(Problem::new(
            format!("{key}.name"),
            "the tag name is empty; name the value, for example name = \"oil_temp\"",
        ));
    } else if !is_safe_name(&tag.name) {
        problems.push(Problem::new(
            format!("{key}.name"),
            format!(
                "tag name `{}` is not allowed; use 1-64 letters, digits, `-`, `_` and `.`, starting with a letter or digit",
                tag.name
            ),
        ));
    }
    check_type(problems, key, tag);
    check_address(problems, key, tag, device.addressing);
    if tag.data_type.is_text() {
        check_string(problems, key, tag, device);
        return;
    }
    if !tag.scale.is_finite() || tag.scale == 0.0 {
        problems.push(Problem::new(
            format!("{key}.scale"),
            format!(
                "scale {} would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
                tag.scale
            ),
        ));
    }
    if !tag.offset.is_finite() {
        problems.push(Problem::new(
            format!("{key}.offset"),
            format!(
                "offset {} is not a finite number; use a finite number such as -40",
                tag.offset
            ),
        ));
    }
    if tag.unit.as_deref().is_some_and(|u| u.trim().is_empty()) {
        problems.push(Problem::new(
            format!("{key}.unit"),
            "the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
        ));
    }
    check_transform(problems, key, tag, device);
}

/// The type must fit the table: coils and discrete inputs hold bits, registers hold words.
fn check_type(problems: &mut Vec<Problem>, key: &str, tag: &ModbusTag) {
    let type_name = tag.data_type.name();
    if tag.register.is_bits() && tag.data_type != DataType::Bool {
        problems.push(Problem::new(
            format!("{key}.type"),
            format!(
                "{type_name} cannot be read from a {}, which holds a single bit; use type = \"bool\", or register = \"holding\" or \"input\" for {type_name}",
                table_name(tag.register)
            ),
        ));
    }
    if !tag.register.is_bits() && tag.data_type == DataType::Bool {
        problems.push(Problem::new(
            format!("{key}.type"),
            format!(
                "bool is for coils and discrete inputs; use register = \"coil\" or \"discrete\", or type = \"bit\" with bit = 0..15 for one bit of the {} register",
                tag.register.name()
            ),
        ));
    }
    match (tag.data_type, tag.bit) {
        (DataType::Bit, None) => problems.push(Problem::new(
            format!("{key}.bit"),
            "type = \"bit\" needs the bit number; add bit = 0 (least significant) to 15",
        )),
        (DataType::Bit, Some(bit)) if bit > 15 => problems.push(Problem::new(
            format!("{key}.bit"),
            format!(
                "bit {bit} does not exist in a 16-bit register; use 0 (least significant) to 15"
            ),
        )),
        (DataType::Bit, Some(_)) | (_, None) => {}
        (_, Some(bit)) => problems.push(Problem::new(
            format!("{key}.bit"),
            format!("bit = {bit} only applies to type = \"bit\"; remove it, or set type = \"bit\""),
        )),
    }
    match (tag.data_type, tag.length) {
        (DataType::String, None) => problems.push(Problem::new(
            format!("{key}.length"),
            format!(
                "type = \"string\" needs its length in registers (two characters each); add for example length = 10 for up to 20 characters (1 to {MAX_REGISTERS})"
            ),
        )),
        (DataType::String, Some(length)) if !(1..=MAX_REGISTERS).contains(&length) => {
            problems.push(Problem::new(
                format!("{key}.length"),
                format!(
                    "length = {length} is outside 1..={MAX_REGISTERS} registers (a string is read in one request, and one request reads at most {MAX_REGISTERS}); use the string's size in the PLC divided by two, rounded up"
                ),
            ));
        }
        (DataType::String, Some(_)) | (_, None) => {}
        (_, Some(length)) => problems.push(Problem::new(
            format!("{key}.length"),
            format!(
                "length = {length} only applies to type = \"string\"; remove it, or set type = \"string\""
            ),
        )),
    }
}

/// A string tag is text: the byte orders that reorder words and every numeric transform do
/// not apply to it.
// Exact comparisons with the defaults are the point: any other scale or offset was written.
#[allow(clippy::float_cmp)]
fn check_string(problems: &mut Vec<Problem>, key: &str, tag: &ModbusTag, device: &ModbusDevice) {
    if matches!(tag.byte_order, ByteOrder::CDAB | ByteOrder::DCBA) {
        problems.push(Problem::new(
            format!("{key}.byte_order"),
            format!(
                "byte_order = \"{:?}\" reorders words, but a string is read register by register; use \"ABCD\" (each register's high byte first, the default) or \"BADC\" (low byte first)",
                tag.byte_order
            ),
        ));
    }
    let numeric = [
        ("scale", tag.scale != 1.0),
        ("offset", tag.offset != 0.0),
        ("range", tag.range.is_some()),
        ("deadband", tag.deadband.is_some()),
        ("deadband_percent", tag.deadband_percent.is_some()),
    ];
    for (field, set) in numeric {
        if set {
            problems.push(Problem::new(
                format!("{key}.{field}"),
                format!(
                    "{field} applies to numbers, and tag `{}` is a string (sent as text); remove {field}, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                    tag.name
                ),
            ));
        }
    }
    if tag.unit.as_deref().is_some_and(|u| u.trim().is_empty()) {
        problems.push(Problem::new(
            format!("{key}.unit"),
            "the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
        ));
    }
    if let Some(heartbeat) = tag.heartbeat
        && heartbeat.0 < device.poll_interval.0
    {
        problems.push(Problem::new(
            format!("{key}.heartbeat"),
            format!(
                "heartbeat {heartbeat} is shorter than the device's poll_interval {}, so every sample would be sent; use at least the poll interval, for example heartbeat = \"60s\"",
                device.poll_interval
            ),
        ));
    }
}

/// The tag's registers must exist on the wire once the device's addressing is applied.
fn check_address(problems: &mut Vec<Problem>, key: &str, tag: &ModbusTag, addressing: Addressing) {
    let Some(wire) = addressing.wire_address(tag.address) else {
        problems.push(Problem::new(
            format!("{key}.address"),
            "address 0 does not exist with addressing = \"one_based\" (the first register is 1); use 1 or more, or set addressing = \"zero_based\" on the device",
        ));
        return;
    };
    let count = u32::from(tag.register_count());
    if u32::from(wire) + count - 1 > u32::from(u16::MAX) {
        // The last address that exists, counted the way this device counts.
        let last = u32::from(u16::MAX) + u32::from(tag.address - wire);
        let counting = match addressing {
            Addressing::ZeroBased => "",
            Addressing::OneBased => " (one-based)",
        };
        problems.push(Problem::new(
            format!("{key}.address"),
            format!(
                "{} at address {} ends past the last register {last}{counting}; use an address of at most {}",
                tag.data_type.name(),
                tag.address,
                last - (count - 1)
            ),
        ));
    }
}

/// Range, deadband and heartbeat.
fn check_transform(problems: &mut Vec<Problem>, key: &str, tag: &ModbusTag, device: &ModbusDevice) {
    if let Some([min, max]) = tag.range
        && !(min.is_finite() && max.is_finite() && min < max)
    {
        problems.push(Problem::new(
            format!("{key}.range"),
            format!(
                "range [{min}, {max}] is empty or not finite; write it as [min, max] with min below max, for example range = [0, 100]"
            ),
        ));
    }
    if let Some(deadband) = tag.deadband
        && !(deadband.is_finite() && deadband >= 0.0)
    {
        problems.push(Problem::new(
            format!("{key}.deadband"),
            format!(
                "deadband {deadband} is not a finite number of at least 0; use the smallest change worth sending, in engineering units, for example deadband = 0.5"
            ),
        ));
    }
    if let Some(percent) = tag.deadband_percent {
        if tag.deadband.is_some() {
            problems.push(Problem::new(
                format!("{key}.deadband_percent"),
                "both deadband and deadband_percent are set; keep one of them",
            ));
        } else if !(percent.is_finite() && percent >= 0.0) {
            problems.push(Problem::new(
                format!("{key}.deadband_percent"),
                format!(
                    "deadband_percent {percent} is not a finite percentage of at least 0; use for example deadband_percent = 1.0 (1 % of the last sent value)"
                ),
            ));
        }
    }
    if let Some(heartbeat) = tag.heartbeat
        && heartbeat.0 < device.poll_interval.0
    {
        problems.push(Problem::new(
            format!("{key}.heartbeat"),
            format!(
                "heartbeat {heartbeat} is shorter than the device's poll_interval {}, so every sample would be sent; use at least the poll interval, for example heartbeat = \"60s\"",
                device.poll_interval
            ),
        ));
    }
}

/// The first and last register a tag occupies, widened so a range past 65535 can be described.
fn register_range(tag: &ModbusTag) -> (u32, u32) {
    let first = u32::from(tag.address);
    (first, first + u32::from(tag.register_count()) - 1)
}

fn overlaps(a: &ModbusTag, b: &ModbusTag) -> bool {
    // A `bit` tag reads one bit of a register that may also be read whole (a status word and
    // its flags): it collides only with a `bit` tag naming the same bit.
    if a.data_type == DataType::Bit || b.data_type == DataType::Bit {
        return a.data_type == b.data_type && a.address == b.address && a.bit == b.bit;
    }
    let (a_first, a_last) = register_range(a);
    let (b_first, b_last) = register_range(b);
    a_first <= b_last && b_first <= a_last
}

/// A table's name as a plant engineer says it, for "a coil", "a holding register".
fn table_name(kind: RegisterKind) -> &'static str {
    match kind {
        RegisterKind::Coil => "coil",
        RegisterKind::Discrete => "discrete input",
        RegisterKind::Holding => "holding register",
        RegisterKind::Input => "input register",
    }
}

fn describe_registers(tag: &ModbusTag) -> String {
    let table = table_name(tag.register);
    match (register_range(tag), tag.data_type, tag.bit) {
        ((first, _), DataType::Bit, Some(bit)) => format!("bit {bit} of {table} {first}"),
        ((first, last), _, _) if first == last => format!("{table} {first}"),
        ((first, last), _, _) => format!("{table}s {first}-{last}"),
    }
}

/// Device and tag names end up in Parquet columns, metrics labels and log fields; keeping them
/// to a plain character set keeps every one of those unambiguous.
pub(crate) fn is_safe_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// S3's rules for new bucket names, minus the rarely met special cases (IP-address-like names,
/// reserved prefixes): the endpoint reports those itself.
fn is_bucket_name(name: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge_ok(name.chars().next())
        && edge_ok(name.chars().last())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::{ModbusBus, Parity};

    use super::super::{ConfigError, load_str};

    fn problems(text: &str) -> Vec<String> {
        match load_str(text, Path::new("plant.toml")) {
            Err(ConfigError::Invalid { problems, .. }) => {
                let shown = ConfigError::Invalid {
                    path: "plant.toml".into(),
                    problems: problems.clone(),
                }
                .to_string();
                let lines: Vec<String> = shown.lines().map(str::to_owned).collect();
                assert_eq!(lines.len(), problems.len(), "one problem per line");
                lines
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn device(name: &str, tags: &str) -> String {
        format!("[[modbus]]\nname = \"{name}\"\nhost = \"10.0.0.7\"\n{tags}")
    }

    fn tag(name: &str, register: &str, address: u32, data_type: &str) -> String {
        format!(
            "[[modbus.tags]]\nname = \"{name}\"\nregister = \"{register}\"\naddress = {address}\ntype = \"{data_type}\"\n"
        )
    }

    const HEAD: &str =
        "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.s3]\nbucket = \"plant-raw\"\n";

    #[test]
    fn every_problem_is_reported_with_file_line_key_and_fix() {
        let text = format!(
            "site = \" \"\ngateway = \"GW 1\"\n[batch]\nmax_rows = 0\nmax_age = \"500ms\"\n[upload]\n{}",
            device(
                "press-3",
                "tags = []\nport = 0\npoll_interval = \"5ms\"\ntimeout = \"0s\"\nmax_gap = 2000\n"
            )
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:1: site: the site name is empty; name the plant or site this gateway belongs to, for example site = \"plant-ost\"",
                "plant.toml:2: gateway: gateway id `GW 1` is not allowed; use 1-64 characters of lowercase letters, digits, `-` and `_`, starting with a letter or digit",
                "plant.toml:4: batch.max_rows: a batch of at most 0 rows can never be cut; use at least 1, for example 50000",
                "plant.toml:5: batch.max_age: 500ms is shorter than the minimum of 1s; use at least that, for example \"60s\"",
                "plant.toml:6: upload: no upload target; add an [upload.s3] table or an [upload.dir] table",
                "plant.toml:10: modbus[0].tags: device `press-3` has no tags; add at least one [[modbus.tags]] table, or remove the device",
                "plant.toml:11: modbus[0].port: port 0 cannot be connected to; use the device's Modbus TCP port, usually 502",
                "plant.toml:12: modbus[0].poll_interval: 5ms is shorter than the minimum of 10ms; use at least that, for example \"1s\"",
                "plant.toml:13: modbus[0].timeout: a timeout of 0s fails every request; give the device time to answer, for example \"1s\"",
                "plant.toml:14: modbus[0].max_gap: max_gap 2000 is more than one request can span (2000 bits, 125 registers); use 0 (contiguous tags only) to 1999, for example max_gap = 10",
            ]
        );
    }

    #[test]
    fn buffer_bounds_must_be_usable() {
        let base = "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n";
        assert_eq!(
            problems(&format!(
                "{base}[buffer]\nmax_bytes = \"512 KiB\"\nmax_age = \"30s\"\n[batch]\nmax_age = \"60s\"\n"
            )),
            vec![
                "plant.toml:6: buffer.max_bytes: 512 KiB is below the minimum of 1 MiB; use at least that, for example max_bytes = \"16 MiB\"",
                "plant.toml:7: buffer.max_age: 30s is not longer than batch.max_age (1m), so readings would be dropped before their batch is due; use a longer age, for example max_age = \"168h\"",
            ]
        );
        assert_eq!(
            problems(&format!(
                "{base}[buffer]\nmax_bytes = 4000000\n[batch]\nmax_rows = 50000\n"
            )),
            vec![
                "plant.toml:6: buffer.max_bytes: 4000000 B leaves too little room for a batch of batch.max_rows = 50000 readings (about 10 MiB with room to keep recording while it uploads); raise max_bytes to at least that or lower batch.max_rows",
            ]
        );
        let config = super::super::load_str(
            &format!(
                "{base}[buffer]\nmax_bytes = \"16MiB\"\nmax_age = \"2h\"\non_full = \"backpressure\"\n[batch]\nmax_rows = 10000\n"
            ),
            Path::new("plant.toml"),
        )
        .unwrap();
        assert_eq!(config.buffer.max_bytes, super::super::ByteSize(16 << 20));
        assert_eq!(
            config.buffer.on_full,
            super::super::FullPolicy::Backpressure
        );
        let defaults = super::super::load_str(base, Path::new("plant.toml")).unwrap();
        assert_eq!(defaults.buffer.max_bytes.to_string(), "1 GiB");
        assert_eq!(defaults.buffer.max_age.to_string(), "168h");
        assert_eq!(
            defaults.buffer.on_full,
            super::super::FullPolicy::DropOldest
        );
    }

    #[test]
    fn sizes_are_read_with_their_units_or_as_bytes() {
        use super::super::ByteSize;
        for (text, bytes) in [
            ("512 MiB", 512 << 20),
            ("16MiB", 16 << 20),
            ("2 gib", 2 << 30),
            ("500 MB", 500_000_000),
            ("64 kB", 64_000),
            ("1048576", 1 << 20),
            (" 3 B ", 3),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        assert_eq!(
            ByteSize::parse("12 parsecs"),
            Err("`12 parsecs` has an unknown unit `parsecs`; use B, kB, KiB, MB, MiB, GB or GiB, for example \"512 MiB\"".to_owned())
        );
        assert_eq!(
            ByteSize::parse("MiB"),
            Err(
                "`MiB` does not start with a whole number; write a size like \"512 MiB\""
                    .to_owned()
            )
        );
        assert!(ByteSize::parse("99999999999 TiB").is_err());
        assert_eq!(ByteSize(1536 << 10).to_string(), "1536 KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 B");
    }

    #[test]
    fn duplicate_tag_names_name_the_device() {
        let tags = tag("oil_temp", "holding", 0, "f32")
            + &tag("pressure", "holding", 2, "u16")
            + &tag("speed", "holding", 3, "u16")
            + &tag("oil_temp", "input", 0, "f32");
        let text = format!(
            "{HEAD}{}{}",
            device("press-1", &tag("a", "holding", 0, "u16")),
            device("press-3", &tags)
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:32: modbus[1].tags[3].name: duplicate tag name `oil_temp` in device `press-3`; tag names must be unique within a device"
            ]
        );
    }

    #[test]
    fn duplicate_and_unsafe_device_names_are_refused() {
        let t = tag("a", "holding", 0, "u16");
        let text = format!(
            "{HEAD}{}{}{}{}",
            device("press-3", &t),
            device("press-3", &t),
            device("", &t),
            device("press 4", &t)
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:14: modbus[1].name: duplicate device name `press-3` (first used by modbus[0]); device names must be unique within a gateway",
                "plant.toml:22: modbus[2].name: the device name is empty; name the device as readings should carry it, for example name = \"press-3\"",
                "plant.toml:30: modbus[3].name: device name `press 4` is not allowed; use 1-64 letters, digits, `-`, `_` and `.`, starting with a letter or digit",
            ]
        );
    }

    #[test]
    fn registers_must_fit_and_must_not_overlap() {
        let tags = tag("a", "holding", 10, "f32")
            + &tag("b", "holding", 11, "u16")
            + &tag("c", "input", 11, "u32")
            + &tag("d", "holding", 12, "u16")
            + &tag("e", "holding", 65535, "u32");
        let text = format!("{HEAD}{}", device("press-3", &tags));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:16: modbus[0].tags[1].address: tag `b` (holding register 11) overlaps tag `a` (holding registers 10-11); give each tag its own registers",
                "plant.toml:31: modbus[0].tags[4].address: u32 at address 65535 ends past the last register 65535; use an address of at most 65534",
            ]
        );
    }

    #[test]
    fn scale_offset_and_unit_must_be_usable() {
        let t = tag("a", "holding", 0, "u16")
            + "scale = 0.0\noffset = nan\nunit = \"\"\n"
            + &tag("b", "holding", 1, "u16")
            + "scale = inf\n";
        let text = format!("{HEAD}{}", device("press-3", &t));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:13: modbus[0].tags[0].scale: scale 0 would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
                "plant.toml:14: modbus[0].tags[0].offset: offset NaN is not a finite number; use a finite number such as -40",
                "plant.toml:15: modbus[0].tags[0].unit: the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
                "plant.toml:21: modbus[0].tags[1].scale: scale inf would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
            ]
        );
    }

    #[test]
    fn assets_name_real_devices_and_tags_and_nothing_is_empty() {
        let t = tag("oil_temp", "holding", 0, "f32")
            + "description = \"Hydraulic oil temperature\"\n"
            + &tag("strokes", "holding", 2, "u32")
            + "description = \" \"\n";
        let assets = "[assets]\narea = \"\"\nline = \"line1\"\n\
            [assets.devices.press-3]\nmachine = \"\"\n\
            [assets.devices.press-3.descriptions]\noil_temp = \"Oil\"\nspeed = \"Ram speed\"\n\
            [assets.devices.press-9]\nmachine = \"press-9\"\n";
        let text = format!("{HEAD}{assets}{}", device("press-3", &t));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:6: assets.area: the area is empty; name it, for example area = \"press-shop\", or leave the key out",
                "plant.toml:9: assets.devices.press-3.machine: the machine is empty; name it, for example machine = \"press-3\", or leave the key out to use [assets] machine",
                "plant.toml:11: assets.devices.press-3.descriptions.oil_temp: tag `oil_temp` of `press-3` also has a `description` in its [[modbus.tags]]; keep one of the two",
                "plant.toml:12: assets.devices.press-3.descriptions.speed: device `press-3` has no tag `speed`; use a tag name from its [[modbus.tags]], or remove the key",
                "plant.toml:13: assets.devices.press-9: no source of this map has a device named `press-9`; use the device's name as in [[modbus]] `name` (known: press-3), or remove the table",
                "plant.toml:29: modbus[0].tags[1].description: the description is empty; say what the value is, for example description = \"Hydraulic oil temperature\", or leave the key out",
            ]
        );
    }

    #[test]
    fn upload_targets_are_checked() {
        let t = device("press-3", &tag("a", "holding", 0, "u16"));
        let text = format!(
            "site = \"a\"\ngateway = \"gw\"\n[upload.s3]\nbucket = \"\"\nprefix = \"/raw/\"\nendpoint = \"localhost:9000\"\ntimeout = \"0s\"\n[upload.dir]\npath = \"out\"\n{t}"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:3: upload: both [upload.s3] and [upload.dir] are set; keep exactly one of them",
                "plant.toml:4: upload.s3.bucket: the bucket name is empty; name the S3 bucket that holds the raw zone",
                "plant.toml:5: upload.s3.prefix: prefix `/raw/` starts with `/`; object keys have no leading slash, write it like \"raw/\"",
                "plant.toml:6: upload.s3.endpoint: `localhost:9000` is not an http or https URL; write it like \"https://s3.example.com:9000\", or leave it out for AWS",
                "plant.toml:7: upload.s3.timeout: 0s is shorter than the minimum of 1s; use at least that, for example \"60s\"",
            ]
        );
        let text =
            format!("site = \"a\"\ngateway = \"gw\"\n[upload.s3]\nbucket = \"Plant_Raw\"\n{t}");
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:4: upload.s3.bucket: `Plant_Raw` is not a valid S3 bucket name; use 3-63 lowercase letters, digits, `.` and `-`, starting and ending with a letter or digit"
            ]
        );
    }

    #[test]
    fn s3_transfer_settings_are_checked() {
        let t = device("press-3", &tag("a", "holding", 0, "u16"));
        let text = format!(
            "site = \"a\"\ngateway = \"gw\"\n[upload.s3]\nbucket = \"plant-raw\"\nmultipart_threshold = \"4 MiB\"\npart_size = \"6 GiB\"\nstorage_class = \"DEEP_ARCHIVE\"\nkms_key_id = \"alias/plant\"\nmax_bytes_per_second = 512\n{t}"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:5: upload.s3.multipart_threshold: 4 MiB is below S3's smallest part of 5 MiB; use at least that, for example multipart_threshold = \"8 MiB\"",
                "plant.toml:6: upload.s3.part_size: 6 GiB is outside the part sizes S3 accepts (5 MiB to 5 GiB); use a size in that range, for example part_size = \"8 MiB\"",
                "plant.toml:7: upload.s3.storage_class: `DEEP_ARCHIVE` objects cannot be read before they are restored, so the collector could not pick up the batches; use \"STANDARD\" (or \"GLACIER_IR\"), and archive older batches with a lifecycle rule",
                "plant.toml:8: upload.s3.kms_key_id: a KMS key is only used with SSE-KMS; add sse = \"aws:kms\", or remove kms_key_id",
                "plant.toml:9: upload.s3.max_bytes_per_second: 512 B per second is below the minimum of 1 KiB, at which one batch would take hours; use at least that, for example max_bytes_per_second = \"256 KiB\", or leave the key out for no cap",
            ]
        );
        let text = format!(
            "site = \"a\"\ngateway = \"gw\"\n[upload.s3]\nbucket = \"plant-raw\"\nstorage_class = \"standard\"\nsse = \"kms\"\nkms_key_id = \"\"\n{t}"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:5: upload.s3.storage_class: `standard` is not a storage class the batches can use; use one of STANDARD, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR (in capitals), or leave the key out for the bucket's default",
                "plant.toml:6: upload.s3.sse: `kms` is not a server-side encryption mode; use \"AES256\" (SSE-S3) or \"aws:kms\" (SSE-KMS), or leave the key out for the bucket's default encryption",
                "plant.toml:7: upload.s3.kms_key_id: the KMS key is empty; name the key (id, ARN or alias/<name>), or leave the key out for the AWS managed key aws/s3",
            ]
        );
        let config = load_str(
            &format!(
                "site = \"a\"\ngateway = \"gw\"\n[upload.s3]\nbucket = \"plant-raw\"\nstorage_class = \"STANDARD_IA\"\nsse = \"aws:kms\"\nkms_key_id = \"alias/plant-raw\"\nmax_bytes_per_second = \"256 KiB\"\n{t}"
            ),
            Path::new("plant.toml"),
        )
        .unwrap();
        let s3 = config.upload.s3.unwrap();
        assert_eq!(
            s3.max_bytes_per_second,
            Some(super::super::ByteSize(256 << 10))
        );
        let defaults = load_str(&format!("{HEAD}{t}"), Path::new("plant.toml"))
            .unwrap()
            .upload
            .s3
            .unwrap();
        assert_eq!(
            (
                defaults.multipart_threshold.to_string(),
                defaults.part_size.to_string()
            ),
            ("8 MiB".to_owned(), "8 MiB".to_owned())
        );
        assert_eq!(
            (
                defaults.sse,
                defaults.storage_class,
                defaults.max_bytes_per_second
            ),
            (None, None, None)
        );
    }

    #[test]
    fn a_config_built_in_code_is_validated_without_lines() {
        let mut config = load_str(
            &format!(
                "{HEAD}{}",
                device("press-3", &tag("a", "holding", 0, "u16"))
            ),
            Path::new("plant.toml"),
        )
        .unwrap();
        config.modbus[0].tags[0].scale = 0.0;
        let found = super::validate(&config);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, None);
        assert_eq!(found[0].key, "modbus[0].tags[0].scale");
    }

    #[test]
    fn types_must_fit_the_register_kind() {
        let tags = tag("speed", "coil", 0, "f32")
            + &tag("running", "holding", 2, "bool")
            + &tag("fault", "holding", 3, "bit")
            + &tag("alarm", "holding", 4, "bit")
            + "bit = 16\n"
            + &tag("level", "holding", 5, "u16")
            + "bit = 3\n"
            + &tag("door", "discrete", 0, "bool")
            + &tag("pump", "coil", 2, "bool");
        let text = format!("{HEAD}{}", device("press-3", &tags));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:12: modbus[0].tags[0].type: f32 cannot be read from a coil, which holds a single bit; use type = \"bool\", or register = \"holding\" or \"input\" for f32",
                "plant.toml:17: modbus[0].tags[1].type: bool is for coils and discrete inputs; use register = \"coil\" or \"discrete\", or type = \"bit\" with bit = 0..15 for one bit of the holding register",
                "plant.toml:18: modbus[0].tags[2].bit: type = \"bit\" needs the bit number; add bit = 0 (least significant) to 15",
                "plant.toml:28: modbus[0].tags[3].bit: bit 16 does not exist in a 16-bit register; use 0 (least significant) to 15",
                "plant.toml:34: modbus[0].tags[4].bit: bit = 3 only applies to type = \"bit\"; remove it, or set type = \"bit\"",
            ]
        );
    }

    #[test]
    fn string_tags_need_a_length_and_refuse_what_only_numbers_have() {
        let tags = tag("recipe", "holding", 0, "string")
            + "length = 10\n"
            + &tag("batch", "holding", 5, "string")
            + "length = 4\n"
            + &tag("no_length", "input", 0, "string")
            + &tag("too_long", "input", 10, "string")
            + "length = 126\n"
            + &tag("empty", "input", 200, "string")
            + "length = 0\n"
            + &tag("counter", "input", 300, "u16")
            + "length = 2\n"
            + &tag("swapped", "input", 400, "string")
            + "length = 2\nbyte_order = \"CDAB\"\n"
            + &tag("scaled", "input", 500, "string")
            + "length = 2\nscale = 0.1\noffset = 1.0\nrange = [0.0, 1.0]\ndeadband = 1.0\ndeadband_percent = 5.0\n"
            + &tag("label", "coil", 0, "string")
            + "length = 2\n"
            + &tag("last", "holding", 65530, "string")
            + "length = 8\n"
            + &tag("operator", "holding", 100, "string")
            + "length = 3\nbyte_order = \"BADC\"\nheartbeat = \"60s\"\n";
        let text = format!("{HEAD}{}", device("mixer-1", &tags));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:17: modbus[0].tags[1].address: tag `batch` (holding registers 5-8) overlaps tag `recipe` (holding registers 0-9); give each tag its own registers",
                "plant.toml:20: modbus[0].tags[2].length: type = \"string\" needs its length in registers (two characters each); add for example length = 10 for up to 20 characters (1 to 125)",
                "plant.toml:30: modbus[0].tags[3].length: length = 126 is outside 1..=125 registers (a string is read in one request, and one request reads at most 125); use the string's size in the PLC divided by two, rounded up",
                "plant.toml:36: modbus[0].tags[4].length: length = 0 is outside 1..=125 registers (a string is read in one request, and one request reads at most 125); use the string's size in the PLC divided by two, rounded up",
                "plant.toml:42: modbus[0].tags[5].length: length = 2 only applies to type = \"string\"; remove it, or set type = \"string\"",
                "plant.toml:49: modbus[0].tags[6].byte_order: byte_order = \"CDAB\" reorders words, but a string is read register by register; use \"ABCD\" (each register's high byte first, the default) or \"BADC\" (low byte first)",
                "plant.toml:56: modbus[0].tags[7].scale: scale applies to numbers, and tag `scaled` is a string (sent as text); remove scale, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                "plant.toml:57: modbus[0].tags[7].offset: offset applies to numbers, and tag `scaled` is a string (sent as text); remove offset, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                "plant.toml:58: modbus[0].tags[7].range: range applies to numbers, and tag `scaled` is a string (sent as text); remove range, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                "plant.toml:59: modbus[0].tags[7].deadband: deadband applies to numbers, and tag `scaled` is a string (sent as text); remove deadband, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                "plant.toml:60: modbus[0].tags[7].deadband_percent: deadband_percent applies to numbers, and tag `scaled` is a string (sent as text); remove deadband_percent, or use heartbeat = \"60s\" to send the text when it changes and at least once a minute",
                "plant.toml:65: modbus[0].tags[8].type: string cannot be read from a coil, which holds a single bit; use type = \"bool\", or register = \"holding\" or \"input\" for string",
                "plant.toml:70: modbus[0].tags[9].address: string at address 65530 ends past the last register 65535; use an address of at most 65528",
            ]
        );
        let ok = format!(
            "{HEAD}{}",
            device(
                "mixer-1",
                &(tag("operator", "holding", 100, "string")
                    + "length = 3\nbyte_order = \"BADC\"\nheartbeat = \"60s\"\n")
            )
        );
        let config = load_str(&ok, Path::new("plant.toml")).expect("a valid string tag");
        let operator = &config.modbus[0].tags[0];
        assert_eq!(
            (
                operator.data_type,
                operator.length,
                operator.register_count()
            ),
            (super::super::DataType::String, Some(3), 3)
        );
    }

    #[test]
    fn bits_of_one_register_collide_only_when_they_repeat() {
        let tags = tag("running", "holding", 20, "bit")
            + "bit = 0\n"
            + &tag("fault", "holding", 20, "bit")
            + "bit = 1\n"
            + &tag("running_again", "holding", 20, "bit")
            + "bit = 0\n"
            + &tag("status_word", "holding", 20, "u16")
            + &tag("pump", "coil", 20, "bool")
            + &tag("pump_again", "coil", 20, "bool");
        let text = format!("{HEAD}{}", device("press-3", &tags));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:23: modbus[0].tags[2].address: tag `running_again` (bit 0 of holding register 20) overlaps tag `running` (bit 0 of holding register 20); give each tag its own registers",
                "plant.toml:39: modbus[0].tags[5].address: tag `pump_again` (coil 20) overlaps tag `pump` (coil 20); give each tag its own registers",
            ]
        );
    }

    #[test]
    fn addresses_are_checked_after_the_devices_addressing() {
        let one_based = "addressing = \"one_based\"\n".to_owned()
            + &tag("zero", "holding", 0, "u16")
            + &tag("long", "holding", 65534, "u64")
            + &tag("first", "holding", 1, "u16");
        let zero_based = tag("double", "input", 65533, "f64") + &tag("fits", "input", 100, "i64");
        let text = format!(
            "{HEAD}{}{}",
            device("press-3", &one_based),
            device("oven-2", &zero_based)
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:12: modbus[0].tags[0].address: address 0 does not exist with addressing = \"one_based\" (the first register is 1); use 1 or more, or set addressing = \"zero_based\" on the device",
                "plant.toml:17: modbus[0].tags[1].address: u64 at address 65534 ends past the last register 65536 (one-based); use an address of at most 65533",
                "plant.toml:30: modbus[1].tags[0].address: f64 at address 65533 ends past the last register 65535; use an address of at most 65532",
            ]
        );
    }

    #[test]
    fn the_metrics_listen_address_must_be_an_ip_and_a_fixed_port() {
        let t = device("press-3", &tag("a", "holding", 0, "u16"));
        let text = format!("{HEAD}[metrics]\nlisten = \"localhost:9464\"\n{t}");
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:6: metrics.listen: `localhost:9464` is not an IP address and port; write it like \"127.0.0.1:9464\" (this gateway only) or \"0.0.0.0:9464\" (every interface)"
            ]
        );
        let text = format!("{HEAD}[metrics]\nenabled = true\nlisten = \"0.0.0.0:0\"\n{t}");
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:7: metrics.listen: port 0 would pick a different port at every start, so nothing could scrape it; use a fixed port, for example \"0.0.0.0:9464\""
            ]
        );
    }

    #[test]
    fn range_deadband_and_heartbeat_must_be_usable() {
        let tags = tag("a", "holding", 0, "i16")
            + "range = [150.0, -20.0]\ndeadband = -1.0\ndeadband_percent = 5.0\nheartbeat = \"500ms\"\n"
            + &tag("b", "holding", 1, "i16")
            + "deadband_percent = -3.0\nrange = [0.0, inf]\n"
            + &tag("c", "holding", 2, "i16")
            + "range = [-20.0, 150.0]\ndeadband_percent = 2.5\nheartbeat = \"1s\"\n";
        let text = format!("{HEAD}{}", device("press-3", &tags));
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:13: modbus[0].tags[0].range: range [150, -20] is empty or not finite; write it as [min, max] with min below max, for example range = [0, 100]",
                "plant.toml:14: modbus[0].tags[0].deadband: deadband -1 is not a finite number of at least 0; use the smallest change worth sending, in engineering units, for example deadband = 0.5",
                "plant.toml:15: modbus[0].tags[0].deadband_percent: both deadband and deadband_percent are set; keep one of them",
                "plant.toml:16: modbus[0].tags[0].heartbeat: heartbeat 500ms is shorter than the device's poll_interval 1s, so every sample would be sent; use at least the poll interval, for example heartbeat = \"60s\"",
                "plant.toml:22: modbus[0].tags[1].deadband_percent: deadband_percent -3 is not a finite percentage of at least 0; use for example deadband_percent = 1.0 (1 % of the last sent value)",
                "plant.toml:23: modbus[0].tags[1].range: range [0, inf] is empty or not finite; write it as [min, max] with min below max, for example range = [0, 100]",
            ]
        );
    }

    #[test]
    fn request_limits_are_within_the_protocol_and_fit_every_tag() {
        let text = format!(
            "{HEAD}{}{}{}",
            device(
                "press-3",
                &("max_registers_per_request = 0\nmax_bits_per_request = 2001\n".to_owned()
                    + &tag("a", "holding", 0, "u16"))
            ),
            device(
                "meter",
                &("max_registers_per_request = 126\nmax_bits_per_request = 0\n".to_owned()
                    + &tag("a", "holding", 0, "u16"))
            ),
            device(
                "oven",
                &("max_registers_per_request = 2\nmax_bits_per_request = 1\n".to_owned()
                    + &tag("a", "holding", 0, "f32")
                    + &tag("energy", "input", 10, "u64")
                    + &tag("door", "coil", 0, "bool"))
            ),
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:8: modbus[0].max_registers_per_request: 0 registers per request is outside 1..=125 (the protocol's maximum); use the limit from the device's manual, for example max_registers_per_request = 64, or leave it out for 125",
                "plant.toml:9: modbus[0].max_bits_per_request: 2001 bits per request is outside 1..=2000 (the protocol's maximum); use the limit from the device's manual, for example max_bits_per_request = 256, or leave it out for 2000",
                "plant.toml:18: modbus[1].max_registers_per_request: 126 registers per request is outside 1..=125 (the protocol's maximum); use the limit from the device's manual, for example max_registers_per_request = 64, or leave it out for 125",
                "plant.toml:19: modbus[1].max_bits_per_request: 0 bits per request is outside 1..=2000 (the protocol's maximum); use the limit from the device's manual, for example max_bits_per_request = 256, or leave it out for 2000",
                "plant.toml:28: modbus[2].max_registers_per_request: max_registers_per_request = 2 is less than tag `energy` takes (u64, 4 registers), and a tag is always read in one request; use at least 4",
            ]
        );
        let ok = format!(
            "{HEAD}{}",
            device(
                "press-3",
                &("max_registers_per_request = 64\nmax_bits_per_request = 256\n".to_owned()
                    + &tag("a", "holding", 0, "f64"))
            )
        );
        let config = load_str(&ok, Path::new("plant.toml")).expect("limits within range");
        assert_eq!(
            (
                config.modbus[0].max_registers_per_request,
                config.modbus[0].max_bits_per_request
            ),
            (Some(64), Some(256))
        );
    }

    #[test]
    fn the_kinesis_stream_settings_must_be_usable() {
        let t = device("press-3", &tag("a", "holding", 0, "u16"));
        let text = format!(
            "{HEAD}[kinesis]\nstream = \"plant live\"\nregion = \"\"\nendpoint = \"localhost:4567\"\nqueue_capacity = 0\nmax_linger = \"2m\"\ntimeout = \"100ms\"\n{t}"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:6: kinesis.stream: `plant live` is not a Kinesis stream name; use 1-128 letters, digits, `_`, `-` and `.`, for example stream = \"plantline-live\"",
                "plant.toml:7: kinesis.region: the region is empty; name the stream's AWS region, for example region = \"eu-central-1\"",
                "plant.toml:8: kinesis.endpoint: `localhost:4567` is not an http or https URL; write it like \"https://kinesis.example.com\", or leave it out for AWS",
                "plant.toml:9: kinesis.queue_capacity: 0 readings is outside 1..=1000000; use for example 10000 (about a minute of 150 readings/s)",
                "plant.toml:10: kinesis.max_linger: 2m is longer than the maximum of 1m, which is no longer a live stream; use for example \"500ms\"",
                "plant.toml:11: kinesis.timeout: 100ms is shorter than the minimum of 1s; use at least that, for example \"10s\"",
            ]
        );
        let ok = format!("{HEAD}[kinesis]\nstream = \"plantline-live\"\n{t}");
        let config = load_str(&ok, Path::new("plant.toml")).expect("a stream name is enough");
        let kinesis = config.kinesis.expect("the [kinesis] table is read");
        assert_eq!(
            (
                kinesis.region.as_str(),
                kinesis.endpoint,
                kinesis.queue_capacity,
                kinesis.max_linger.to_string(),
                kinesis.timeout.to_string()
            ),
            (
                "us-east-1",
                None,
                10_000,
                "500ms".to_owned(),
                "10s".to_owned()
            )
        );
    }

    fn slave(name: &str, bus: &str, unit_id: u8, extra: &str) -> String {
        format!(
            "[[modbus]]\nname = \"{name}\"\nbus = \"{bus}\"\nunit_id = {unit_id}\n{extra}{}",
            tag("t", "holding", 0, "u16")
        )
    }

    #[test]
    fn buses_and_their_slaves_are_checked() {
        let text = format!(
            "{HEAD}[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nbaud_rate = 0\ndata_bits = 7\nstop_bits = 3\nhost = \"10.0.0.9\"\n\
             [[modbus_bus]]\nname = \"gw\"\ntransport = \"rtu_over_tcp\"\nserial_port = \"/dev/ttyUSB1\"\n\
             [[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu_over_tcp\"\nhost = \"10.0.0.9\"\nport = 0\ninter_frame_delay = \"2s\"\n\
             {}{}{}[[modbus]]\nname = \"press-3\"\nhost = \"10.0.0.8\"\ninter_frame_delay = \"5ms\"\n{}[[modbus]]\nname = \"oven\"\n{}",
            slave("meter", "line5", 1, ""),
            slave("tt-101", "line5", 1, "host = \"10.0.0.7\"\n"),
            slave("tt-102", "line6", 0, "port = 4001\n"),
            tag("t", "holding", 0, "u16"),
            tag("t", "holding", 0, "u16"),
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:5: modbus_bus[0].serial_port: transport = \"rtu\" needs the serial port; add serial_port = \"/dev/ttyUSB0\" (the RS-485 adapter's device)",
                "plant.toml:8: modbus_bus[0].baud_rate: baud rate 0 carries no data; use the rate set on the slaves, for example baud_rate = 9600 or 19200",
                "plant.toml:9: modbus_bus[0].data_bits: RTU frames are 8-bit bytes, which 7 data bits cannot carry (7 data bits is Modbus ASCII, which the agent does not speak); set the slaves to RTU with 8 data bits and use data_bits = 8",
                "plant.toml:10: modbus_bus[0].stop_bits: stop_bits = 3 does not exist on a serial line; use 1 or 2",
                "plant.toml:11: modbus_bus[0].host: host only applies to transport = \"rtu_over_tcp\"; an rtu bus is on the gateway's own serial_port: remove host, or set transport = \"rtu_over_tcp\"",
                "plant.toml:12: modbus_bus[1].host: transport = \"rtu_over_tcp\" needs the serial gateway's address; add host = \"10.0.0.9\" (its IP address or host name)",
                "plant.toml:12: modbus_bus[1].port: transport = \"rtu_over_tcp\" needs the gateway's TCP port for this serial line; add it from the gateway's settings, for example port = 4001",
                "plant.toml:13: modbus_bus[1].name: no [[modbus]] device is on bus `gw`; add bus = \"gw\" to the devices on this line, or remove the bus",
                "plant.toml:15: modbus_bus[1].serial_port: serial_port only applies to transport = \"rtu\"; an rtu_over_tcp bus is reached at host and port: remove serial_port, or set transport = \"rtu\"",
                "plant.toml:17: modbus_bus[2].name: duplicate bus name `line5` (first used by modbus_bus[0]); bus names must be unique within a gateway",
                "plant.toml:20: modbus_bus[2].port: port 0 cannot be connected to; use the gateway's TCP port for this serial line, for example 4001",
                "plant.toml:21: modbus_bus[2].inter_frame_delay: 2s between frames is longer than the maximum of 1s; leave it out for the Modbus default (3.5 characters), or use a few milliseconds, for example \"5ms\"",
                "plant.toml:34: modbus[1].unit_id: unit id 1 is already used on bus `line5` by device `meter` (modbus[0]); every slave on a bus needs its own address, 1 to 247",
                "plant.toml:35: modbus[1].host: both host and bus = \"line5\" are set; a device is either Modbus TCP (host) or a slave on a bus (bus): remove one of them (a serial gateway's address belongs in its [[modbus_bus]])",
                "plant.toml:43: modbus[2].bus: no [[modbus_bus]] is named `line6`; use one of `line5`, `gw`, or add a [[modbus_bus]] named `line6`",
                "plant.toml:44: modbus[2].unit_id: unit id 0 is the broadcast address, which no slave answers; use the slave address set on the device, 1 to 247",
                "plant.toml:45: modbus[2].port: port only applies to Modbus TCP devices; remove it (a serial gateway's port belongs in the [[modbus_bus]] named `line6`)",
                "plant.toml:54: modbus[3].inter_frame_delay: inter_frame_delay only applies to slaves on a serial bus; remove it, or add bus = \"<name>\"",
                "plant.toml:60: modbus[4].host: the host is empty; give the device's IP address or host name, or bus = \"<name>\" for a slave on a [[modbus_bus]]",
            ]
        );
    }

    #[test]
    fn unit_ids_on_a_bus_are_slave_addresses_and_one_port_is_one_bus() {
        let bus = |name: &str| {
            format!(
                "[[modbus_bus]]\nname = \"{name}\"\ntransport = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\n"
            )
        };
        let text = format!(
            "{HEAD}{}{}{}{}{}",
            bus("line5"),
            bus("line6"),
            slave("meter", "line5", 248, ""),
            slave("tt-101", "line6", 3, ""),
            slave("tt-102", "line6", 3, "")
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:10: modbus_bus[1].name: bus `line6` uses serial port /dev/ttyUSB0, which bus `line5` uses already; one line is one bus: put all the slaves on that line under one [[modbus_bus]]",
                "plant.toml:16: modbus[0].unit_id: unit id 248 is reserved on a serial bus; use the slave address set on the device, 1 to 247",
                "plant.toml:34: modbus[2].unit_id: unit id 3 is already used on bus `line6` by device `tt-101` (modbus[1]); every slave on a bus needs its own address, 1 to 247",
            ]
        );
    }

    #[test]
    fn a_bus_with_its_slaves_is_valid_and_defaults_to_the_specifications_framing() {
        let text = format!(
            "{HEAD}[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\n{}{}",
            slave("meter", "line5", 1, "inter_frame_delay = \"10ms\"\n"),
            slave("tt-101", "line5", 2, "")
        );
        let config = load_str(&text, Path::new("plant.toml")).expect("a valid bus");
        let bus = &config.modbus_bus[0];
        assert_eq!(bus.describe(), "/dev/ttyUSB0 19200 8E1");
        // 3.5 characters of 11 bits at 19200 baud.
        assert_eq!(bus.inter_frame_delay(), Duration::from_micros(2006));
        let fast = ModbusBus {
            baud_rate: 115_200,
            ..bus.clone()
        };
        assert_eq!(fast.inter_frame_delay(), Duration::from_micros(1750));
        let slow = ModbusBus {
            baud_rate: 9600,
            parity: Parity::None,
            stop_bits: 2,
            ..bus.clone()
        };
        assert_eq!(slow.inter_frame_delay(), Duration::from_micros(4011));
    }

    #[test]
    fn a_parity_or_transport_that_does_not_exist_is_named_with_the_ones_that_do() {
        let text = format!(
            "{HEAD}[[modbus_bus]]\nname = \"line5\"\ntransport = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nparity = \"E\"\n{}",
            slave("meter", "line5", 1, "")
        );
        let err = load_str(&text, Path::new("plant.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "plant.toml:9:10: modbus_bus[0].parity: unknown variant `E`, expected one of `none`, `even`, `odd`"
        );
        let text = text
            .replace("parity = \"E\"", "transport = \"ascii\"")
            .replace("transport = \"rtu\"\n", "");
        let err = load_str(&text, Path::new("plant.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "plant.toml:8:13: modbus_bus[0].transport: unknown variant `ascii`, expected `rtu` or `rtu_over_tcp`"
        );
    }
}
