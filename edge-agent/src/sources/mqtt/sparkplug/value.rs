//! A metric's value as a number, by the datatype its birth declared.
//!
//! Encoders disagree on a few details the specification leaves open, and every one of them is
//! read the same way here:
//! - Int8, Int16 and Int32 travel in the 32-bit `int_value` as two's complement. Some encoders
//!   sign-extend to 32 bits (-1 as Int8 is `0xFFFFFFFF`), others keep the type's own width
//!   (`0xFF`); both give -1. A bit pattern that is neither is refused.
//! - An integer may come in `int_value` or `long_value` (Java encoders put UInt32 in the
//!   latter); both are accepted for every integer type.
//! - Float may come as `double_value` and Double as `float_value`.
//! - Unsigned values outside their type's range are refused, never wrapped.

use super::proto::{MetricValue, datatype};

/// Why a metric's value is not a number of its datatype; the caller adds the topic and metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValueProblem {
    /// The metric carries no value and is not marked null.
    Missing,
    /// The value is of another kind (for example text for an Int32).
    WrongKind(&'static str),
    /// The integer does not fit the datatype.
    OutOfRange(String),
    /// NaN or an infinity.
    NotFinite(String),
}

impl std::fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("it has no value and is not marked null"),
            Self::WrongKind(kind) => write!(f, "it carries {kind}"),
            Self::OutOfRange(raw) => write!(f, "the integer {raw} does not fit the datatype"),
            Self::NotFinite(raw) => write!(f, "the value {raw} is not a finite number"),
        }
    }
}

/// The number of `value` for a metric of datatype `code`, which must be one that
/// [`datatype::is_recorded`] accepts. Booleans are 1 and 0.
pub(crate) fn number(code: u32, value: Option<&MetricValue>) -> Result<f64, ValueProblem> {
    let value = value.ok_or(ValueProblem::Missing)?;
    match code {
        datatype::INT8 => signed(value, 8),
        datatype::INT16 => signed(value, 16),
        datatype::INT32 => signed(value, 32),
        datatype::INT64 => signed(value, 64),
        datatype::UINT8 => unsigned(value, 8),
        datatype::UINT16 => unsigned(value, 16),
        datatype::UINT32 => unsigned(value, 32),
        datatype::UINT64 => unsigned(value, 64),
        datatype::FLOAT | datatype::DOUBLE => match value {
            MetricValue::Float(v) => finite(f64::from(*v)),
            MetricValue::Double(v) => finite(*v),
            other => Err(ValueProblem::WrongKind(kind(other))),
        },
        datatype::BOOLEAN => match value {
            MetricValue::Boolean(b) => Ok(if *b { 1.0 } else { 0.0 }),
            other => Err(ValueProblem::WrongKind(kind(other))),
        },
        _ => Err(ValueProblem::WrongKind(kind(value))),
    }
}

/// The raw integer, and the same bits read as two's complement in the width they travelled in
/// (-1 as 0xFFFFFFFF in int_value).
#[allow(clippy::cast_possible_wrap)] // reading two's complement bits is the point
fn raw_integer(value: &MetricValue) -> Result<(u64, i64), ValueProblem> {
    match value {
        MetricValue::Int(v) => Ok((u64::from(*v), i64::from(*v as i32))),
        MetricValue::Long(v) => Ok((*v, *v as i64)),
        other => Err(ValueProblem::WrongKind(kind(other))),
    }
}

/// A signed integer of `bits` (8, 16, 32 or 64), sign-extended to the wire width or not.
#[allow(clippy::cast_possible_wrap)] // reinterpreting two's complement bits is the point
fn signed(value: &MetricValue, bits: u32) -> Result<f64, ValueProblem> {
    let (raw, extended) = raw_integer(value)?;
    let fits = |v: i64| bits == 64 || (-(1_i64 << (bits - 1))..(1_i64 << (bits - 1))).contains(&v);
    if fits(extended) {
        return Ok(extended as f64);
    }
    // Kept to its own width (-1 as Int8 is 0xFF): shift the sign bit to the top and back.
    if bits < 64 && raw < (1_u64 << bits) {
        let shift = 64 - bits;
        return Ok((((raw << shift) as i64) >> shift) as f64);
    }
    Err(ValueProblem::OutOfRange(raw.to_string()))
}

/// An unsigned integer of `bits` (8, 16, 32 or 64).
fn unsigned(value: &MetricValue, bits: u32) -> Result<f64, ValueProblem> {
    let (raw, _) = raw_integer(value)?;
    if bits == 64 || raw < (1_u64 << bits) {
        Ok(raw as f64)
    } else {
        Err(ValueProblem::OutOfRange(raw.to_string()))
    }
}

fn finite(v: f64) -> Result<f64, ValueProblem> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ValueProblem::NotFinite(v.to_string()))
    }
}

