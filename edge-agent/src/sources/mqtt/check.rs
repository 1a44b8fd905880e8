//! Validation of the `[[mqtt]]` sections: what serde cannot check (filters, templates, pointers,
//! mappings that compete for one topic, credentials, the session, TLS). Every problem names its
//! key and the fix. The TLS files are read and the client configuration is built as the source
//! builds it, so a map that validates has a CA that parses and a client key that fits its
//! certificate.

use std::collections::HashMap;
use std::time::Duration;

use super::sparkplug;
use super::tls;
use super::topic::{self, Template};
use crate::buffer::dead_letter;
use crate::config::{
    MqttBroker, MqttProtocol, MqttSubscription, PayloadFormat, Problem, ValueType,
};

/// The shortest keep-alive accepted (rumqttc's minimum); the protocol's longest is 65535 s.
/// `max_packet_size` within what a client can use and MQTT allows.
fn check_max_packet_size(broker: &MqttBroker, key: &str, problems: &mut Vec<Problem>) {
    if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&broker.max_packet_size.0) {
        problems.push(problem(
            format!("{key}.max_packet_size"),
            format!(
                "max_packet_size {} bytes is outside 1 KiB to 256 MiB; use for example max_packet_size = \"1 MiB\"",
                broker.max_packet_size.0
            ),
        ));
    }
}

/// Smallest `max_packet_size`: below this even a CONNACK with properties may not fit.
const MIN_PACKET_SIZE: u64 = 1 << 10;
/// Largest `max_packet_size`: MQTT's own limit is 256 MiB.
const MAX_PACKET_SIZE: u64 = 256 << 20;
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(1);
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(65_535);
/// The most dead letters one broker may keep: about 40 MB of the buffer file at most.
const MAX_DEAD_LETTERS: u32 = 100_000;
/// The longest MQTT 5 session expiry interval: the protocol's four-byte integer.
const MAX_SESSION_EXPIRY: Duration = Duration::from_secs(4_294_967_295);

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        line: None,
        message: message.into(),
    }
}

/// Every problem of the configured brokers, in the order of the file.
pub(crate) fn check_brokers(brokers: &[MqttBroker]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut client_ids: HashMap<(&str, u16, &str), usize> = HashMap::new();
    for (i, broker) in brokers.iter().enumerate() {
        let key = format!("mqtt[{i}]");
        if let Some(first) = names.get(broker.name.as_str()) {
            problems.push(problem(
                format!("{key}.name"),
                format!(
                    "duplicate broker name `{}` (first used by mqtt[{first}]); give each [[mqtt]] its own name",
                    broker.name
                ),
            ));
        } else {
            names.insert(&broker.name, i);
        }
        if let Some(first) = client_ids.get(&(
            broker.host.as_str(),
            broker.port(),
            broker.client_id.as_str(),
        )) {
            problems.push(problem(
                format!("{key}.client_id"),
                format!(
                    "client id `{}` is already used on this broker by mqtt[{first}]; the broker would disconnect one of the two, give each its own client_id",
                    broker.client_id
                ),
            ));
        } else {
            client_ids.insert(
                (
                    broker.host.as_str(),
                    broker.port(),
                    broker.client_id.as_str(),
                ),
                i,
            );
        }
        check_broker(&mut problems, &key, broker);
    }
    problems
}

