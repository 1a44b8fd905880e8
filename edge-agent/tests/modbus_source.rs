//! The Modbus TCP source against a real, independently written Modbus server: pymodbus 3.16 through
//! the shared peer harness (`pipeline_e2e::PyModbusServer`, `tests/peers/modbus_server.py`), started
//! by each test on 127.0.0.1. Typed register values are encoded by the peer with Python's `struct`,
//! independently of the agent's decoder.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;

use std::collections::HashMap;

use common::Poller;
use edge_agent::Reading;
use edge_agent::config::{
    Addressing, ByteOrder, ConfigDuration, DataType, ModbusDevice, ModbusTag, RegisterKind,
};
use edge_agent::contract::Quality;
use pipeline_e2e::{PyModbusServer, now_us};
use serde_json::{Value, json};

fn tag(name: &str, register: RegisterKind, address: u16, data_type: DataType) -> ModbusTag {
    ModbusTag::new(name, register, address, data_type)
}

fn ordered(tag: ModbusTag, byte_order: ByteOrder) -> ModbusTag {
    ModbusTag { byte_order, ..tag }
}

fn bit_of(name: &str, address: u16, bit: u8, byte_order: ByteOrder) -> ModbusTag {
    ModbusTag {
        bit: Some(bit),
        byte_order,
        ..tag(name, RegisterKind::Holding, address, DataType::Bit)
    }
}

fn device(plc: &PyModbusServer, tags: Vec<ModbusTag>) -> ModbusDevice {
    ModbusDevice {
        name: "press-3".to_owned(),
        host: "127.0.0.1".to_owned(),
        port: plc.address().port(),
        unit_id: 1,
        bus: None,
        inter_frame_delay: None,
        poll_interval: ConfigDuration::from_millis(100),
        timeout: ConfigDuration::from_millis(500),
        addressing: Addressing::ZeroBased,
        max_gap: ModbusDevice::DEFAULT_MAX_GAP,
        max_registers_per_request: None,
        max_bits_per_request: None,
        tags,
    }
}

/// A typed register entry, encoded by the peer.
fn typed(data_type: &str, order: &str, value: impl Into<Value>) -> Value {
    json!({"type": data_type, "order": order, "value": value.into()})
}

/// A tick's readings by tag.
fn by_tag(round: Vec<Reading>) -> HashMap<String, Reading> {
    round.into_iter().map(|r| (r.tag.clone(), r)).collect()
}

/// Asserts `(quality, value)` of every named tag in a round.
fn assert_round(round: &HashMap<String, Reading>, expected: &[(&str, Quality, Option<f64>)]) {
    for &(name, quality, value) in expected {
        let reading = &round[name];
        assert_eq!(
            (reading.quality, reading.value),
            (quality, value),
            "{name}: {reading:?}"
        );
    }
}

const ORDERS: [(ByteOrder, &str); 4] = [
    (ByteOrder::ABCD, "ABCD"),
    (ByteOrder::CDAB, "CDAB"),
    (ByteOrder::BADC, "BADC"),
    (ByteOrder::DCBA, "DCBA"),
];

/// 0x0102_0304_0506_0700: every byte distinct where it matters, and exact in an f64.
const U64_VALUE: u64 = 72_623_859_790_382_848;

