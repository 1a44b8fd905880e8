//! The source supervisor: runs every source of the sensor map as a *unit* and applies an edited
//! map by touching only the units that changed.
//!
//! A unit is one task with one config value, keyed by kind and name: `modbus/<device>` (one
//! Modbus TCP device), `modbus_bus/<bus>` (one Modbus RTU bus with the `[[modbus]]` devices that
//! name it), `mqtt/<broker>` (one broker with its subscriptions), `file_drop/<name>` (one
//! watched folder). [`Supervisor::apply`] compares the running units with the units of a new
//! map ([`plan`]): equal ones are kept, changed ones restarted with their new config, removed ones
//! stopped, new ones started.
//!
//! # What always holds
//! - A unit whose config is equal in the new map (every key of its table, tags and
//!   subscriptions included) keeps running untouched: the same task, the same connection, the
//!   same learned read plan and report-by-exception state. Editing one device never reconnects
//!   another, except the devices that share its bus (a bus unit is the bus and all its devices).
//! - A unit is stopped only by cancelling its own child token. It then ends the way it ends at
//!   shutdown: readings it already handed to the buffer writer stay there and are committed; an
//!   MQTT broker acknowledges what was committed and leaves the rest to the broker to send
//!   again; a file drop waits for the commit of its current chunk and goes on from the next
//!   row when started again. A Modbus read in flight is abandoned (the value is read again by the
//!   next poll). The buffer writer and the batcher are not part of the supervisor and run
//!   throughout, so nothing committed or uploaded is affected by a reload.
//! - Stopped and changed units are stopped before new and changed ones start, and waited for
//!   at most [`UNIT_STOP_DEADLINE`], so a client id or a folder that moves from one unit to
//!   another is not used twice at once.
//! - At most one task per key runs at any instant: the replacement of a unit that overran the
//!   deadline starts only once its predecessor has ended.
//! - A unit that ended by itself (the reading channel closed, a config built in code that its
//!   source refuses) is logged and started again by the next [`Supervisor::apply`], even when its
//!   config did not change.
//! - Names are unique per kind (`validate` refuses duplicates); should a config built in code
//!   repeat one, the first unit of that key runs and the others are logged and left out.
//!
//! # Adding a kind of unit
//! A new source kind needs a [`UnitKind`] variant with its name, a [`UnitConfig`] variant
//! holding everything its task reads (as `ModbusBus` holds the bus and its devices, so editing
//! one device of a bus restarts the bus task), a loop in [`units`] and an arm in
//! `UnitConfig::run`. The config value must be `PartialEq`: equality is what keeps a unit
//! running.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::{Delivery, file_drop, modbus, mqtt};
use crate::Reading;
use crate::config::{AgentConfig, FileDrop, ModbusBus, ModbusDevice, MqttBroker};

/// How long [`Supervisor::apply`] waits for the units it stops before it starts the others.
pub const UNIT_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The kinds of unit, in the order the keys sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitKind {
    /// One `[[modbus]]` device.
    Modbus,
    /// One `[[mqtt]]` broker with its subscriptions.
    Mqtt,
    /// One `[[file_drop]]` folder.
    FileDrop,
    /// One `[[modbus_bus]]` with the `[[modbus]]` devices on it.
    ModbusBus,
}

impl UnitKind {
    /// The name used in keys and logs; it is the config table's name.
    pub fn name(self) -> &'static str {
        match self {
            UnitKind::Modbus => "modbus",
            UnitKind::Mqtt => "mqtt",
            UnitKind::FileDrop => "file_drop",
            UnitKind::ModbusBus => "modbus_bus",
        }
    }
}

/// A unit's identity across reloads: kind and name, shown as `modbus/press-3`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitKey {
    pub kind: UnitKind,
    pub name: String,
}

impl UnitKey {
    pub fn new(kind: UnitKind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for UnitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.name(), self.name)
    }
}

/// Everything one unit's task reads from the config. Two equal values mean the running task
/// can stay.
#[derive(Debug, Clone, PartialEq)]
pub enum UnitConfig {
    Modbus(Arc<ModbusDevice>),
    Mqtt(MqttBroker),
    FileDrop(FileDrop),
    /// A bus and its slaves: editing one slave restarts the bus task.
    ModbusBus(ModbusBus, Vec<Arc<ModbusDevice>>),
}