fn check_broker(problems: &mut Vec<Problem>, key: &str, broker: &MqttBroker) {
    if broker.name.trim().is_empty() {
        problems.push(problem(
            format!("{key}.name"),
            "the broker name is empty; name it for the logs, for example name = \"line2-broker\"",
        ));
    }
    if broker.host.trim().is_empty() {
        problems.push(problem(
            format!("{key}.host"),
            "the host is empty; give the broker's IP address or host name",
        ));
    }
    if broker.port == Some(0) {
        problems.push(problem(
            format!("{key}.port"),
            "port 0 cannot be connected to; use the broker's MQTT port, usually 1883 (8883 with TLS), or leave the key out for that default",
        ));
    }
    if broker.client_id.trim().is_empty() {
        problems.push(problem(
            format!("{key}.client_id"),
            "the client id is empty; the broker keeps the session under it, so give one that is unique on the broker and never changes, for example client_id = \"gw-line2\"",
        ));
    }
    if broker.keep_alive.0 < MIN_KEEP_ALIVE || broker.keep_alive.0 > MAX_KEEP_ALIVE {
        problems.push(problem(
            format!("{key}.keep_alive"),
            format!(
                "keep_alive {} is outside 1s to 65535s; use for example keep_alive = \"30s\"",
                broker.keep_alive
            ),
        ));
    }
    check_session(problems, key, broker);
    if let Some(tls) = &broker.tls {
        check_tls(problems, key, tls);
    }
    match (&broker.password_env, &broker.password_file) {
        (Some(_), Some(_)) => problems.push(problem(
            format!("{key}.password_file"),
            "both password_env and password_file are set; keep one of them",
        )),
        (Some(var), None) if var.is_empty() || var.contains('=') => problems.push(problem(
            format!("{key}.password_env"),
            format!(
                "`{var}` is not an environment variable name; name the variable that holds the password, for example password_env = \"MQTT_PASSWORD\""
            ),
        )),
        (Some(_), None) | (None, Some(_)) if broker.username.is_none() => {
            problems.push(problem(
                format!("{key}.username"),
                "a password is configured without a user name; add username = \"...\"",
            ));
        }
        _ => {}
    }
    if broker.max_dead_letters == 0 || broker.max_dead_letters > MAX_DEAD_LETTERS {
        problems.push(problem(
            format!("{key}.max_dead_letters"),
            format!(
                "max_dead_letters {} is outside 1 to {MAX_DEAD_LETTERS}; each dead letter keeps up to {} bytes of payload in the buffer file, use for example max_dead_letters = {}",
                broker.max_dead_letters,
                dead_letter::PAYLOAD_BYTES,
                dead_letter::DEFAULT_MAX_DEAD_LETTERS
            ),
        ));
    }
    check_max_packet_size(broker, key, problems);
    if broker.subscriptions.is_empty() {
        problems.push(problem(
            format!("{key}.subscriptions"),
            format!(
                "broker `{}` has no subscriptions; add at least one [[mqtt.subscriptions]] table, or remove the broker",
                broker.name
            ),
        ));
    }
    for (j, sub) in broker.subscriptions.iter().enumerate() {
        let sub_key = format!("{key}.subscriptions[{j}]");
        check_subscription(problems, &sub_key, sub);
        if topic::check_filter(&sub.topic).is_err() {
            continue;
        }
        if let Some(k) = broker.subscriptions[..j].iter().position(|earlier| {
            topic::check_filter(&earlier.topic).is_ok()
                && topic::overlap(&earlier.topic, &sub.topic)
        }) {
            problems.push(problem(
                format!("{sub_key}.topic"),
                format!(
                    "`{}` overlaps `{}` of {key}.subscriptions[{k}], so one message could be mapped twice; make the filters disjoint (for example by a literal level)",
                    sub.topic, broker.subscriptions[k].topic
                ),
            ));
        }
    }
}

/// `session_expiry`: MQTT 5 only, with a persistent session, within the protocol's range.
fn check_session(problems: &mut Vec<Problem>, key: &str, broker: &MqttBroker) {
    let Some(expiry) = broker.session_expiry else {
        return;
    };
    let key = format!("{key}.session_expiry");
    if broker.protocol == MqttProtocol::V311 {
        problems.push(problem(
            key,
            "session_expiry applies to protocol = \"5\" only; with 3.1.1 the broker decides how long it keeps the session (Mosquitto: persistent_client_expiration), so remove the key or set protocol = \"5\"",
        ));
    } else if broker.clean_session {
        problems.push(problem(
            key,
            "session_expiry is set with clean_session = true, which ends the session at every disconnect; remove one of the two",
        ));
    } else if expiry.0 < Duration::from_secs(1) || expiry.0 > MAX_SESSION_EXPIRY {
        problems.push(problem(
            key,
            format!(
                "session_expiry {expiry} is outside 1s to 4294967295s; it is how long the broker keeps queued messages for the agent while it is away, use for example session_expiry = \"168h\""
            ),
        ));
    }
}

