//! Deriving the tag catalog from the sensor map in force.

use super::format::{CatalogTag, TagCatalog};
use crate::config::{AgentConfig, Assets, PayloadFormat, ValueType};

/// The catalog of `config`'s tags, effective at `effective_at_us`.
///
/// Modbus tags are all there; MQTT and file-drop tags only when their device and tag names are
/// literal text (no `{N}` topic level, `{column}` or `{file.*}`), and Sparkplug B metrics never:
/// those names exist only once messages or files arrive. A device's `[assets.devices.<name>]`
/// area, line and machine win over `[assets]`; a Modbus tag's own `description` over
/// `descriptions` there.
pub fn build(config: &AgentConfig, effective_at_us: i64) -> TagCatalog {
    let entry = Entry {
        site: &config.site,
        assets: &config.assets,
    };
    let mut tags = Vec::new();
    for device in &config.modbus {
        for tag in &device.tags {
            tags.push(entry.tag(
                &device.name,
                &tag.name,
                "modbus",
                tag.unit.as_deref(),
                tag.description.as_deref(),
                tag.data_type.name(),
            ));
        }
    }
    for subscription in config.mqtt.iter().flat_map(|broker| &broker.subscriptions) {
        if subscription.payload == PayloadFormat::SparkplugB || is_template(&subscription.device) {
            continue;
        }
        let device = &subscription.device;
        if let Some(tag) = &subscription.tag
            && !is_template(tag)
        {
            tags.push(entry.tag(
                device,
                tag,
                "mqtt",
                subscription.unit.as_deref(),
                None,
                value_type_name(subscription.value_type),
            ));
        }
        for field in &subscription.fields {
            if is_template(&field.tag) {
                continue;
            }
            tags.push(entry.tag(
                device,
                &field.tag,
                "mqtt",
                field.unit.as_deref().or(subscription.unit.as_deref()),
                None,
                value_type_name(field.value_type.unwrap_or(subscription.value_type)),
            ));
        }
    }
    for drop in config.file_drop.iter().filter(|d| !is_template(&d.device)) {
        for value in &drop.values {
            let tag = value.tag.as_deref().unwrap_or(&value.column);
            if is_template(tag) {
                continue;
            }
            tags.push(entry.tag(
                &drop.device,
                tag,
                "file_drop",
                value.unit.as_deref(),
                None,
                value_type_name(value.value_type),
            ));
        }
    }
    TagCatalog::new(&config.gateway, effective_at_us, tags)
}

/// Whether a device or tag name is built at run time from the message or the file.
fn is_template(name: &str) -> bool {
    name.contains('{')
}

fn value_type_name(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::Number => "number",
        ValueType::String => "string",
    }
}

/// What every entry of one map shares.
struct Entry<'a> {
    site: &'a str,
    assets: &'a Assets,
}

impl Entry<'_> {
    fn tag(
        &self,
        device: &str,
        tag: &str,
        source: &str,
        unit: Option<&str>,
        description: Option<&str>,
        data_type: &str,
    ) -> CatalogTag {
        let own = self.assets.devices.get(device);
        let pick = |own: Option<&Option<String>>, gateway: &Option<String>| {
            own.and_then(Option::as_ref).or(gateway.as_ref()).cloned()
        };
        CatalogTag {
            device: device.to_owned(),
            tag: tag.to_owned(),
            source: source.to_owned(),
            site: self.site.to_owned(),
            area: pick(own.map(|d| &d.area), &self.assets.area),
            line: pick(own.map(|d| &d.line), &self.assets.line),
            machine: pick(own.map(|d| &d.machine), &self.assets.machine),
            unit: unit.map(str::to_owned),
            description: description
                .or_else(|| {
                    own.and_then(|d| d.descriptions.get(tag))
                        .map(String::as_str)
                })
                .map(str::to_owned),
            data_type: data_type.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> AgentConfig {
        crate::config::load_str(text, std::path::Path::new("agent.toml"))
            .unwrap_or_else(|e| panic!("the test map is valid: {e}"))
    }

    const MAP: &str = r#"site = "plant-ost"
gateway = "gw-line1"
[upload.dir]
path = "outbox"

[assets]
area = "press-shop"
line = "line1"

[assets.devices.press-3]
machine = "press-3"
[assets.devices.press-3.descriptions]
stroke_count = "Strokes since the last reset"

[assets.devices.meter-1]
area = "utilities"

[[modbus]]
name = "press-3"
host = "127.0.0.1"
[[modbus.tags]]
name = "oil_temp"
register = "holding"
address = 0
type = "f32"
unit = "degC"
description = "Hydraulic oil temperature"
[[modbus.tags]]
name = "stroke_count"
register = "holding"
address = 2
type = "u32"

[[modbus]]
name = "meter-1"
host = "127.0.0.1"
[[modbus.tags]]
name = "power"
register = "input"
address = 0
type = "f32"
unit = "kW"

[[file_drop]]
name = "stand"
folder = "drop"
format = "csv"
timestamp = "time"
timestamp_format = "rfc3339"
device = "{station}"
[[file_drop.values]]
column = "force"
"#;

    #[test]
    fn every_literal_tag_is_listed_with_its_device_or_gateway_assets() {
        let catalog = build(&load(MAP), 42);
        let names: Vec<(&str, &str)> = catalog
            .tags
            .iter()
            .map(|t| (t.device.as_str(), t.tag.as_str()))
            .collect();
        // The dropped files name their device per row: not in the catalog.
        assert_eq!(
            names,
            [
                ("meter-1", "power"),
                ("press-3", "oil_temp"),
                ("press-3", "stroke_count")
            ]
        );
        let meter = &catalog.tags[0];
        assert_eq!(meter.area.as_deref(), Some("utilities"));
        assert_eq!(meter.line.as_deref(), Some("line1"));
        assert_eq!(meter.machine, None);
        let oil = &catalog.tags[1];
        assert_eq!(oil.machine.as_deref(), Some("press-3"));
        assert_eq!(oil.area.as_deref(), Some("press-shop"));
        assert_eq!(
            oil.description.as_deref(),
            Some("Hydraulic oil temperature")
        );
        assert_eq!(oil.data_type, "f32");
        assert_eq!(oil.unit.as_deref(), Some("degC"));
        assert_eq!(oil.site, "plant-ost");
        assert_eq!(
            catalog.tags[2].description.as_deref(),
            Some("Strokes since the last reset")
        );
        assert_eq!(catalog.effective_at_us, 42);
        assert_eq!(build(&load(MAP), 43).hash, catalog.hash);
    }
}