impl UnitConfig {
    pub fn key(&self) -> UnitKey {
        match self {
            UnitConfig::Modbus(device) => UnitKey::new(UnitKind::Modbus, &device.name),
            UnitConfig::Mqtt(broker) => UnitKey::new(UnitKind::Mqtt, &broker.name),
            UnitConfig::FileDrop(drop) => UnitKey::new(UnitKind::FileDrop, &drop.name),
            UnitConfig::ModbusBus(bus, _) => UnitKey::new(UnitKind::ModbusBus, &bus.name),
        }
    }

    /// The unit's task, which ends when `stop` is cancelled.
    fn run(
        self,
        context: &SourceContext,
        stop: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        match self {
            UnitConfig::Modbus(device) => Box::pin(modbus::run_device_with_memory(
                device,
                context.buffer.clone(),
                context.readings.clone(),
                stop,
            )),
            UnitConfig::Mqtt(broker) => Box::pin(mqtt::run_broker(
                broker,
                context.buffer.clone(),
                context.deliveries.clone(),
                stop,
            )),
            UnitConfig::FileDrop(drop) => Box::pin(file_drop::run_file_drop(
                drop,
                context.buffer.clone(),
                context.deliveries.clone(),
                stop,
            )),
            UnitConfig::ModbusBus(bus, devices) => Box::pin(modbus::run_bus_with_memory(
                bus,
                devices,
                context.buffer.clone(),
                context.readings.clone(),
                stop,
            )),
        }
    }
}

/// The units of a config, by key. A repeated key keeps its first unit (see the module doc).
pub fn units(config: &AgentConfig) -> BTreeMap<UnitKey, UnitConfig> {
    let all = config
        .modbus
        .iter()
        .filter(|device| device.bus.is_none())
        .map(|device| UnitConfig::Modbus(Arc::new(device.clone())))
        .chain(config.mqtt.iter().cloned().map(UnitConfig::Mqtt))
        .chain(config.file_drop.iter().cloned().map(UnitConfig::FileDrop))
        .chain(config.modbus_bus.iter().map(|bus| {
            let on_bus = |device: &&ModbusDevice| device.bus.as_ref() == Some(&bus.name);
            let slaves = config
                .modbus
                .iter()
                .filter(on_bus)
                .map(|device| Arc::new(device.clone()))
                .collect();
            UnitConfig::ModbusBus(bus.clone(), slaves)
        }));
    let mut units = BTreeMap::new();
    for unit in all {
        let key = unit.key();
        if units.contains_key(&key) {
            error!(
                component = "sources",
                unit = %key,
                "a second source named `{}` is left out; give each [[{}]] its own name",
                key.name,
                key.kind.name()
            );
            continue;
        }
        units.insert(key, unit);
    }
    units
}

/// What [`Supervisor::apply`] does with each unit, every list in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running with an equal config: left alone.
    pub keep: Vec<UnitKey>,
    /// Running with a different config, or ended by itself: stopped and started again.
    pub restart: Vec<UnitKey>,
    /// Not running: started.
    pub start: Vec<UnitKey>,
    /// Running but gone from the new config: stopped.
    pub stop: Vec<UnitKey>,
}

impl Plan {
    /// Whether applying the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.restart.is_empty() && self.start.is_empty() && self.stop.is_empty()
    }
}

/// Compares the running units (`ended` names those whose task has ended by itself) with the
/// units of a new config.
pub fn plan(
    running: &BTreeMap<UnitKey, UnitConfig>,
    ended: &BTreeSet<UnitKey>,
    desired: &BTreeMap<UnitKey, UnitConfig>,
) -> Plan {
    let mut plan = Plan::default();
    for (key, config) in desired {
        match running.get(key) {
            Some(current) if current == config && !ended.contains(key) => {
                plan.keep.push(key.clone());
            }
            Some(_) => plan.restart.push(key.clone()),
            None => plan.start.push(key.clone()),
        }
    }
    plan.stop = running
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .cloned()
        .collect();
    plan
}