/// `[mqtt.tls]`: the files are read and the configuration built as the source builds it.
fn check_tls(problems: &mut Vec<Problem>, key: &str, tls: &crate::config::MqttTls) {
    if tls
        .server_name
        .as_deref()
        .is_some_and(|n| n.trim().is_empty())
    {
        problems.push(problem(
            format!("{key}.tls.server_name"),
            "server_name is empty; write the name the broker's certificate carries, or leave the key out to check the host",
        ));
        return;
    }
    if let Err(e) = tls::client_config(tls) {
        problems.push(problem(format!("{key}.{}", e.key()), e.to_string()));
    }
}

fn check_subscription(problems: &mut Vec<Problem>, key: &str, sub: &MqttSubscription) {
    let filter_ok = match topic::check_filter(&sub.topic) {
        Ok(()) => true,
        Err(e) => {
            problems.push(problem(
                format!("{key}.topic"),
                format!(
                    "{e}; `+` and `#` must stand alone in a level and `#` only last, for example topic = \"plant/+/+/telemetry\""
                ),
            ));
            false
        }
    };
    if sub.qos > 1 {
        problems.push(problem(
            format!("{key}.qos"),
            format!(
                "qos {} is not supported; use 1 (delivered at least once, acknowledged after the buffer has it) or 0",
                sub.qos
            ),
        ));
    }
    if sub.payload == PayloadFormat::SparkplugB {
        check_sparkplug(problems, key, sub, filter_ok);
        return;
    }
    if sub.rebirth.is_some() {
        problems.push(problem(
            format!("{key}.rebirth"),
            "rebirth only applies to payload = \"sparkplug_b\" (it asks Sparkplug edge nodes for their births); remove the key",
        ));
    }
    let filter = filter_ok.then_some(&sub.topic);
    if sub.device.is_empty() {
        problems.push(problem(
            format!("{key}.device"),
            "no device for the readings; add device = \"...\" (`{N}` takes topic level N, counted from 0)",
        ));
    } else {
        check_template(problems, &format!("{key}.device"), &sub.device, filter);
    }
    if sub.fields.is_empty() {
        check_single_value(problems, key, sub, filter);
    } else {
        check_fields(problems, key, sub, filter);
    }
    check_timestamp(problems, key, sub);
    check_scale(problems, &format!("{key}.scale"), sub.scale);
    check_offset(problems, &format!("{key}.offset"), sub.offset);
    check_unit(problems, &format!("{key}.unit"), sub.unit.as_deref());
}

/// A `sparkplug_b` subscription: a filter that follows whole edge nodes, and none of the
/// mapping keys, since the messages name their metrics, values, times and units.
#[allow(clippy::float_cmp)] // scale and offset are left out exactly when they are 1 and 0
fn check_sparkplug(
    problems: &mut Vec<Problem>,
    key: &str,
    sub: &MqttSubscription,
    filter_ok: bool,
) {
    if filter_ok && let Err(message) = sparkplug::check_filter(&sub.topic) {
        problems.push(problem(format!("{key}.topic"), message));
    }
    let from_messages =
        "tags and values come from the metrics the edge nodes announce in their births";
    let unused: [(&str, bool, &str); 9] = [
        (
            "device",
            !sub.device.is_empty(),
            "the device is the edge node id, or `<edge node>/<device>` for a device's metrics",
        ),
        ("tag", sub.tag.is_some(), from_messages),
        ("value", sub.value.is_some(), from_messages),
        ("fields", !sub.fields.is_empty(), from_messages),
        (
            "timestamp",
            sub.timestamp.is_some(),
            "the time is the metric's or the payload's timestamp",
        ),
        (
            "timestamp_format",
            sub.timestamp_format.is_some(),
            "the time is the metric's or the payload's timestamp",
        ),
        (
            "unit",
            sub.unit.is_some(),
            "the unit is the metric's engUnit property, when the birth has one",
        ),
        (
            "scale",
            sub.scale != 1.0,
            "metrics are recorded as the edge node sends them",
        ),
        (
            "offset",
            sub.offset != 0.0,
            "metrics are recorded as the edge node sends them",
        ),
    ];
    let unused_type = (
        "type",
        sub.value_type != ValueType::Number,
        "each metric's datatype comes from its birth",
    );
    for (name, set, why) in unused.into_iter().chain([unused_type]) {
        if set {
            problems.push(problem(
                format!("{key}.{name}"),
                format!(
                    "{name} does not apply to payload = \"sparkplug_b\" ({why}); remove the key"
                ),
            ));
        }
    }
}

