//! Decoding whole Sparkplug messages: births, data by alias and by name, deaths, seq gaps,
//! problems, and arbitrary bytes. Payloads are built with the same prost messages the decoder
//! reads; the integration test `mqtt_sparkplug` has them written by an independent encoder
//! (Python's protobuf runtime).

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

use prost::Message as _;

use super::proto::{
    Metric, MetricValue, Payload, PropertyScalar, PropertySet, PropertyValue, datatype,
};
use super::{Decoded, Decoder, SparkplugError};
use crate::Reading;
use crate::contract::Quality;

const ARRIVAL_US: i64 = 1_800_000_000_000_000;
const T0_MS: u64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

fn metric(name: &str, alias: u64, code: u32, value: MetricValue) -> Metric {
    Metric {
        name: Some(name.to_owned()),
        alias: Some(alias),
        datatype: Some(code),
        value: Some(value),
        ..Metric::default()
    }
}

/// A data metric by alias only, as edge nodes that use aliases send them.
fn by_alias(alias: u64, value: MetricValue) -> Metric {
    Metric {
        alias: Some(alias),
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(ts_ms: Option<u64>, seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: ts_ms,
        metrics,
        seq,
    }
    .encode_to_vec()
}

fn bd_seq(value: u64) -> Metric {
    metric("bdSeq", 0, datatype::INT64, MetricValue::Long(value))
}

fn good(ts_ms: u64, device: &str, tag: &str, value: f64) -> Reading {
    Reading {
        ts_us: i64::try_from(ts_ms).unwrap() * 1000,
        device: device.to_owned(),
        tag: tag.to_owned(),
        value: Some(value),
        value_text: None,
        quality: Quality::Good,
        unit: None,
    }
}

fn stale(ts_us: i64, device: &str, tag: &str) -> Reading {
    Reading {
        ts_us,
        device: device.to_owned(),
        tag: tag.to_owned(),
        value: None,
        value_text: None,
        quality: Quality::Bad,
        unit: None,
    }
}

fn reasons(decoded: &Decoded) -> Vec<&'static str> {
    decoded
        .problems
        .iter()
        .map(SparkplugError::reason)
        .collect()
}