// One table of cases, read top to bottom; splitting it would only scatter the cases.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn decodes_every_type_and_byte_order_from_a_real_plc() {
    let mut holding = serde_json::Map::new();
    let mut input = serde_json::Map::new();
    let put = |map: &mut serde_json::Map<String, Value>, address: u16, value: Value| {
        map.insert(address.to_string(), value);
    };
    put(&mut holding, 0, typed("u16", "ABCD", 65535));
    put(&mut holding, 1, typed("i16", "ABCD", -1));
    put(&mut holding, 2, typed("u16", "ABCD", 4500));
    put(&mut holding, 3, typed("i16", "ABCD", -200));
    put(&mut holding, 4, typed("u16", "BADC", 4500));
    put(&mut holding, 5, typed("i16", "DCBA", -200));
    let mut tags = vec![
        tag("u16_max", RegisterKind::Holding, 0, DataType::U16),
        tag("i16_minus_one", RegisterKind::Holding, 1, DataType::I16),
        ModbusTag {
            scale: 0.01,
            unit: Some("bar".to_owned()),
            ..tag("pressure", RegisterKind::Holding, 2, DataType::U16)
        },
        ModbusTag {
            scale: 0.1,
            offset: 50.0,
            ..tag("offset_temp", RegisterKind::Holding, 3, DataType::I16)
        },
        ordered(
            tag("u16_swapped", RegisterKind::Holding, 4, DataType::U16),
            ByteOrder::BADC,
        ),
        ordered(
            tag("i16_swapped", RegisterKind::Holding, 5, DataType::I16),
            ByteOrder::DCBA,
        ),
    ];
    let mut expected: Vec<(String, f64)> = vec![
        ("u16_max".into(), 65535.0),
        ("i16_minus_one".into(), -1.0),
        ("pressure".into(), 45.0),
        ("offset_temp".into(), 30.0),
        ("u16_swapped".into(), 4500.0),
        ("i16_swapped".into(), -200.0),
    ];
    for (i, (order, name)) in ORDERS.into_iter().enumerate() {
        let base = u16::try_from(100 + i * 100).unwrap();
        // (type, address offset, value the peer encodes, value the agent must read)
        let cases: [(DataType, &str, u16, Value, f64); 6] = [
            (
                DataType::F32,
                "f32",
                0,
                json!(123.456),
                123.456_001_281_738_28,
            ),
            (DataType::I32, "i32", 2, json!(-2), -2.0),
            (DataType::U32, "u32", 4, json!(4_000_000_000u32), 4e9),
            (
                DataType::U64,
                "u64",
                10,
                json!(U64_VALUE),
                72_623_859_790_382_848.0,
            ),
            (
                DataType::I64,
                "i64",
                20,
                json!(-72_623_859_790_382_848i64),
                -72_623_859_790_382_848.0,
            ),
            (DataType::F64, "f64", 30, json!(-1234.5678), -1234.5678),
        ];
        for (data_type, type_name, offset, value, read) in cases {
            let tag_name = format!("{type_name}_{name}");
            put(&mut holding, base + offset, typed(type_name, name, value));
            tags.push(ordered(
                tag(&tag_name, RegisterKind::Holding, base + offset, data_type),
                order,
            ));
            expected.push((tag_name, read));
        }
        put(&mut input, base, typed("f32", name, -0.5));
        tags.push(ordered(
            tag(
                &format!("input_f32_{name}"),
                RegisterKind::Input,
                base,
                DataType::F32,
            ),
            order,
        ));
        expected.push((format!("input_f32_{name}"), -0.5));
    }
    let plc = PyModbusServer::start(&json!({"device_id": 1, "holding": holding, "input": input}));
    let before = now_us();
    let mut poller = Poller::start(device(&plc, tags));
    let round = by_tag(poller.round().await);
    let after = now_us();

    assert_eq!(expected.len(), round.len());
    for (name, value) in &expected {
        let reading = &round[name];
        assert_eq!(reading.quality, Quality::Good, "{reading:?}");
        assert_eq!(reading.value, Some(*value), "{name}");
        assert_eq!(reading.device, "press-3");
        assert!((before..=after).contains(&reading.ts_us), "{reading:?}");
    }
    assert_eq!(round["pressure"].unit.as_deref(), Some("bar"));
    assert_eq!(round["u16_max"].unit, None);
    // All tags of one tick carry the tick's time.
    assert!(round.values().all(|r| r.ts_us == round["u16_max"].ts_us));
    poller.stop().await;
}

#[tokio::test]
async fn reads_coils_discrete_inputs_and_bits_of_a_status_word() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "coils": {"0": [true, false, true]},
        "discrete": {"8": [false, true]},
        // A status word with bits 0, 2 and 15 set, and the same word from a byte-swapping device.
        "holding": {"20": [0x8005], "21": [0x0580]},
    }));
    let mut poller = Poller::start(device(
        &plc,
        vec![
            tag("pump_on", RegisterKind::Coil, 0, DataType::Bool),
            tag("valve_open", RegisterKind::Coil, 1, DataType::Bool),
            tag("fan_on", RegisterKind::Coil, 2, DataType::Bool),
            tag("door_closed", RegisterKind::Discrete, 8, DataType::Bool),
            tag("estop_ok", RegisterKind::Discrete, 9, DataType::Bool),
            bit_of("running", 20, 0, ByteOrder::ABCD),
            bit_of("fault", 20, 1, ByteOrder::ABCD),
            bit_of("auto", 20, 2, ByteOrder::ABCD),
            bit_of("alarm", 20, 15, ByteOrder::ABCD),
            bit_of("swapped_alarm", 21, 15, ByteOrder::BADC),
            bit_of("swapped_bit_7", 21, 7, ByteOrder::DCBA),
            // Coils are a table of their own: the PLC has no coil 200 (pymodbus keeps bits in
            // 16-bit words, so coils 3-15 exist as cleared bits).
            tag("missing_coil", RegisterKind::Coil, 200, DataType::Bool),
        ],
    ));
    let round = by_tag(poller.round().await);
    let good = |v: f64| (Quality::Good, Some(v));
    let expected = [
        ("pump_on", good(1.0)),
        ("valve_open", good(0.0)),
        ("fan_on", good(1.0)),
        ("door_closed", good(0.0)),
        ("estop_ok", good(1.0)),
        ("running", good(1.0)),
        ("fault", good(0.0)),
        ("auto", good(1.0)),
        ("alarm", good(1.0)),
        ("swapped_alarm", good(1.0)),
        ("swapped_bit_7", good(0.0)),
        ("missing_coil", (Quality::Bad, None)),
    ];
    let expected: Vec<_> = expected.iter().map(|&(n, (q, v))| (n, q, v)).collect();
    assert_round(&round, &expected);
    poller.stop().await;
}