/// One value per message: `tag` and (for JSON) `value`.
#[allow(clippy::float_cmp)] // scale and offset are left out exactly when they are 1 and 0
fn check_single_value(
    problems: &mut Vec<Problem>,
    key: &str,
    sub: &MqttSubscription,
    filter: Option<&String>,
) {
    let json = sub.payload == PayloadFormat::Json;
    match &sub.tag {
            Some(tag) => {
                check_template(problems, &format!("{key}.tag"), tag, filter);
            }
            None => problems.push(problem(
                format!("{key}.tag"),
                "no tag for the readings; add tag = \"...\" (`{N}` takes topic level N), or list the values in [[mqtt.subscriptions.fields]]",
            )),
        }
    match (&sub.value, json) {
            (Some(pointer), true) => check_pointer(problems, &format!("{key}.value"), pointer),
            (None, true) => problems.push(problem(
                format!("{key}.value"),
                "a json payload needs the JSON pointer of the value; add for example value = \"/value\" (\"\" for a payload that is only a number)",
            )),
            (Some(_), false) => problems.push(problem(
                format!("{key}.value"),
                "value only applies to payload = \"json\"; a number payload is the value itself, remove the key",
            )),
            (None, false) => {}
        }
    if sub.value_type == ValueType::String {
        check_text_value(
            problems,
            key,
            json,
            Some(sub.scale).filter(|s| *s != 1.0),
            Some(sub.offset).filter(|o| *o != 0.0),
        );
    }
}

/// A `type = "string"` value: text from a JSON payload, taken as it is.
fn check_text_value(
    problems: &mut Vec<Problem>,
    key: &str,
    json: bool,
    scale: Option<f64>,
    offset: Option<f64>,
) {
    if !json {
        problems.push(problem(
            format!("{key}.type"),
            "type = \"string\" needs payload = \"json\" (a text value found by JSON pointer); a number payload is a number, remove the key",
        ));
    }
    for (name, set) in [("scale", scale.is_some()), ("offset", offset.is_some())] {
        if set {
            problems.push(problem(
                format!("{key}.{name}"),
                format!(
                    "{name} does not apply to type = \"string\" (text is recorded as it is); remove the key"
                ),
            ));
        }
    }
}

