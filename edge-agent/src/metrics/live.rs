//! The agent's live picture for the status page: the last value of every tag, the health of
//! every device, and the state of the sensor map in force.
//!
//! # What always holds
//! - A tag's entry is replaced only by a reading that was committed to the buffer (the same
//!   point where [`super::Metrics::readings_committed`] counts it), so the page never shows a
//!   value the agent could still lose.
//! - A newer reading never loses to an older one: a file-drop source may commit old log rows
//!   after live ones, and the page keeps the latest by reading time.
//! - The table is bounded by [`MAX_TAGS`] entries: a misbehaving MQTT publisher that invents a
//!   new tag name per message cannot grow the agent's memory without limit. Tags beyond it are
//!   counted, not shown.
//! - A device counts as failing from its first error until a good reading arrives after it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Reading;
use crate::contract::Quality;

/// Most tags the live table holds. Well above a large gateway's sensor map (10,000 tags).
pub(super) const MAX_TAGS: usize = 50_000;

/// The last committed reading of one tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TagState {
    pub device: String,
    pub tag: String,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub quality: &'static str,
    /// When the value was read, microseconds since the Unix epoch.
    pub ts_us: i64,
}

/// How one device is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceState {
    pub device: String,
    /// Readings committed from this device since the agent started.
    pub readings: u64,
    /// Of those, readings with bad quality.
    pub bad: u64,
    /// When the last good or uncertain reading was read (µs since the epoch); `None` before one.
    pub last_good_us: Option<i64>,
    /// The last error the device's source reported, while it lasts.
    pub last_error: Option<String>,
    /// When that error was reported (ms since the epoch).
    pub last_error_ms: Option<u64>,
}

/// The sensor map in force and the last attempt to change it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MapState {
    /// The file the map was loaded from (empty when it was built in code, as in the demo).
    pub path: String,
    pub site: String,
    pub gateway: String,
    /// When the map in force was loaded (ms since the epoch).
    pub loaded_ms: u64,
    /// The validation report of the last rejected edit, until a later edit is applied.
    pub rejected: Option<String>,
}

/// A tag's last reading as the table keeps it: its names are the keys it is filed under, so
/// taking a new reading allocates nothing (unless the unit changed), at any number of tags. The
/// unit is shared with every other tag of that unit (a gateway has a handful of units and
/// thousands of tags): 48 bytes a tag plus its name.
#[derive(Debug)]
struct TagEntry {
    value: Option<f64>,
    ts_us: i64,
    unit: Option<Arc<str>>,
    quality: Quality,
}

#[derive(Debug, Default)]
struct Inner {
    /// Device, then tag: the page's order.
    tags: BTreeMap<String, BTreeMap<Box<str>, TagEntry>>,
    /// The units the table holds, each once.
    units: BTreeSet<Arc<str>>,
    /// Entries in `tags`, held against [`MAX_TAGS`].
    tag_count: usize,
    tags_over_limit: u64,
    devices: BTreeMap<String, DeviceState>,
    map: MapState,
}

/// The live picture. Use [`live`].
#[derive(Debug, Default)]
pub struct Live {
    inner: Mutex<Inner>,
}

/// A copy of the live picture, as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSnapshot {
    pub tags: Vec<TagState>,
    /// Tags not shown because the table was full.
    pub tags_over_limit: u64,
    pub devices: Vec<DeviceState>,
    pub map: MapState,
}

/// The process's live picture.
pub fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(Live::default)
}