/// What the sources send to and share with the rest of the agent.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Polled readings, to the buffer writer.
    pub readings: mpsc::Sender<Reading>,
    /// Readings acknowledged after their commit, to the buffer writer.
    pub deliveries: mpsc::Sender<Delivery>,
    /// The buffer file (file drops keep their progress in it).
    pub buffer: PathBuf,
}

/// What one [`Supervisor::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub plan: Plan,
    /// Units that had not stopped within [`UNIT_STOP_DEADLINE`]; a replacement of one of them
    /// starts as soon as it has.
    pub overran: Vec<UnitKey>,
}

struct Unit {
    config: UnitConfig,
    stop: CancellationToken,
    /// Turns true when the task has ended (the sender is dropped if it was aborted).
    done: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Unit {
    fn has_ended(&self) -> bool {
        self.task.is_finished()
    }
}

/// Runs the units of the sensor map (see the module doc).
pub struct Supervisor {
    context: SourceContext,
    root: CancellationToken,
    tracker: TaskTracker,
    units: BTreeMap<UnitKey, Unit>,
}

impl Supervisor {
    /// Starts every unit of `config`. Each unit's token is a child of `shutdown`.
    pub fn start(
        config: &AgentConfig,
        context: SourceContext,
        shutdown: &CancellationToken,
    ) -> Self {
        let mut supervisor = Self {
            context,
            root: shutdown.child_token(),
            tracker: TaskTracker::new(),
            units: BTreeMap::new(),
        };
        for (key, unit) in units(config) {
            supervisor.spawn(key, unit, None);
        }
        supervisor
    }

    /// The keys of the units that run now.
    pub fn running(&self) -> impl Iterator<Item = &UnitKey> {
        self.units.keys()
    }

    /// Makes the running units those of `config`: see [`plan`] and the module doc. Returns once
    /// the stopped units have ended (or [`UNIT_STOP_DEADLINE`] passed) and the new ones were
    /// started.
    pub async fn apply(&mut self, config: &AgentConfig) -> Applied {
        let desired = units(config);
        let running: BTreeMap<UnitKey, UnitConfig> = self
            .units
            .iter()
            .map(|(key, unit)| (key.clone(), unit.config.clone()))
            .collect();
        let ended: BTreeSet<UnitKey> = self
            .units
            .iter()
            .filter(|(_, unit)| unit.has_ended())
            .map(|(key, _)| key.clone())
            .collect();
        let plan = plan(&running, &ended, &desired);

        let mut stopping = Vec::new();
        let mut predecessors = BTreeMap::new();
        for key in &plan.stop {
            if let Some(unit) = self.units.remove(key) {
                unit.stop.cancel();
                stopping.push((key.clone(), unit.done));
            }
        }
        for key in &plan.restart {
            if let Some(unit) = self.units.remove(key) {
                unit.stop.cancel();
                stopping.push((key.clone(), unit.done.clone()));
                predecessors.insert(key.clone(), unit.done);
            }
        }
        let deadline = tokio::time::Instant::now() + UNIT_STOP_DEADLINE;
        let mut overran = Vec::new();
        for (key, mut done) in stopping {
            // An error means the task was aborted: it has ended too.
            if tokio::time::timeout_at(deadline, done.wait_for(|ended| *ended))
                .await
                .is_err()
            {
                warn!(
                    component = "sources",
                    unit = %key,
                    "the source has not stopped within {}s; its replacement, if any, starts once it has",
                    UNIT_STOP_DEADLINE.as_secs()
                );
                overran.push(key);
            }
        }
        for key in plan.restart.iter().chain(&plan.start) {
            if let Some(unit) = desired.get(key) {
                let before = predecessors.remove(key);
                self.spawn(key.clone(), unit.clone(), before);
            }
        }
        Applied { plan, overran }
    }

    /// Starts `unit` on the tracker; with `before`, only once that task has ended.
    fn spawn(&mut self, key: UnitKey, unit: UnitConfig, before: Option<watch::Receiver<bool>>) {
        let stop = self.root.child_token();
        let (done_tx, done) = watch::channel(false);
        let task = unit.clone().run(&self.context, stop.clone());
        let token = stop.clone();
        let name = key.clone();
        let handle = self.tracker.spawn(async move {
            if let Some(mut before) = before {
                // An error means the predecessor was aborted, which also ends it.
                let _ = before.wait_for(|ended| *ended).await;
            }
            if !token.is_cancelled() {
                task.await;
                if !token.is_cancelled() {
                    warn!(
                        component = "sources",
                        unit = %name,
                        "the source ended by itself; the next config reload starts it again"
                    );
                }
            }
            let _ = done_tx.send(true);
        });
        self.units.insert(
            key,
            Unit {
                config: unit,
                stop,
                done,
                task: handle,
            },
        );
    }