/// Several values per message, each in `[[mqtt.subscriptions.fields]]`.
fn check_fields(
    problems: &mut Vec<Problem>,
    key: &str,
    sub: &MqttSubscription,
    filter: Option<&String>,
) {
    if sub.payload != PayloadFormat::Json {
        problems.push(problem(
            format!("{key}.fields"),
            "fields need payload = \"json\"; a number payload holds one value, remove the fields",
        ));
    }
    for (name, set) in [("tag", sub.tag.is_some()), ("value", sub.value.is_some())] {
        if set {
            problems.push(problem(
                    format!("{key}.{name}"),
                    format!(
                        "{name} is set together with fields; give each value its own tag and value in [[mqtt.subscriptions.fields]], and remove this key"
                    ),
                ));
        }
    }
    let mut tags: HashMap<&str, usize> = HashMap::new();
    for (f, field) in sub.fields.iter().enumerate() {
        let field_key = format!("{key}.fields[{f}]");
        if let Some(first) = tags.get(field.tag.as_str()) {
            problems.push(problem(
                    format!("{field_key}.tag"),
                    format!(
                        "duplicate tag `{}` (first used by fields[{first}]); give each field its own tag",
                        field.tag
                    ),
                ));
        } else {
            tags.insert(&field.tag, f);
        }
        check_template(problems, &format!("{field_key}.tag"), &field.tag, filter);
        check_pointer(problems, &format!("{field_key}.value"), &field.value);
        if field.value_type.unwrap_or(sub.value_type) == ValueType::String {
            check_text_value(problems, &field_key, true, field.scale, field.offset);
        } else {
            if let Some(scale) = field.scale {
                check_scale(problems, &format!("{field_key}.scale"), scale);
            }
            if let Some(offset) = field.offset {
                check_offset(problems, &format!("{field_key}.offset"), offset);
            }
        }
        check_unit(
            problems,
            &format!("{field_key}.unit"),
            field.unit.as_deref(),
        );
    }
}

/// The time of the readings: a pointer and its format, or neither (arrival time).
fn check_timestamp(problems: &mut Vec<Problem>, key: &str, sub: &MqttSubscription) {
    let json = sub.payload == PayloadFormat::Json;
    match (&sub.timestamp, sub.timestamp_format, json) {
        (Some(_), _, false) => problems.push(problem(
            format!("{key}.timestamp"),
            "a number payload has no timestamp field (the arrival time is used); remove timestamp",
        )),
        (Some(pointer), Some(_), true) => {
            check_pointer(problems, &format!("{key}.timestamp"), pointer);
        }
        (Some(_), None, true) => problems.push(problem(
            format!("{key}.timestamp_format"),
            "timestamp needs its format; add timestamp_format = \"epoch_s\", \"epoch_ms\", \"epoch_us\" or \"rfc3339\"",
        )),
        (None, Some(_), _) => problems.push(problem(
            format!("{key}.timestamp_format"),
            "timestamp_format is set without timestamp; add timestamp = \"/ts\" (the JSON pointer of the time), or remove timestamp_format to use the arrival time",
        )),
        (None, None, _) => {}
    }
}

fn check_template(problems: &mut Vec<Problem>, key: &str, template: &str, filter: Option<&String>) {
    if template.is_empty() {
        problems.push(problem(
            key,
            "the name is empty; write the name, or `{N}` for level N of the topic (counted from 0)",
        ));
        return;
    }
    let checked = Template::parse(template)
        .and_then(|t| filter.map_or(Ok(()), |filter| t.check_against(filter)));
    if let Err(e) = checked {
        problems.push(problem(
            key,
            format!("{e}; use `{{N}}` with N a level of the topic filter, counted from 0"),
        ));
    }
}

fn check_pointer(problems: &mut Vec<Problem>, key: &str, pointer: &str) {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        problems.push(problem(
            key,
            format!(
                "`{pointer}` is not a JSON pointer; start it with `/`, for example \"/{pointer}\" (\"\" is the whole payload)"
            ),
        ));
    }
}

fn check_scale(problems: &mut Vec<Problem>, key: &str, scale: f64) {
    if !scale.is_finite() || scale == 0.0 {
        problems.push(problem(
            key,
            format!(
                "scale {scale} would make every reading meaningless; use a finite, non-zero multiplier such as 0.1"
            ),
        ));
    }
}

fn check_offset(problems: &mut Vec<Problem>, key: &str, offset: f64) {
    if !offset.is_finite() {
        problems.push(problem(
            key,
            format!("offset {offset} is not a finite number; use a finite number such as -40"),
        ));
    }
}

