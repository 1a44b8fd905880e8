//! The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`, proto2) as prost messages.
//!
//! The field numbers and types are those of `sparkplug_b.proto` published with the Sparkplug
//! 3.0 specification (Eclipse Tahu). Only what the agent reads is declared: the payload's
//! timestamp, sequence number and metrics, and of a metric its name, alias, timestamp,
//! datatype, flags, properties (for `engUnit`) and scalar values. Everything else (DataSet and
//! Template values, MetaData, the payload's `uuid` and `body`, extensions) is skipped by the
//! decoder as unknown fields, as protobuf allows, so a payload that uses them still decodes.
//! prost does the wire format; nothing here parses bytes by hand.

/// `Payload`: one Sparkplug message.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Payload {
    /// When the message was sent, milliseconds since the Unix epoch.
    #[prost(uint64, optional, tag = "1")]
    pub(crate) timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) metrics: Vec<Metric>,
    /// 0 to 255, one more per message of an edge node (and its devices), wrapping.
    #[prost(uint64, optional, tag = "3")]
    pub(crate) seq: Option<u64>,
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Metric {
    /// Sent in births; in data messages when the edge node does not use aliases.
    #[prost(string, optional, tag = "1")]
    pub(crate) name: Option<String>,
    /// Tied to the name in the birth, and sent instead of it in later data messages.
    #[prost(uint64, optional, tag = "2")]
    pub(crate) alias: Option<u64>,
    /// When the value was acquired, milliseconds since the Unix epoch.
    #[prost(uint64, optional, tag = "3")]
    pub(crate) timestamp: Option<u64>,
    /// A [`datatype`] code; required in births, optional afterwards.
    #[prost(uint32, optional, tag = "4")]
    pub(crate) datatype: Option<u32>,
    /// A value from the past (store and forward), not the current one.
    #[prost(bool, optional, tag = "5")]
    pub(crate) is_historical: Option<bool>,
    /// Not to be stored by consumers.
    #[prost(bool, optional, tag = "6")]
    pub(crate) is_transient: Option<bool>,
    /// The metric has no value now.
    #[prost(bool, optional, tag = "7")]
    pub(crate) is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub(crate) properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub(crate) value: Option<MetricValue>,
}

/// `Payload.Metric.value`: the scalar members of the oneof (DataSet, Template and extension
/// values, tags 17-19, are skipped as unknown fields).
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum MetricValue {
    /// Int8, Int16, Int32, UInt8, UInt16, UInt32 (signed types in two's complement).
    #[prost(uint32, tag = "10")]
    Int(u32),
    /// Int64, UInt64, DateTime (and UInt32 from some encoders).
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    String(String),
    /// Bytes, File and the array types.
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

/// `Payload.PropertySet`: `keys[i]` names `values[i]`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub(crate) keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) values: Vec<PropertyValue>,
}

/// `Payload.PropertyValue`, scalar values only (nested property sets, tags 9-11, are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub(crate) r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub(crate) is_null: Option<bool>,
    #[prost(oneof = "PropertyScalar", tags = "3, 4, 5, 6, 7, 8")]
    pub(crate) value: Option<PropertyScalar>,
}

/// `Payload.PropertyValue.value`, scalar members.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum PropertyScalar {
    #[prost(uint32, tag = "3")]
    Int(u32),
    #[prost(uint64, tag = "4")]
    Long(u64),
    #[prost(float, tag = "5")]
    Float(f32),
    #[prost(double, tag = "6")]
    Double(f64),
    #[prost(bool, tag = "7")]
    Boolean(bool),
    #[prost(string, tag = "8")]
    String(String),
}

/// The `DataType` codes of the specification that the agent reads or names.
pub(crate) mod datatype {
    pub(crate) const INT8: u32 = 1;
    pub(crate) const INT16: u32 = 2;
    pub(crate) const INT32: u32 = 3;
    pub(crate) const INT64: u32 = 4;
    pub(crate) const UINT8: u32 = 5;
    pub(crate) const UINT16: u32 = 6;
    pub(crate) const UINT32: u32 = 7;
    pub(crate) const UINT64: u32 = 8;
    pub(crate) const FLOAT: u32 = 9;
    pub(crate) const DOUBLE: u32 = 10;
    pub(crate) const BOOLEAN: u32 = 11;

    /// The specification's name of a datatype code, for messages.
    pub(crate) fn name(code: u32) -> &'static str {
        const NAMES: [&str; 35] = [
            "Unknown",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Float",
            "Double",
            "Boolean",
            "String",
            "DateTime",
            "Text",
            "UUID",
            "DataSet",
            "Bytes",
            "File",
            "Template",
            "PropertySet",
            "PropertySetList",
            "Int8Array",
            "Int16Array",
            "Int32Array",
            "Int64Array",
            "UInt8Array",
            "UInt16Array",
            "UInt32Array",
            "UInt64Array",
            "FloatArray",
            "DoubleArray",
            "BooleanArray",
            "StringArray",
            "DateTimeArray",
        ];
        usize::try_from(code)
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("an unknown datatype")
    }

    /// Whether readings are made of this datatype: the integers, the floats and Boolean.
    pub(crate) fn is_recorded(code: u32) -> bool {
        (INT8..=BOOLEAN).contains(&code)
    }
}