/// The seq-gap count of `node` on `broker` in the process's registry (each test uses its own
/// broker name, so tests running at the same time do not share counters).
fn seq_gaps(broker: &str, node: &str) -> Option<u64> {
    // The MQTT counters are rendered once a broker's source started, as it does before decoding.
    crate::metrics::global().mqtt_broker_started(broker);
    let text = crate::metrics::global().render(None, std::time::SystemTime::UNIX_EPOCH);
    let series =
        format!("plantline_mqtt_sparkplug_seq_gaps_total{{broker=\"{broker}\",node=\"{node}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|n| n.parse().unwrap())
}

/// One metric of every numeric datatype and a Boolean, each with its alias.
fn every_datatype(values: [MetricValue; 11]) -> Vec<Metric> {
    let names = [
        "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "f32", "f64", "on",
    ];
    let codes = [
        datatype::INT8,
        datatype::INT16,
        datatype::INT32,
        datatype::INT64,
        datatype::UINT8,
        datatype::UINT16,
        datatype::UINT32,
        datatype::UINT64,
        datatype::FLOAT,
        datatype::DOUBLE,
        datatype::BOOLEAN,
    ];
    names
        .into_iter()
        .zip(codes)
        .zip(values)
        .zip(1_u64..)
        .map(|(((name, code), value), alias)| metric(name, alias, code, value))
        .collect()
}

#[test]
fn every_numeric_datatype_and_booleans_decode_from_the_birth_and_by_alias() {
    let node_decoder = Decoder::new("sp-types");
    let topic = "spBv1.0/line3/NBIRTH/press-7";
    let mut birth = every_datatype([
        MetricValue::Int(0xFFFF_FF85), // -123 sign-extended
        MetricValue::Int(0x8000),      // -32768 in its own width
        MetricValue::Int(0xFFFF_FFFF),
        MetricValue::Long(u64::MAX - 1),
        MetricValue::Int(255),
        MetricValue::Int(65_535),
        MetricValue::Long(4_000_000_000),
        MetricValue::Long(1 << 53),
        MetricValue::Float(21.5),
        MetricValue::Double(-0.001),
        MetricValue::Boolean(true),
    ]);
    birth.insert(0, bd_seq(3));
    let decoded = node_decoder.decode(topic, &payload(Some(T0_MS), Some(0), birth), ARRIVAL_US);
    assert_eq!(decoded.problems, vec![]);
    let expected: Vec<Reading> = [
        ("i8", -123.0),
        ("i16", -32_768.0),
        ("i32", -1.0),
        ("i64", -2.0),
        ("u8", 255.0),
        ("u16", 65_535.0),
        ("u32", 4_000_000_000.0),
        ("u64", 9_007_199_254_740_992.0),
        ("f32", 21.5),
        ("f64", -0.001),
        ("on", 1.0),
    ]
    .into_iter()
    .map(|(tag, value)| good(T0_MS, "press-7", tag, value))
    .collect();
    assert_eq!(decoded.readings, expected, "bdSeq gives no reading");

    // NDATA by alias only, each value at its own time.
    let values = [
        MetricValue::Int(7),
        MetricValue::Int(0xFFFF_8001),
        MetricValue::Int(0x7FFF_FFFF),
        MetricValue::Long(1 << 40),
        MetricValue::Int(0),
        MetricValue::Int(1),
        MetricValue::Int(u32::MAX),
        MetricValue::Long(0),
        MetricValue::Float(-3.25),
        MetricValue::Double(1e300),
        MetricValue::Boolean(false),
    ];
    let data: Vec<Metric> = values
        .into_iter()
        .zip(1_u64..)
        .map(|(value, alias)| Metric {
            timestamp: Some(T0_MS + alias),
            ..by_alias(alias, value)
        })
        .collect();
    let decoded = node_decoder.decode(
        "spBv1.0/line3/NDATA/press-7",
        &payload(Some(T0_MS + 100), Some(1), data),
        ARRIVAL_US,
    );
    assert_eq!(decoded.problems, vec![]);
    let expected: Vec<Reading> = [
        ("i8", 7.0),
        ("i16", -32_767.0),
        ("i32", 2_147_483_647.0),
        ("i64", 1_099_511_627_776.0),
        ("u8", 0.0),
        ("u16", 1.0),
        ("u32", 4_294_967_295.0),
        ("u64", 0.0),
        ("f32", -3.25),
        ("f64", 1e300),
        ("on", 0.0),
    ]
    .into_iter()
    .zip(1_u64..)
    .map(|((tag, value), alias)| good(T0_MS + alias, "press-7", tag, value))
    .collect();
    assert_eq!(decoded.readings, expected);
    assert_eq!(seq_gaps("sp-types", "line3/press-7"), Some(0));
}

#[test]
fn data_by_name_devices_units_and_times() {
    let node_decoder = Decoder::new("sp-names");
    let temperature = Metric {
        properties: Some(PropertySet {
            keys: vec!["engUnit".into(), "engHigh".into()],
            values: vec![
                PropertyValue {
                    r#type: Some(12),
                    is_null: None,
                    value: Some(PropertyScalar::String("degC".into())),
                },
                PropertyValue {
                    r#type: Some(10),
                    is_null: None,
                    value: Some(PropertyScalar::Double(200.0)),
                },
            ],
        }),
        alias: None,
        value: None,
        ..metric(
            "Inputs/Oil Temp",
            0,
            datatype::DOUBLE,
            MetricValue::Double(0.0),
        )
    };
    let node_birth = payload(Some(T0_MS), Some(0), vec![bd_seq(0)]);
    assert_eq!(
        node_decoder
            .decode("spBv1.0/line3/NBIRTH/press-7", &node_birth, ARRIVAL_US)
            .readings,
        vec![]
    );
    // A birth metric without a value announces the metric and records nothing yet.
    let decoded = node_decoder.decode(
        "spBv1.0/line3/DBIRTH/press-7/motor-1",
        &payload(Some(T0_MS), Some(1), vec![temperature]),
        ARRIVAL_US,
    );
    assert_eq!(
        reasons(&decoded),
        vec!["sparkplug_bad_value"],
        "a birth value of a numeric metric must be there or be null"
    );
    assert_eq!(decoded.readings, vec![]);

    let by_name = |value: f64, ts: Option<u64>| Metric {
        name: Some("Inputs/Oil Temp".into()),
        timestamp: ts,
        value: Some(MetricValue::Double(value)),
        ..Metric::default()
    };
    // The metric's own timestamp, else the payload's, else the arrival time.
    let decoded = node_decoder.decode(
        "spBv1.0/line3/DDATA/press-7/motor-1",
        &payload(
            Some(T0_MS + 500),
            Some(2),
            vec![by_name(80.5, Some(T0_MS + 7)), by_name(81.0, None)],
        ),
        ARRIVAL_US,
    );
    let degc = |mut r: Reading| {
        r.unit = Some("degC".into());
        r
    };
    assert_eq!(decoded.problems, vec![]);
    assert_eq!(
        decoded.readings,
        vec![
            degc(good(T0_MS + 7, "press-7/motor-1", "Inputs.Oil_Temp", 80.5)),
            degc(good(
                T0_MS + 500,
                "press-7/motor-1",
                "Inputs.Oil_Temp",
                81.0
            )),
        ]
    );
    let decoded = node_decoder.decode(
        "spBv1.0/line3/DDATA/press-7/motor-1",
        &payload(None, Some(3), vec![by_name(82.0, None)]),
        ARRIVAL_US,
    );
    assert_eq!(decoded.readings[0].ts_us, ARRIVAL_US);
    assert_eq!(seq_gaps("sp-names", "line3/press-7"), Some(0));
}

#[test]
fn seq_wraps_after_255_and_gaps_are_counted_per_edge_node() {
    let node_decoder = Decoder::new("sp-seq");
    let birth = |node: &str, seq: u64| {
        node_decoder.decode(
            &format!("spBv1.0/g/NBIRTH/{node}"),
            &payload(
                Some(T0_MS),
                Some(seq),
                vec![metric("level", 1, datatype::FLOAT, MetricValue::Float(1.0))],
            ),
            ARRIVAL_US,
        )
    };
    let data = |node: &str, seq: u64| {
        let decoded = node_decoder.decode(
            &format!("spBv1.0/g/NDATA/{node}"),
            &payload(
                Some(T0_MS),
                Some(seq),
                vec![by_alias(1, MetricValue::Float(2.0))],
            ),
            ARRIVAL_US,
        );
        assert_eq!(decoded.problems, vec![], "a gap does not lose the message");
        assert_eq!(decoded.readings.len(), 1);
    };
    birth("a", 253);
    birth("b", 0);
    for seq in [254, 255, 0, 1] {
        data("a", seq);
    }
    assert_eq!(seq_gaps("sp-seq", "g/a"), Some(0), "255 wraps to 0");
    data("a", 5);
    data("a", 6);
    data("a", 6);
    assert_eq!(seq_gaps("sp-seq", "g/a"), Some(2), "a skip and a repeat");
    data("b", 1);
    assert_eq!(seq_gaps("sp-seq", "g/b"), Some(0), "counted per edge node");
    // A new NBIRTH starts the count afresh, at any seq.
    birth("a", 40);
    data("a", 41);
    assert_eq!(seq_gaps("sp-seq", "g/a"), Some(2));
}

/// An edge node `n` with node metric `speed` and device `d` with metric `temp` and a string.
fn born(node_decoder: &Decoder, bd: u64) {
    let node = node_decoder.decode(
        "spBv1.0/g/NBIRTH/n",
        &payload(
            Some(T0_MS),
            Some(0),
            vec![
                bd_seq(bd),
                metric("speed", 1, datatype::UINT16, MetricValue::Int(1500)),
                metric(
                    "Node Control/Rebirth",
                    2,
                    datatype::BOOLEAN,
                    MetricValue::Boolean(false),
                ),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(node.problems, vec![]);
    assert_eq!(node.readings, vec![good(T0_MS, "n", "speed", 1500.0)]);
    let device = node_decoder.decode(
        "spBv1.0/g/DBIRTH/n/d",
        &payload(
            Some(T0_MS),
            Some(1),
            vec![
                metric("temp", 10, datatype::FLOAT, MetricValue::Float(20.0)),
                metric(
                    "serial",
                    11,
                    12, // String
                    MetricValue::String("A-1".into()),
                ),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(device.problems, vec![]);
    assert_eq!(device.readings, vec![good(T0_MS, "n/d", "temp", 20.0)]);
}

#[test]
fn deaths_mark_every_known_tag_stale_and_data_waits_for_the_next_birth() {
    let node_decoder = Decoder::new("sp-death");
    born(&node_decoder, 5);
    let ddeath = node_decoder.decode(
        "spBv1.0/g/DDEATH/n/d",
        &payload(Some(T0_MS + 9), Some(2), vec![]),
        ARRIVAL_US,
    );
    assert_eq!(ddeath.problems, vec![]);
    assert_eq!(
        ddeath.readings,
        vec![stale(
            i64::try_from(T0_MS + 9).unwrap() * 1000,
            "n/d",
            "temp"
        )],
        "one stale mark per recorded tag of the device, at the death's time"
    );
    let after = node_decoder.decode(
        "spBv1.0/g/DDATA/n/d",
        &payload(
            Some(T0_MS),
            Some(3),
            vec![by_alias(10, MetricValue::Float(1.0))],
        ),
        ARRIVAL_US,
    );
    assert_eq!(reasons(&after), vec!["sparkplug_no_birth"]);
    assert_eq!(
        after.problems[0].to_string(),
        "topic `spBv1.0/g/DDATA/n/d`: DDATA of device `d` of edge node `g/n` before its DBIRTH, so its aliases and datatypes are unknown; its messages are decoded again from its next DBIRTH on"
    );

    // The device comes back, then the whole node dies: node and device tags are stale.
    node_decoder.decode(
        "spBv1.0/g/DBIRTH/n/d",
        &payload(
            Some(T0_MS),
            Some(4),
            vec![metric(
                "temp",
                10,
                datatype::FLOAT,
                MetricValue::Float(21.0),
            )],
        ),
        ARRIVAL_US,
    );
    let ndeath = node_decoder.decode(
        "spBv1.0/g/NDEATH/n",
        &payload(Some(T0_MS), None, vec![bd_seq(5)]),
        ARRIVAL_US + 1,
    );
    assert_eq!(ndeath.problems, vec![]);
    assert_eq!(
        ndeath.readings,
        vec![
            stale(ARRIVAL_US + 1, "n", "speed"),
            stale(ARRIVAL_US + 1, "n/d", "temp"),
        ],
        "at the arrival time, not the will's connect-time timestamp"
    );
    let after = node_decoder.decode(
        "spBv1.0/g/NDATA/n",
        &payload(Some(T0_MS), Some(5), vec![by_alias(1, MetricValue::Int(3))]),
        ARRIVAL_US,
    );
    assert_eq!(reasons(&after), vec!["sparkplug_no_birth"]);
    let again = node_decoder.decode(
        "spBv1.0/g/NDEATH/n",
        &payload(None, None, vec![bd_seq(5)]),
        ARRIVAL_US,
    );
    assert_eq!(again, Decoded::default(), "a dead node has nothing to mark");
}

#[test]
fn an_ndeath_of_an_earlier_session_leaves_the_new_one_alone() {
    let node_decoder = Decoder::new("sp-bdseq");
    born(&node_decoder, 8);
    let late = node_decoder.decode(
        "spBv1.0/g/NDEATH/n",
        &payload(None, None, vec![bd_seq(7)]),
        ARRIVAL_US,
    );
    assert_eq!(late, Decoded::default());
    let data = node_decoder.decode(
        "spBv1.0/g/NDATA/n",
        &payload(
            Some(T0_MS + 1),
            Some(2),
            vec![by_alias(1, MetricValue::Int(1600))],
        ),
        ARRIVAL_US,
    );
    assert_eq!(data.readings, vec![good(T0_MS + 1, "n", "speed", 1600.0)]);
}

#[test]
fn data_before_a_birth_and_unknown_aliases_are_problems_not_guesses() {
    let node_decoder = Decoder::new("sp-unknown");
    let early = node_decoder.decode(
        "spBv1.0/g/NDATA/n",
        &payload(
            Some(T0_MS),
            Some(1),
            vec![metric("speed", 1, datatype::UINT16, MetricValue::Int(1))],
        ),
        ARRIVAL_US,
    );
    assert_eq!(early.readings, vec![]);
    assert_eq!(reasons(&early), vec!["sparkplug_no_birth"]);
    assert_eq!(
        early.problems[0].to_string(),
        "topic `spBv1.0/g/NDATA/n`: NDATA of edge node `g/n` before its NBIRTH, so its aliases and datatypes are unknown; its messages are decoded again from its next NBIRTH on"
    );
    let device_early = node_decoder.decode(
        "spBv1.0/g/DBIRTH/n/d",
        &payload(Some(T0_MS), Some(1), vec![]),
        ARRIVAL_US,
    );
    assert_eq!(reasons(&device_early), vec!["sparkplug_no_birth"]);

    born(&node_decoder, 0);
    let mixed = node_decoder.decode(
        "spBv1.0/g/DDATA/n/d",
        &payload(
            Some(T0_MS),
            Some(2),
            vec![
                by_alias(10, MetricValue::Float(22.5)),
                by_alias(99, MetricValue::Float(1.0)),
                Metric {
                    name: Some("pressure".into()),
                    value: Some(MetricValue::Float(1.0)),
                    ..Metric::default()
                },
                Metric {
                    value: Some(MetricValue::Float(1.0)),
                    ..Metric::default()
                },
                by_alias(10, MetricValue::String("hot".into())),
                by_alias(1, MetricValue::Int(5)),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(
        mixed.readings,
        vec![good(T0_MS, "n/d", "temp", 22.5)],
        "the good metric of the message is kept"
    );
    assert_eq!(
        mixed
            .problems
            .iter()
            .map(|p| (p.reason(), p.to_string()))
            .collect::<Vec<_>>(),
        vec![
            (
                "sparkplug_unknown_alias",
                "topic `spBv1.0/g/DDATA/n/d`: alias 99 is not in the DBIRTH of device `d` of edge node `g/n`".to_owned()
            ),
            (
                "sparkplug_unknown_metric",
                "topic `spBv1.0/g/DDATA/n/d`: metric `pressure` is not in the DBIRTH of device `d` of edge node `g/n`".to_owned()
            ),
            (
                "sparkplug_bad_metric",
                "topic `spBv1.0/g/DDATA/n/d`: metric #3 has neither a name nor an alias".to_owned()
            ),
            (
                "sparkplug_bad_value",
                "topic `spBv1.0/g/DDATA/n/d`: metric `temp` (Float): it carries a string_value".to_owned()
            ),
            (
                "sparkplug_unknown_alias",
                "topic `spBv1.0/g/DDATA/n/d`: alias 1 is not in the DBIRTH of device `d` of edge node `g/n`".to_owned()
            ),
        ],
        "a node's alias is not a device's"
    );
}

#[test]
fn null_transient_string_and_control_metrics() {
    let node_decoder = Decoder::new("sp-null");
    born(&node_decoder, 0);
    let decoded = node_decoder.decode(
        "spBv1.0/g/DDATA/n/d",
        &payload(
            Some(T0_MS),
            Some(2),
            vec![
                Metric {
                    is_null: Some(true),
                    ..by_alias(10, MetricValue::Float(0.0))
                },
                Metric {
                    is_transient: Some(true),
                    ..by_alias(10, MetricValue::Float(5.0))
                },
                by_alias(11, MetricValue::String("A-2".into())),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(decoded.problems, vec![]);
    assert_eq!(
        decoded.readings,
        vec![Reading {
            ts_us: i64::try_from(T0_MS).unwrap() * 1000,
            ..stale(0, "n/d", "temp")
        }],
        "null: a reading without value, quality bad; transient and string metrics: none"
    );
    let control = node_decoder.decode(
        "spBv1.0/g/NDATA/n",
        &payload(
            Some(T0_MS),
            Some(3),
            vec![by_alias(2, MetricValue::Boolean(true))],
        ),
        ARRIVAL_US,
    );
    assert_eq!(control, Decoded::default());
}

#[test]
fn a_faulty_birth_names_each_bad_metric_and_keeps_the_rest() {
    let node_decoder = Decoder::new("sp-birth");
    let decoded = node_decoder.decode(
        "spBv1.0/g/NBIRTH/n",
        &payload(
            Some(T0_MS),
            Some(0),
            vec![
                Metric {
                    name: None,
                    ..metric("", 1, datatype::INT32, MetricValue::Int(1))
                },
                Metric {
                    datatype: None,
                    ..metric("untyped", 2, 0, MetricValue::Int(1))
                },
                metric("a b", 3, datatype::INT32, MetricValue::Int(1)),
                metric("a_b", 4, datatype::INT32, MetricValue::Int(2)),
                metric("dup-alias", 3, datatype::INT32, MetricValue::Int(3)),
                metric("a b", 5, datatype::INT32, MetricValue::Int(4)),
                Metric {
                    timestamp: Some(u64::MAX),
                    ..metric("late", 6, datatype::INT32, MetricValue::Int(5))
                },
                metric("nan", 7, datatype::DOUBLE, MetricValue::Double(f64::NAN)),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(decoded.readings, vec![good(T0_MS, "n", "a_b", 1.0)]);
    assert_eq!(
        decoded
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![
            "topic `spBv1.0/g/NBIRTH/n`: metric #0 has no name; a birth names every metric",
            "topic `spBv1.0/g/NBIRTH/n`: metric `untyped` has no datatype; a birth declares every metric's datatype, its values are left out",
            "topic `spBv1.0/g/NBIRTH/n`: metric `a_b` gives tag `a_b`, as metric `a b` does; its values are left out, rename one of them on the edge node",
            "topic `spBv1.0/g/NBIRTH/n`: metric `dup-alias` has alias 3, which metric `a b` has already; it is left out",
            "topic `spBv1.0/g/NBIRTH/n`: metric `a b` appears twice in the birth; the first is kept",
            "topic `spBv1.0/g/NBIRTH/n`: metric `late`: timestamp 18446744073709551615 ms is after the year 9999",
            "topic `spBv1.0/g/NBIRTH/n`: metric `nan` (Double): the value NaN is not a finite number",
        ]
    );
    assert_eq!(
        reasons(&decoded),
        vec![
            "sparkplug_bad_metric",
            "sparkplug_bad_metric",
            "sparkplug_bad_metric",
            "sparkplug_bad_metric",
            "sparkplug_bad_metric",
            "bad_timestamp",
            "sparkplug_bad_value",
        ]
    );
    // The metrics that were kept decode; the refused tag and the untyped one give nothing.
    let data = node_decoder.decode(
        "spBv1.0/g/NDATA/n",
        &payload(
            Some(T0_MS),
            Some(1),
            vec![
                by_alias(3, MetricValue::Int(9)),
                by_alias(4, MetricValue::Int(9)),
                by_alias(2, MetricValue::Int(9)),
                by_alias(7, MetricValue::Double(0.5)),
            ],
        ),
        ARRIVAL_US,
    );
    assert_eq!(data.problems, vec![]);
    assert_eq!(
        data.readings,
        vec![good(T0_MS, "n", "a_b", 9.0), good(T0_MS, "n", "nan", 0.5)]
    );
}

#[test]
fn other_topics_and_payloads() {
    let node_decoder = Decoder::new("sp-other");
    for skipped in [
        "spBv1.0/STATE/scada-1",
        "spBv1.0/g/NCMD/n",
        "spBv1.0/g/DCMD/n/d",
    ] {
        assert_eq!(
            node_decoder.decode(skipped, b"{\"online\": true}", ARRIVAL_US),
            Decoded::default(),
            "{skipped}"
        );
    }
    let bad_topic = node_decoder.decode("spBv1.0/g/NDATA", &[], ARRIVAL_US);
    assert_eq!(reasons(&bad_topic), vec!["sparkplug_topic"]);
    assert_eq!(
        bad_topic.problems[0].to_string(),
        "topic `spBv1.0/g/NDATA` is not a Sparkplug B topic (spBv1.0/<group id>/<NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH>/<edge node id>[/<device id>])"
    );
    let not_protobuf = node_decoder.decode("spBv1.0/g/NBIRTH/n", b"{\"v\": 1}", ARRIVAL_US);
    assert_eq!(reasons(&not_protobuf), vec!["sparkplug_decode"]);
    assert!(
        not_protobuf.problems[0]
            .to_string()
            .starts_with("topic `spBv1.0/g/NBIRTH/n`: the payload is not a Sparkplug B payload: "),
        "{}",
        not_protobuf.problems[0]
    );
}

/// xorshift64*: a fixed sequence, so a failure comes back on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

#[test]
fn any_bytes_on_any_topic_give_readings_or_problems_never_a_panic() {
    let node_decoder = Decoder::new("sp-fuzz");
    let topics = [
        "spBv1.0/g/NBIRTH/n",
        "spBv1.0/g/DBIRTH/n/d",
        "spBv1.0/g/NDATA/n",
        "spBv1.0/g/DDATA/n/d",
        "spBv1.0/g/DDEATH/n/d",
        "spBv1.0/g/NDEATH/n",
    ];
    // Valid payloads to mutate: births and data with every datatype, properties and flags.
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut birth = every_datatype([
        MetricValue::Int(1),
        MetricValue::Int(2),
        MetricValue::Int(3),
        MetricValue::Long(4),
        MetricValue::Int(5),
        MetricValue::Int(6),
        MetricValue::Int(7),
        MetricValue::Long(8),
        MetricValue::Float(9.5),
        MetricValue::Double(10.5),
        MetricValue::Boolean(true),
    ]);
    birth[0].properties = Some(PropertySet {
        keys: vec!["engUnit".into()],
        values: vec![PropertyValue {
            r#type: Some(12),
            is_null: Some(false),
            value: Some(PropertyScalar::String("bar".into())),
        }],
    });
    birth[1].is_null = Some(true);
    birth.push(bd_seq(1));
    seeds.push(payload(Some(T0_MS), Some(0), birth.clone()));
    seeds.push(payload(
        None,
        Some(1),
        birth
            .iter()
            .map(|m| Metric {
                name: None,
                datatype: None,
                properties: None,
                ..m.clone()
            })
            .collect(),
    ));
    let mut rng = Rng(0x5eed_0f5a_a4c1_0001);
    let mut outcomes = [0_usize; 3];
    for round in 0..20_000 {
        let topic = topics[rng.below(topics.len())];
        let bytes: Vec<u8> = if round % 3 == 0 {
            // Random bytes of random length.
            (0..rng.below(64))
                .map(|_| u8::try_from(rng.next() & 0xFF).unwrap())
                .collect()
        } else {
            // A valid payload with a few bytes flipped, cut or duplicated.
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] ^= u8::try_from(rng.next() & 0xFF).unwrap() | 1,
                    1 => bytes.truncate(at),
                    _ => {
                        let tail = bytes[at..].to_vec();
                        bytes.extend_from_slice(&tail);
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            bytes
        };
        let decoded = node_decoder.decode(topic, &bytes, ARRIVAL_US);
        for reading in &decoded.readings {
            assert!(crate::config::is_safe_name(&reading.tag), "{reading:?}");
            assert!(
                reading.value.is_none_or(f64::is_finite),
                "{reading:?} from {bytes:?}"
            );
            assert_eq!(reading.value.is_some(), reading.quality == Quality::Good);
        }
        let index = match (decoded.readings.is_empty(), decoded.problems.is_empty()) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        outcomes[index] += 1;
    }
    // The mutations reach all three outcomes, so the loop exercises more than the decode error.
    assert!(outcomes.iter().all(|n| *n > 100), "{outcomes:?}");
}

// ---- Validation of sparkplug_b subscriptions (mqtt/check.rs) ---------------------------------

fn validate(subscriptions: &str) -> Result<crate::config::AgentConfig, Vec<String>> {
    let text = format!(
        "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n[[mqtt]]\nname = \"b\"\nhost = \"127.0.0.1\"\nclient_id = \"gw-1\"\n{subscriptions}"
    );
    crate::config::load_str(&text, std::path::Path::new("plant.toml"))
        .map_err(|e| e.to_string().lines().map(str::to_owned).collect())
}

#[test]
fn a_sparkplug_subscription_needs_only_its_group_filter() {
    let config = validate(
        "[[mqtt.subscriptions]]\ntopic = \"spBv1.0/line3/#\"\npayload = \"sparkplug_b\"\n[[mqtt.subscriptions]]\ntopic = \"spBv1.0/line4/+/press-9/#\"\npayload = \"sparkplug_b\"\nqos = 0\n[[mqtt.subscriptions]]\ntopic = \"meters/+/kwh\"\npayload = \"number\"\ndevice = \"{1}\"\ntag = \"energy\"\n",
    )
    .unwrap();
    let subs = &config.mqtt[0].subscriptions;
    assert_eq!(subs[0].payload, crate::config::PayloadFormat::SparkplugB);
    assert_eq!((subs[1].qos, subs[1].device.as_str()), (0, ""));
}

#[test]
fn sparkplug_subscription_problems_name_line_key_and_fix() {
    let problems = validate(
        r#"[[mqtt.subscriptions]]
topic = "spBv1.0/line3/NDATA/#"
payload = "sparkplug_b"
device = "{3}"
tag = "x"
value = "/v"
timestamp = "/ts"
timestamp_format = "epoch_ms"
unit = "degC"
scale = 0.1
offset = 1.0
[[mqtt.subscriptions.fields]]
tag = "t"
value = "/t"
[[mqtt.subscriptions]]
topic = "spBv1.0/+/#"
payload = "sparkplug_b"
[[mqtt.subscriptions]]
topic = "plant/+/temp"
tag = "temp"
value = "/v"
"#,
    )
    .unwrap_err();
    let fix = "; remove the key";
    assert_eq!(
        problems,
        vec![
            "plant.toml:10: mqtt[0].subscriptions[0].topic: `spBv1.0/line3/NDATA/#` does not follow whole Sparkplug B edge nodes; a payload = \"sparkplug_b\" subscription needs every message type of a group or of one edge node, so births come with the data: topic = \"spBv1.0/<group id>/#\" or \"spBv1.0/<group id>/+/<edge node id>/#\" (`+` for any group or node)".to_owned(),
            format!("plant.toml:12: mqtt[0].subscriptions[0].device: device does not apply to payload = \"sparkplug_b\" (the device is the edge node id, or `<edge node>/<device>` for a device's metrics){fix}"),
            format!("plant.toml:13: mqtt[0].subscriptions[0].tag: tag does not apply to payload = \"sparkplug_b\" (tags and values come from the metrics the edge nodes announce in their births){fix}"),
            format!("plant.toml:14: mqtt[0].subscriptions[0].value: value does not apply to payload = \"sparkplug_b\" (tags and values come from the metrics the edge nodes announce in their births){fix}"),
            format!("plant.toml:15: mqtt[0].subscriptions[0].timestamp: timestamp does not apply to payload = \"sparkplug_b\" (the time is the metric's or the payload's timestamp){fix}"),
            format!("plant.toml:16: mqtt[0].subscriptions[0].timestamp_format: timestamp_format does not apply to payload = \"sparkplug_b\" (the time is the metric's or the payload's timestamp){fix}"),
            format!("plant.toml:17: mqtt[0].subscriptions[0].unit: unit does not apply to payload = \"sparkplug_b\" (the unit is the metric's engUnit property, when the birth has one){fix}"),
            format!("plant.toml:18: mqtt[0].subscriptions[0].scale: scale does not apply to payload = \"sparkplug_b\" (metrics are recorded as the edge node sends them){fix}"),
            format!("plant.toml:19: mqtt[0].subscriptions[0].offset: offset does not apply to payload = \"sparkplug_b\" (metrics are recorded as the edge node sends them){fix}"),
            format!("plant.toml:20: mqtt[0].subscriptions[0].fields: fields does not apply to payload = \"sparkplug_b\" (tags and values come from the metrics the edge nodes announce in their births){fix}"),
            "plant.toml:24: mqtt[0].subscriptions[1].topic: `spBv1.0/+/#` overlaps `spBv1.0/line3/NDATA/#` of mqtt[0].subscriptions[0], so one message could be mapped twice; make the filters disjoint (for example by a literal level)".to_owned(),
            "plant.toml:26: mqtt[0].subscriptions[2].device: no device for the readings; add device = \"...\" (`{N}` takes topic level N, counted from 0)".to_owned(),
        ]
    );
}