fn check_unit(problems: &mut Vec<Problem>, key: &str, unit: Option<&str>) {
    if unit.is_some_and(|u| u.trim().is_empty()) {
        problems.push(problem(
            key,
            "the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{ConfigError, load_str};

    const HEAD: &str = "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n";

    fn problems(text: &str) -> Vec<String> {
        match load_str(&format!("{HEAD}{text}"), Path::new("plant.toml")) {
            Err(ConfigError::Invalid { path, problems }) => ConfigError::Invalid { path, problems }
                .to_string()
                .lines()
                .map(str::to_owned)
                .collect(),
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_mqtt_section_loads() {
        let text = format!(
            "{HEAD}[[mqtt]]\nname = \"b\"\nhost = \"127.0.0.1\"\nclient_id = \"gw-1\"\nusername = \"agent\"\npassword_file = \"secret\"\n[[mqtt.subscriptions]]\ntopic = \"plant/+/+/telemetry\"\ndevice = \"{{1}}\"\ntag = \"{{2}}\"\nvalue = \"/v\"\n"
        );
        let config = load_str(&text, Path::new("/etc/plantline/plant.toml")).unwrap();
        let broker = &config.mqtt[0];
        assert_eq!(
            (
                broker.port(),
                broker.clean_session,
                broker.keep_alive.0.as_secs()
            ),
            (1883, false, 30)
        );
        assert_eq!(
            broker.password_file.as_deref(),
            Some(Path::new("/etc/plantline/secret"))
        );
        assert_eq!(broker.subscriptions[0].qos, 1);
        assert_eq!(broker.max_dead_letters, 1000);
    }

    #[test]
    fn text_values_and_rebirth_apply_only_where_they_mean_something() {
        let text = r#"[[mqtt]]
name = "b"
host = "127.0.0.1"
client_id = "gw-1"
[[mqtt.subscriptions]]
topic = "plant/+/recipe"
device = "{1}"
tag = "recipe"
value = "/name"
type = "string"
scale = 2.0
rebirth = true
[[mqtt.subscriptions]]
topic = "plant/+/state"
payload = "number"
device = "{1}"
tag = "state"
type = "string"
[[mqtt.subscriptions]]
topic = "plant/+/batch"
device = "{1}"
[[mqtt.subscriptions.fields]]
tag = "batch"
value = "/batch"
type = "string"
offset = 1.0
[[mqtt.subscriptions.fields]]
tag = "count"
value = "/count"
[[mqtt.subscriptions]]
topic = "spBv1.0/line3/#"
payload = "sparkplug_b"
type = "string"
rebirth = false
"#;
        assert_eq!(
            problems(text),
            vec![
                "plant.toml:15: mqtt[0].subscriptions[0].scale: scale does not apply to type = \"string\" (text is recorded as it is); remove the key",
                "plant.toml:16: mqtt[0].subscriptions[0].rebirth: rebirth only applies to payload = \"sparkplug_b\" (it asks Sparkplug edge nodes for their births); remove the key",
                "plant.toml:22: mqtt[0].subscriptions[1].type: type = \"string\" needs payload = \"json\" (a text value found by JSON pointer); a number payload is a number, remove the key",
                "plant.toml:30: mqtt[0].subscriptions[2].fields[0].offset: offset does not apply to type = \"string\" (text is recorded as it is); remove the key",
                "plant.toml:37: mqtt[0].subscriptions[3].type: type does not apply to payload = \"sparkplug_b\" (each metric's datatype comes from its birth); remove the key",
            ]
        );
    }

    #[test]
    fn broker_problems_name_line_key_and_fix() {
        let text = "[[mqtt]]\nname = \"b\"\nhost = \" \"\nport = 0\nclient_id = \"\"\nkeep_alive = \"0s\"\npassword_env = \"A=B\"\nmax_dead_letters = 0\nsubscriptions = []\n";
        assert_eq!(
            problems(text),
            vec![
                "plant.toml:7: mqtt[0].host: the host is empty; give the broker's IP address or host name",
                "plant.toml:8: mqtt[0].port: port 0 cannot be connected to; use the broker's MQTT port, usually 1883 (8883 with TLS), or leave the key out for that default",
                "plant.toml:9: mqtt[0].client_id: the client id is empty; the broker keeps the session under it, so give one that is unique on the broker and never changes, for example client_id = \"gw-line2\"",
                "plant.toml:10: mqtt[0].keep_alive: keep_alive 0s is outside 1s to 65535s; use for example keep_alive = \"30s\"",
                "plant.toml:11: mqtt[0].password_env: `A=B` is not an environment variable name; name the variable that holds the password, for example password_env = \"MQTT_PASSWORD\"",
                "plant.toml:12: mqtt[0].max_dead_letters: max_dead_letters 0 is outside 1 to 100000; each dead letter keeps up to 256 bytes of payload in the buffer file, use for example max_dead_letters = 1000",
                "plant.toml:13: mqtt[0].subscriptions: broker `b` has no subscriptions; add at least one [[mqtt.subscriptions]] table, or remove the broker",
            ]
        );
    }

    #[test]
    fn filter_and_mapping_problems_name_line_key_and_fix() {
        let text = r#"[[mqtt]]
name = "b"
host = "127.0.0.1"
client_id = "gw-1"
password_env = "MQTT_PASSWORD"
[[mqtt.subscriptions]]
topic = "plant/+/+/telemetry"
device = "{1}"
tag = "{4}"
value = "v"
timestamp = "/ts"
[[mqtt.subscriptions]]
topic = "plant/press-3/#"
qos = 2
device = "press-{x}"
[[mqtt.subscriptions]]
topic = "plant/a+/b"
payload = "number"
device = "m"
tag = "t"
value = "/v"
timestamp_format = "epoch_ms"
[[mqtt.subscriptions]]
topic = "other/+"
device = "{1}"
tag = "x"
value = "/x"
scale = 0.0
[[mqtt.subscriptions.fields]]
tag = "t"
value = "/t"
unit = ""
[[mqtt.subscriptions.fields]]
tag = "t"
value = "/u"
"#;
        assert_eq!(
            problems(text),
            vec![
                "plant.toml:5: mqtt[0].username: a password is configured without a user name; add username = \"...\"",
                "plant.toml:10: mqtt[0].subscriptions[0].timestamp_format: timestamp needs its format; add timestamp_format = \"epoch_s\", \"epoch_ms\", \"epoch_us\" or \"rfc3339\"",
                "plant.toml:13: mqtt[0].subscriptions[0].tag: template `{4}` uses topic level 4, but topics matching `plant/+/+/telemetry` have only 4 levels (0-3); use `{N}` with N a level of the topic filter, counted from 0",
                "plant.toml:14: mqtt[0].subscriptions[0].value: `v` is not a JSON pointer; start it with `/`, for example \"/v\" (\"\" is the whole payload)",
                "plant.toml:16: mqtt[0].subscriptions[1].tag: no tag for the readings; add tag = \"...\" (`{N}` takes topic level N), or list the values in [[mqtt.subscriptions.fields]]",
                "plant.toml:16: mqtt[0].subscriptions[1].value: a json payload needs the JSON pointer of the value; add for example value = \"/value\" (\"\" for a payload that is only a number)",
                "plant.toml:17: mqtt[0].subscriptions[1].topic: `plant/press-3/#` overlaps `plant/+/+/telemetry` of mqtt[0].subscriptions[0], so one message could be mapped twice; make the filters disjoint (for example by a literal level)",
                "plant.toml:18: mqtt[0].subscriptions[1].qos: qos 2 is not supported; use 1 (delivered at least once, acknowledged after the buffer has it) or 0",
                "plant.toml:19: mqtt[0].subscriptions[1].device: template `press-{x}` has `{x}`, which is not a topic level number; use `{N}` with N a level of the topic filter, counted from 0",
                "plant.toml:21: mqtt[0].subscriptions[2].topic: topic filter `plant/a+/b` has `+` inside level 1 (`a+`); `+` and `#` must stand alone in a level and `#` only last, for example topic = \"plant/+/+/telemetry\"",
                "plant.toml:25: mqtt[0].subscriptions[2].value: value only applies to payload = \"json\"; a number payload is the value itself, remove the key",
                "plant.toml:26: mqtt[0].subscriptions[2].timestamp_format: timestamp_format is set without timestamp; add timestamp = \"/ts\" (the JSON pointer of the time), or remove timestamp_format to use the arrival time",
                "plant.toml:30: mqtt[0].subscriptions[3].tag: tag is set together with fields; give each value its own tag and value in [[mqtt.subscriptions.fields]], and remove this key",
                "plant.toml:31: mqtt[0].subscriptions[3].value: value is set together with fields; give each value its own tag and value in [[mqtt.subscriptions.fields]], and remove this key",
                "plant.toml:32: mqtt[0].subscriptions[3].scale: scale 0 would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
                "plant.toml:36: mqtt[0].subscriptions[3].fields[0].unit: the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
                "plant.toml:38: mqtt[0].subscriptions[3].fields[1].tag: duplicate tag `t` (first used by fields[0]); give each field its own tag",
            ]
        );
    }

    #[test]
    fn session_and_tls_problems_name_line_key_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"{HEAD}[[mqtt]]
name = "a"
host = "127.0.0.1"
client_id = "gw-a"
session_expiry = "1h"
subscriptions = [{{ topic = "a/+", device = "{{1}}", tag = "t", value = "" }}]
[[mqtt]]
name = "b"
host = "127.0.0.1"
protocol = "5"
client_id = "gw-b"
clean_session = true
session_expiry = "1h"
subscriptions = [{{ topic = "b/+", device = "{{1}}", tag = "t", value = "" }}]
[[mqtt]]
name = "c"
host = "127.0.0.1"
protocol = "5"
client_id = "gw-c"
session_expiry = "0s"
subscriptions = [{{ topic = "c/+", device = "{{1}}", tag = "t", value = "" }}]
[mqtt.tls]
ca_file = "certs/ca.pem"
[[mqtt]]
name = "d"
host = "127.0.0.1"
client_id = "gw-d"
subscriptions = [{{ topic = "d/+", device = "{{1}}", tag = "t", value = "" }}]
[mqtt.tls]
ca_file = "ca.pem"
server_name = ""
"#
        );
        let config = dir.path().join("plant.toml");
        let problems: Vec<String> = match load_str(&text, &config) {
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
            Ok(_) => panic!("expected problems"),
        };
        let file = config.display();
        let ca = dir.path().join("certs/ca.pem");
        assert_eq!(
            problems,
            vec![
                format!(
                    "{file}:9: mqtt[0].session_expiry: session_expiry applies to protocol = \"5\" only; with 3.1.1 the broker decides how long it keeps the session (Mosquitto: persistent_client_expiration), so remove the key or set protocol = \"5\""
                ),
                format!(
                    "{file}:17: mqtt[1].session_expiry: session_expiry is set with clean_session = true, which ends the session at every disconnect; remove one of the two"
                ),
                format!(
                    "{file}:24: mqtt[2].session_expiry: session_expiry 0s is outside 1s to 4294967295s; it is how long the broker keeps queued messages for the agent while it is away, use for example session_expiry = \"168h\""
                ),
                format!(
                    "{file}:27: mqtt[2].tls.ca_file: cannot read tls.ca_file {}: No such file or directory (os error 2); check the path and that the agent's user may read it",
                    ca.display()
                ),
                format!(
                    "{file}:35: mqtt[3].tls.server_name: server_name is empty; write the name the broker's certificate carries, or leave the key out to check the host"
                ),
            ]
        );
    }

    #[test]
    fn an_unknown_protocol_names_the_two_there_are() {
        let text = format!(
            "{HEAD}[[mqtt]]\nname = \"a\"\nhost = \"h\"\nclient_id = \"c\"\nprotocol = \"3\"\nsubscriptions = []\n"
        );
        let message = load_str(&text, Path::new("plant.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("unknown variant `3`, expected `3.1.1` or `5`"),
            "{message}"
        );
    }
}