    /// Stops every unit and waits for them up to `deadline`; a unit still running then is
    /// aborted (and logged). Dropping the supervisor's senders afterwards lets the buffer writer
    /// finish once the last unit's readings are committed. Returns whether every unit stopped
    /// in time.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        self.root.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        for (key, unit) in &self.units {
            if !unit.has_ended() {
                error!(
                    component = "sources",
                    unit = %key,
                    "the source did not stop within {}s; it is aborted",
                    deadline.as_secs()
                );
                unit.task.abort();
            }
        }
        self.tracker.wait().await;
        false
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::config::ConfigDuration;

    /// A Modbus TCP device with u16 tags at holding 0, 1, ..., as a sensor map writes it.
    fn device(name: &str, tags: &[&str]) -> UnitConfig {
        let mut text = format!(
            "site = \"s\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n[[modbus]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\n"
        );
        for (address, tag) in tags.iter().enumerate() {
            let _ = write!(
                text,
                "[[modbus.tags]]\nname = \"{tag}\"\nregister = \"holding\"\naddress = {address}\ntype = \"u16\"\n"
            );
        }
        let mut config =
            crate::config::load_str(&text, std::path::Path::new("plant.toml")).unwrap();
        UnitConfig::Modbus(Arc::new(config.modbus.remove(0)))
    }

    fn map(units: &[UnitConfig]) -> BTreeMap<UnitKey, UnitConfig> {
        units.iter().map(|u| (u.key(), u.clone())).collect()
    }

    fn keys(names: &[&str]) -> Vec<UnitKey> {
        names
            .iter()
            .map(|name| UnitKey::new(UnitKind::Modbus, *name))
            .collect()
    }

    #[test]
    fn keys_name_the_kind_and_the_source() {
        assert_eq!(
            device("press-3", &["t"]).key().to_string(),
            "modbus/press-3"
        );
        assert_eq!(
            UnitKey::new(UnitKind::FileDrop, "stand-2").to_string(),
            "file_drop/stand-2"
        );
        assert_eq!(
            UnitKey::new(UnitKind::Mqtt, "line2").to_string(),
            "mqtt/line2"
        );
    }

    #[test]
    fn equal_units_are_kept_changed_ones_restarted_removed_ones_stopped_new_ones_started() {
        let running = map(&[
            device("a", &["t1"]),
            device("b", &["t1"]),
            device("c", &["t1"]),
        ]);
        let desired = map(&[
            device("a", &["t1"]),
            device("b", &["t1", "t2"]),
            device("d", &["t1"]),
        ]);
        assert_eq!(
            plan(&running, &BTreeSet::new(), &desired),
            Plan {
                keep: keys(&["a"]),
                restart: keys(&["b"]),
                start: keys(&["d"]),
                stop: keys(&["c"]),
            }
        );
    }

    #[test]
    fn any_key_of_a_unit_counts_as_a_change() {
        let running = map(&[device("a", &["t1"])]);
        let UnitConfig::Modbus(edited) = device("a", &["t1"]) else {
            unreachable!()
        };
        let mut edited = Arc::unwrap_or_clone(edited);
        edited.tags[0].scale = 0.1;
        let desired = map(&[UnitConfig::Modbus(Arc::new(edited.clone()))]);
        assert_eq!(
            plan(&running, &BTreeSet::new(), &desired).restart,
            keys(&["a"])
        );
        edited.tags[0].scale = 1.0;
        edited.poll_interval = ConfigDuration::from_millis(500);
        let desired = map(&[UnitConfig::Modbus(Arc::new(edited))]);
        assert_eq!(
            plan(&running, &BTreeSet::new(), &desired).restart,
            keys(&["a"])
        );
    }