#[tokio::test]
async fn one_based_addressing_reads_address_one_as_wire_address_zero() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"0": [11], "1": [22], "9": {"type": "f32", "order": "CDAB", "value": 2.5}},
        "coils": {"0": [true, false]},
    }));
    let mut poller = Poller::start(ModbusDevice {
        addressing: Addressing::OneBased,
        ..device(
            &plc,
            vec![
                tag("first", RegisterKind::Holding, 1, DataType::U16),
                tag("second", RegisterKind::Holding, 2, DataType::U16),
                ordered(
                    tag("float_at_10", RegisterKind::Holding, 10, DataType::F32),
                    ByteOrder::CDAB,
                ),
                tag("coil_1", RegisterKind::Coil, 1, DataType::Bool),
                tag("coil_2", RegisterKind::Coil, 2, DataType::Bool),
                // Wire address 2 is not in the map: one-based 3 reads bad.
                tag("third", RegisterKind::Holding, 3, DataType::U16),
            ],
        )
    });
    let round = by_tag(poller.round().await);
    assert_round(
        &round,
        &[
            ("first", Quality::Good, Some(11.0)),
            ("second", Quality::Good, Some(22.0)),
            ("float_at_10", Quality::Good, Some(2.5)),
            ("coil_1", Quality::Good, Some(1.0)),
            ("coil_2", Quality::Good, Some(0.0)),
            ("third", Quality::Bad, None),
        ],
    );
    poller.stop().await;
}

#[tokio::test]
async fn values_outside_the_engineering_range_are_clamped_and_uncertain() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {
            "0": typed("i16", "ABCD", 1600),
            "1": typed("i16", "ABCD", 500),
            "2": typed("i16", "ABCD", -32768),
            "3": typed("i16", "ABCD", 1500),
        },
    }));
    let temp = |name: &str, address: u16| ModbusTag {
        scale: 0.1,
        range: Some([-20.0, 150.0]),
        unit: Some("degC".to_owned()),
        ..tag(name, RegisterKind::Holding, address, DataType::I16)
    };
    let mut poller = Poller::start(device(
        &plc,
        vec![
            temp("above", 0),
            temp("inside", 1),
            temp("broken_sensor", 2),
            temp("at_the_limit", 3),
        ],
    ));
    // Twice: clamping is stable from tick to tick.
    for _ in 0..2 {
        let round = by_tag(poller.round().await);
        assert_round(
            &round,
            &[
                ("above", Quality::Uncertain, Some(150.0)),
                ("inside", Quality::Good, Some(50.0)),
                ("broken_sensor", Quality::Uncertain, Some(-20.0)),
                ("at_the_limit", Quality::Good, Some(150.0)),
            ],
        );
        assert_eq!(round["above"].unit.as_deref(), Some("degC"));
    }
    poller.stop().await;
}

#[tokio::test]
async fn a_deadband_holds_back_unchanged_values_that_other_tags_still_send() {
    let plc = PyModbusServer::start(&json!({"device_id": 1, "holding": {"0": [400], "1": [7]}}));
    let mut poller = Poller::start(device(
        &plc,
        vec![
            ModbusTag {
                deadband: Some(0.5),
                ..tag("steady", RegisterKind::Holding, 0, DataType::U16)
            },
            tag("every", RegisterKind::Holding, 1, DataType::U16),
        ],
    ));
    // `steady` is read before `every` in each tick, so five ticks of `every` have passed five
    // reads of `steady`: only the first went out.
    let mut seen = Vec::new();
    while seen.iter().filter(|(tag, _)| tag == "every").count() < 5 {
        let reading = poller.next().await;
        seen.push((reading.tag, reading.value));
    }
    let steady: Vec<_> = seen.iter().filter(|(tag, _)| tag == "steady").collect();
    assert_eq!(steady, vec![&("steady".to_owned(), Some(400.0))]);
    poller.stop().await;
}