/// The kind of a value, for messages.
fn kind(value: &MetricValue) -> &'static str {
    match value {
        MetricValue::Int(_) => "an int_value",
        MetricValue::Long(_) => "a long_value",
        MetricValue::Float(_) => "a float_value",
        MetricValue::Double(_) => "a double_value",
        MetricValue::Boolean(_) => "a boolean_value",
        MetricValue::String(_) => "a string_value",
        MetricValue::Bytes(_) => "a bytes_value",
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values are the point
mod tests {
    use super::*;

    #[allow(clippy::unnecessary_wraps)] // `number` takes an optional value
    fn int(v: u32) -> Option<MetricValue> {
        Some(MetricValue::Int(v))
    }
    #[allow(clippy::unnecessary_wraps)] // `number` takes an optional value
    fn long(v: u64) -> Option<MetricValue> {
        Some(MetricValue::Long(v))
    }

    #[test]
    fn signed_integers_read_in_both_encodings_of_their_sign() {
        use datatype::{INT8, INT16, INT32, INT64};
        let cases: [(u32, Option<MetricValue>, f64); 14] = [
            (INT8, int(0xFFFF_FFFF), -1.0),
            (INT8, int(0xFF), -1.0),
            (INT8, int(0x80), -128.0),
            (INT8, int(0x7F), 127.0),
            (INT8, long(u64::MAX), -1.0),
            (INT16, int(0xFFFF_8000), -32768.0),
            (INT16, int(0x8000), -32768.0),
            (INT16, int(1234), 1234.0),
            (INT32, int(0x8000_0000), -2_147_483_648.0),
            (INT32, int(0x7FFF_FFFF), 2_147_483_647.0),
            (INT32, long(0xFFFF_FFFF), -1.0),
            (INT64, long(u64::MAX), -1.0),
            (INT64, long(1 << 62), 4_611_686_018_427_387_904.0),
            (INT64, int(0xFFFF_FFFE), -2.0),
        ];
        for (code, value, expected) in cases {
            assert_eq!(
                number(code, value.as_ref()),
                Ok(expected),
                "{} {value:?}",
                datatype::name(code)
            );
        }
        assert_eq!(
            number(INT8, int(0x1FF).as_ref()),
            Err(ValueProblem::OutOfRange("511".into()))
        );
        assert_eq!(
            number(INT16, long(0x1_0000).as_ref()),
            Err(ValueProblem::OutOfRange("65536".into()))
        );
    }

    #[test]
    fn unsigned_integers_are_range_checked_not_wrapped() {
        use datatype::{UINT8, UINT16, UINT32, UINT64};
        assert_eq!(number(UINT8, int(255).as_ref()), Ok(255.0));
        assert_eq!(number(UINT16, int(65535).as_ref()), Ok(65535.0));
        assert_eq!(number(UINT32, int(u32::MAX).as_ref()), Ok(4_294_967_295.0));
        assert_eq!(
            number(UINT32, long(4_000_000_000).as_ref()),
            Ok(4_000_000_000.0)
        );
        assert_eq!(
            number(UINT64, long(u64::MAX).as_ref()),
            Ok(18_446_744_073_709_551_615.0)
        );
        assert_eq!(
            number(UINT8, int(256).as_ref()),
            Err(ValueProblem::OutOfRange("256".into()))
        );
        assert_eq!(
            number(UINT32, long(1 << 32).as_ref()),
            Err(ValueProblem::OutOfRange("4294967296".into()))
        );
    }

    #[test]
    fn floats_doubles_and_booleans() {
        use datatype::{BOOLEAN, DOUBLE, FLOAT};
        assert_eq!(number(FLOAT, Some(&MetricValue::Float(21.5))), Ok(21.5));
        assert_eq!(
            number(FLOAT, Some(&MetricValue::Float(0.1))),
            Ok(f64::from(0.1_f32))
        );
        assert_eq!(
            number(DOUBLE, Some(&MetricValue::Double(-0.125))),
            Ok(-0.125)
        );
        assert_eq!(number(DOUBLE, Some(&MetricValue::Float(2.5))), Ok(2.5));
        assert_eq!(
            number(DOUBLE, Some(&MetricValue::Double(f64::NAN))),
            Err(ValueProblem::NotFinite("NaN".into()))
        );
        assert_eq!(
            number(FLOAT, Some(&MetricValue::Float(f32::INFINITY))),
            Err(ValueProblem::NotFinite("inf".into()))
        );
        assert_eq!(number(BOOLEAN, Some(&MetricValue::Boolean(true))), Ok(1.0));
        assert_eq!(number(BOOLEAN, Some(&MetricValue::Boolean(false))), Ok(0.0));
    }

    #[test]
    fn a_value_of_the_wrong_kind_or_none_is_refused() {
        assert_eq!(
            number(datatype::INT32, Some(&MetricValue::String("7".into()))),
            Err(ValueProblem::WrongKind("a string_value"))
        );
        assert_eq!(
            number(datatype::BOOLEAN, int(1).as_ref()),
            Err(ValueProblem::WrongKind("an int_value"))
        );
        assert_eq!(
            number(datatype::DOUBLE, Some(&MetricValue::Boolean(true))),
            Err(ValueProblem::WrongKind("a boolean_value"))
        );
        assert_eq!(number(datatype::DOUBLE, None), Err(ValueProblem::Missing));
        assert_eq!(
            ValueProblem::WrongKind("a string_value").to_string(),
            "it carries a string_value"
        );
    }
}