/// `unit` as the table's shared copy, added to `units` the first time it is seen. The set is
/// bounded like the table: past [`MAX_TAGS`] units (only a publisher that makes up units could
/// get there) a unit gets a copy of its own.
fn intern(units: &mut BTreeSet<Arc<str>>, unit: Option<&str>) -> Option<Arc<str>> {
    let unit = unit?;
    if let Some(shared) = units.get(unit) {
        return Some(Arc::clone(shared));
    }
    let shared: Arc<str> = Arc::from(unit);
    if units.len() < MAX_TAGS {
        units.insert(Arc::clone(&shared));
    }
    Some(shared)
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere mid-update; the picture stays usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes readings whose commit to the buffer succeeded. Called for every commit (10,000
    /// readings a second on a large gateway), so known devices and tags are found by reference
    /// and updated in place.
    pub fn committed(&self, readings: &[Reading]) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        for r in readings {
            if !inner.devices.contains_key(r.device.as_str()) {
                inner.devices.insert(
                    r.device.clone(),
                    DeviceState {
                        device: r.device.clone(),
                        ..DeviceState::default()
                    },
                );
            }
            let device = inner
                .devices
                .get_mut(r.device.as_str())
                .expect("the device was inserted just above if it was missing");
            device.readings += 1;
            if r.quality == Quality::Bad {
                device.bad += 1;
            } else {
                device.last_good_us = Some(device.last_good_us.map_or(r.ts_us, |t| t.max(r.ts_us)));
                device.last_error = None;
                device.last_error_ms = None;
            }
            let known = inner
                .tags
                .get_mut(r.device.as_str())
                .and_then(|tags| tags.get_mut(r.tag.as_str()));
            match known {
                Some(old) if old.ts_us <= r.ts_us => {
                    old.value = r.value;
                    old.quality = r.quality;
                    old.ts_us = r.ts_us;
                    if old.unit.as_deref() != r.unit.as_deref() {
                        old.unit = intern(&mut inner.units, r.unit.as_deref());
                    }
                }
                Some(_) => {}
                None if inner.tag_count >= MAX_TAGS => inner.tags_over_limit += 1,
                None => {
                    let unit = intern(&mut inner.units, r.unit.as_deref());
                    inner.tags.entry(r.device.clone()).or_default().insert(
                        r.tag.as_str().into(),
                        TagEntry {
                            value: r.value,
                            ts_us: r.ts_us,
                            unit,
                            quality: r.quality,
                        },
                    );
                    inner.tag_count += 1;
                }
            }
        }
    }

    /// Records an error a device's source reported (a failed connection, a refused request).
    pub fn device_error(&self, device: &str, error: &dyn std::fmt::Display) {
        let mut inner = self.lock();
        let state = inner
            .devices
            .entry(device.to_owned())
            .or_insert_with(|| DeviceState {
                device: device.to_owned(),
                ..DeviceState::default()
            });
        state.last_error = Some(error.to_string());
        state.last_error_ms = Some(now_ms());
    }

    /// Records the sensor map now in force; clears an earlier rejection.
    pub fn map_loaded(&self, path: &str, site: &str, gateway: &str) {
        self.lock().map = MapState {
            path: path.to_owned(),
            site: site.to_owned(),
            gateway: gateway.to_owned(),
            loaded_ms: now_ms(),
            rejected: None,
        };
    }

    /// Records an edit of the sensor map that was refused, with its validation report; the map
    /// in force stays.
    pub fn map_rejected(&self, report: &str) {
        self.lock().map.rejected = Some(report.to_owned());
    }

    /// Forgets the tags and device of a source that was removed from the sensor map.
    pub fn forget_device(&self, device: &str) {
        let mut inner = self.lock();
        inner.devices.remove(device);
        if let Some(tags) = inner.tags.remove(device) {
            inner.tag_count -= tags.len();
        }
    }

    /// A copy for one page view, in device then tag order.
    pub fn snapshot(&self) -> LiveSnapshot {
        let inner = self.lock();
        LiveSnapshot {
            tags: inner
                .tags
                .iter()
                .flat_map(|(device, tags)| {
                    tags.iter().map(move |(tag, e)| TagState {
                        device: device.clone(),
                        tag: tag.to_string(),
                        value: e.value,
                        unit: e.unit.as_deref().map(str::to_owned),
                        quality: e.quality.as_str(),
                        ts_us: e.ts_us,
                    })
                })
                .collect(),
            tags_over_limit: inner.tags_over_limit,
            devices: inner.devices.values().cloned().collect(),
            map: inner.map.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, tag: &str, ts_us: i64, value: Option<f64>, q: Quality) -> Reading {
        Reading {
            ts_us,
            device: device.to_owned(),
            tag: tag.to_owned(),
            value,
            value_text: None,
            quality: q,
            unit: Some("degC".to_owned()),
        }
    }

    #[test]
    fn the_latest_reading_by_time_wins_and_devices_recover() {
        let live = Live::default();
        live.committed(&[reading("plc", "t", 200, Some(2.0), Quality::Good)]);
        // An older row committed later (a file-drop backlog) does not replace it.
        live.committed(&[reading("plc", "t", 100, Some(1.0), Quality::Good)]);
        assert_eq!(live.snapshot().tags[0].value, Some(2.0));

        live.device_error("plc", &"timeout after 1s");
        live.committed(&[reading("plc", "t", 300, None, Quality::Bad)]);
        let device = &live.snapshot().devices[0];
        assert_eq!(device.last_error.as_deref(), Some("timeout after 1s"));
        assert_eq!((device.readings, device.bad), (3, 1));

        live.committed(&[reading("plc", "t", 400, Some(4.0), Quality::Good)]);
        let snap = live.snapshot();
        assert_eq!(snap.devices[0].last_error, None);
        assert_eq!(snap.devices[0].last_good_us, Some(400));
        assert_eq!(snap.tags[0].quality, "good");
    }

    #[test]
    fn tags_of_one_unit_share_it_and_a_changed_unit_shows() {
        let live = Live::default();
        live.committed(&[
            reading("plc", "a", 1, Some(1.0), Quality::Good),
            reading("plc", "b", 1, Some(2.0), Quality::Good),
        ]);
        {
            let inner = live.lock();
            let tags = &inner.tags["plc"];
            let unit = |tag: &str| Arc::clone(tags[tag].unit.as_ref().unwrap());
            assert!(Arc::ptr_eq(&unit("a"), &unit("b")), "one copy of degC");
            assert_eq!(inner.units.len(), 1);
        }
        let mut bar = reading("plc", "a", 2, Some(3.0), Quality::Good);
        bar.unit = Some("bar".to_owned());
        let mut plain = reading("plc", "b", 2, Some(4.0), Quality::Uncertain);
        plain.unit = None;
        live.committed(&[bar, plain]);
        let snap = live.snapshot();
        assert_eq!(
            (snap.tags[0].tag.as_str(), snap.tags[0].unit.as_deref()),
            ("a", Some("bar"))
        );
        assert_eq!(
            (snap.tags[1].tag.as_str(), snap.tags[1].unit.as_deref()),
            ("b", None)
        );
        assert_eq!(
            (snap.tags[1].value, snap.tags[1].quality),
            (Some(4.0), "uncertain")
        );
    }

    #[test]
    fn a_rejected_edit_is_shown_until_the_next_map_is_loaded() {
        let live = Live::default();
        live.map_loaded("/etc/plantline/agent.toml", "plant", "gw-1");
        live.map_rejected("agent.toml:3: modbus[0].port: must be 1-65535");
        assert!(live.snapshot().map.rejected.is_some());
        live.map_loaded("/etc/plantline/agent.toml", "plant", "gw-1");
        assert_eq!(live.snapshot().map.rejected, None);
    }

    #[test]
    fn the_table_stops_growing_at_its_bound_and_a_removed_device_frees_room() {
        let live = Live::default();
        let flood: Vec<Reading> = (0..=MAX_TAGS)
            .map(|i| reading("mqtt", &format!("t{i}"), 1, Some(1.0), Quality::Good))
            .collect();
        live.committed(&flood);
        let snap = live.snapshot();
        assert_eq!((snap.tags.len(), snap.tags_over_limit), (MAX_TAGS, 1));
        // A known tag still takes new readings while the table is full.
        live.committed(&[reading("mqtt", "t0", 2, Some(5.0), Quality::Good)]);
        assert_eq!(live.snapshot().tags[0].value, Some(5.0));

        live.forget_device("mqtt");
        live.committed(&[reading("plc", "t", 1, Some(1.0), Quality::Good)]);
        assert_eq!(live.snapshot().tags.len(), 1);
    }

    #[test]
    fn a_removed_device_leaves_the_page() {
        let live = Live::default();
        live.committed(&[
            reading("a", "t", 1, Some(1.0), Quality::Good),
            reading("b", "t", 1, Some(1.0), Quality::Good),
        ]);
        live.forget_device("a");
        let snap = live.snapshot();
        assert_eq!(snap.tags.len(), 1);
        assert_eq!(snap.devices.len(), 1);
        assert_eq!(snap.tags[0].device, "b");
    }
}