    #[test]
    fn the_same_map_changes_nothing() {
        let running = map(&[device("a", &["t1"]), device("b", &["t2"])]);
        let plan = plan(&running, &BTreeSet::new(), &running.clone());
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan.keep, keys(&["a", "b"]));
    }

    #[test]
    fn a_unit_that_ended_by_itself_is_started_again_even_when_unchanged() {
        let running = map(&[device("a", &["t1"]), device("b", &["t2"])]);
        let ended = keys(&["b"]).into_iter().collect();
        let plan = plan(&running, &ended, &running.clone());
        assert_eq!(plan.keep, keys(&["a"]));
        assert_eq!(plan.restart, keys(&["b"]));
    }

    #[test]
    fn units_of_different_kinds_with_one_name_are_different_units() {
        let text = r#"site = "s"
gateway = "gw-1"

[upload.dir]
path = "out"

[[modbus]]
name = "line2"
host = "127.0.0.1"

  [[modbus.tags]]
  name = "t"
  register = "holding"
  address = 0
  type = "u16"

[[mqtt]]
name = "line2"
host = "127.0.0.1"
client_id = "gw-1"

  [[mqtt.subscriptions]]
  topic = "plant/+/temp"
  device = "{1}"
  tag = "temp"
  value = "/v"
"#;
        let config = crate::config::load_str(text, std::path::Path::new("plant.toml")).unwrap();
        let units = units(&config);
        let names: Vec<String> = units.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["modbus/line2", "mqtt/line2"]);
    }

    /// Two TCP devices and a bus with two slaves; `edit` changes the text first.
    fn plant_with_a_bus(edit: impl Fn(String) -> String) -> BTreeMap<UnitKey, UnitConfig> {
        let mut text = r#"site = "s"
gateway = "gw-1"

[upload.dir]
path = "out"

[[modbus_bus]]
name = "rs485"
transport = "rtu_over_tcp"
host = "127.0.0.1"
port = 4001
"#
        .to_owned();
        for (name, bus, address) in [
            ("press-1", None, 0),
            ("press-2", None, 0),
            ("meter-1", Some(1), 0),
            ("meter-2", Some(2), 0),
        ] {
            let link = match bus {
                Some(unit) => format!("bus = \"rs485\"\nunit_id = {unit}"),
                None => "host = \"127.0.0.1\"".to_owned(),
            };
            let _ = write!(
                text,
                "\n[[modbus]]\nname = \"{name}\"\n{link}\n[[modbus.tags]]\nname = \"t\"\nregister = \"holding\"\naddress = {address}\ntype = \"u16\"\n"
            );
        }
        let text = edit(text);
        let config = crate::config::load_str(&text, std::path::Path::new("plant.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        units(&config)
    }

    #[test]
    fn the_devices_on_a_bus_are_one_unit_with_the_bus() {
        let running = plant_with_a_bus(|text| text);
        let names: Vec<String> = running.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            ["modbus/press-1", "modbus/press-2", "modbus_bus/rs485"]
        );
        // A tag of one slave changes: the bus restarts, the TCP devices stay.
        let desired = plant_with_a_bus(|text| {
            let at = text.find("name = \"meter-2\"").unwrap();
            let (head, tail) = text.split_at(at);
            format!(
                "{head}{}",
                tail.replacen("type = \"u16\"", "type = \"i16\"", 1)
            )
        });
        let plan = plan(&running, &BTreeSet::new(), &desired);
        assert_eq!(plan.restart, [UnitKey::new(UnitKind::ModbusBus, "rs485")]);
        assert_eq!(plan.keep, keys(&["press-1", "press-2"]));
        assert!(plan.start.is_empty() && plan.stop.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_repeated_name_in_a_config_built_in_code_keeps_the_first_unit() {
        let text = r#"site = "s"
gateway = "gw-1"

[upload.dir]
path = "out"
"#;
        let mut config = crate::config::load_str(text, std::path::Path::new("plant.toml")).unwrap();
        let (UnitConfig::Modbus(first), UnitConfig::Modbus(second)) =
            (device("a", &["t1"]), device("a", &["t2"]))
        else {
            unreachable!()
        };
        config.modbus = vec![(*first).clone(), Arc::unwrap_or_clone(second)];
        assert_eq!(
            units(&config).into_values().collect::<Vec<_>>(),
            [UnitConfig::Modbus(first)]
        );
    }
}