#[tokio::test]
async fn a_register_the_plc_does_not_have_reads_bad_and_the_other_tags_stay_good() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {"0": [7], "1": typed("f32", "ABCD", 1.5)},
    }));
    let mut poller = Poller::start(device(
        &plc,
        vec![
            tag("first", RegisterKind::Holding, 0, DataType::U16),
            tag("missing", RegisterKind::Holding, 500, DataType::U16),
            tag("wrong_table", RegisterKind::Input, 0, DataType::U16),
            tag("last", RegisterKind::Holding, 1, DataType::F32),
        ],
    ));
    // Two ticks: an exception does not cost the connection or the next tick.
    for _ in 0..2 {
        let round = by_tag(poller.round().await);
        assert_round(
            &round,
            &[
                ("first", Quality::Good, Some(7.0)),
                ("missing", Quality::Bad, None),
                ("wrong_table", Quality::Bad, None),
                ("last", Quality::Good, Some(1.5)),
            ],
        );
    }
    poller.stop().await;
}

#[tokio::test]
async fn reports_bad_while_the_plc_is_down_and_reconnects_by_itself() {
    let registers = json!({"device_id": 1, "holding": {"0": [42], "1": typed("i16", "ABCD", -3)}});
    let plc = PyModbusServer::start(&registers);
    let port = plc.address().port();
    let mut poller = Poller::start(device(
        &plc,
        vec![
            tag("a", RegisterKind::Holding, 0, DataType::U16),
            tag("b", RegisterKind::Holding, 1, DataType::I16),
        ],
    ));
    let round = by_tag(poller.round().await);
    assert_round(
        &round,
        &[
            ("a", Quality::Good, Some(42.0)),
            ("b", Quality::Good, Some(-3.0)),
        ],
    );

    drop(plc);
    // Every tick of the outage still yields one bad reading per tag.
    let round = by_tag(poller.round_with(Quality::Bad).await);
    assert_round(&round, &[("b", Quality::Bad, None)]);
    let round = by_tag(poller.round().await);
    assert_round(
        &round,
        &[("a", Quality::Bad, None), ("b", Quality::Bad, None)],
    );

    let _plc = PyModbusServer::start_on_port(&registers, port);
    let round = by_tag(poller.round_with(Quality::Good).await);
    assert_round(
        &round,
        &[
            ("a", Quality::Good, Some(42.0)),
            ("b", Quality::Good, Some(-3.0)),
        ],
    );
    poller.stop().await;
}

/// Coalescing against the real peer: a dense block of mixed types, byte orders and bits of one
/// word is read with shared requests, and a read that crosses registers the PLC does not have
/// (12-14) is refused, split and learned. Every value stays exact on the first tick (split on
/// the fly) and on the later ones (the learned plan).
#[tokio::test]
async fn coalesced_requests_keep_every_value_exact_on_a_real_plc() {
    let plc = PyModbusServer::start(&json!({
        "device_id": 1,
        "holding": {
            "0": typed("f32", "CDAB", 2.5),
            "2": typed("i16", "ABCD", -7),
            "3": [0x8001],
            "4": typed("u64", "DCBA", U64_VALUE),
            "8": typed("f64", "BADC", -1234.5678),
            "15": typed("u32", "ABCD", 70000),
        },
        "coils": {"0": [true, false, false, true]},
    }));
    let mut poller = Poller::start(device(
        &plc,
        vec![
            ordered(
                tag("flow", RegisterKind::Holding, 0, DataType::F32),
                ByteOrder::CDAB,
            ),
            tag("delta", RegisterKind::Holding, 2, DataType::I16),
            bit_of("running", 3, 0, ByteOrder::ABCD),
            bit_of("alarm", 3, 15, ByteOrder::ABCD),
            ordered(
                tag("energy", RegisterKind::Holding, 4, DataType::U64),
                ByteOrder::DCBA,
            ),
            ordered(
                tag("position", RegisterKind::Holding, 8, DataType::F64),
                ByteOrder::BADC,
            ),
            tag("count", RegisterKind::Holding, 15, DataType::U32),
            tag("pump", RegisterKind::Coil, 0, DataType::Bool),
            tag("fan", RegisterKind::Coil, 3, DataType::Bool),
        ],
    ));
    let good = |v: f64| (Quality::Good, Some(v));
    let expected = [
        ("flow", good(2.5)),
        ("delta", good(-7.0)),
        ("running", good(1.0)),
        ("alarm", good(1.0)),
        ("energy", good(72_623_859_790_382_848.0)),
        ("position", good(-1234.5678)),
        ("count", good(70000.0)),
        ("pump", good(1.0)),
        ("fan", good(1.0)),
    ];
    let expected: Vec<_> = expected.iter().map(|&(n, (q, v))| (n, q, v)).collect();
    for _ in 0..3 {
        assert_round(&by_tag(poller.round().await), &expected);
    }
    poller.stop().await;
}
