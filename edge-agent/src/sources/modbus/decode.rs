//! Turning register words into engineering values.
//!
//! A Modbus register is 16 bits sent high byte first. Values wider than one register are spread
//! over consecutive registers in an order that varies by vendor; the [`ByteOrder`] letters name
//! the value's bytes as they appear on the wire, `A` being the most significant:
//!
//! | order  | first register | second register | found in                         |
//! |--------|----------------|-----------------|----------------------------------|
//! | `ABCD` | `A B`          | `C D`           | the Modbus spec, Siemens, most   |
//! | `CDAB` | `C D`          | `A B`           | Schneider, many power meters     |
//! | `BADC` | `B A`          | `D C`           | some byte-swapping gateways      |
//! | `DCBA` | `D C`          | `B A`           | little-endian devices            |
//!
//! A 16-bit value has bytes `A B` only: `ABCD` and `CDAB` read it as sent, `BADC` and `DCBA`
//! swap its two bytes.

use crate::config::{ByteOrder, DataType};

/// Register words that cannot be decoded as the configured type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The device answered with a different number of registers than the type needs.
    #[error("{} needs {expected} register(s), the device sent {found}", type_name(*.data_type))]
    WordCount {
        data_type: DataType,
        expected: usize,
        found: usize,
    },
    /// The registers hold a float that is not a number (NaN or infinite).
    #[error("the registers hold a float that is not a finite number ({raw:#010x})")]
    NotFinite { raw: u32 },
}

/// Decodes the raw registers of one value, before scaling.
pub fn decode(
    words: &[u16],
    data_type: DataType,
    byte_order: ByteOrder,
) -> Result<f64, DecodeError> {
    let expected = usize::from(data_type.register_count());
    if words.len() != expected {
        return Err(DecodeError::WordCount {
            data_type,
            expected,
            found: words.len(),
        });
    }
    let value = match data_type {
        DataType::U16 => f64::from(word16(words[0], byte_order)),
        DataType::I16 => f64::from(word16(words[0], byte_order).cast_signed()),
        DataType::U32 => f64::from(word32(words[0], words[1], byte_order)),
        DataType::I32 => f64::from(word32(words[0], words[1], byte_order).cast_signed()),
        DataType::F32 => {
            let raw = word32(words[0], words[1], byte_order);
            let value = f32::from_bits(raw);
            if !value.is_finite() {
                return Err(DecodeError::NotFinite { raw });
            }
            f64::from(value)
        }
    };
    Ok(value)
}

/// Decodes and applies `value = raw * scale + offset`.
pub fn decode_scaled(
    words: &[u16],
    data_type: DataType,
    byte_order: ByteOrder,
    scale: f64,
    offset: f64,
) -> Result<f64, DecodeError> {
    decode(words, data_type, byte_order).map(|raw| apply_scale(raw, scale, offset))
}

/// `raw * scale + offset`, computed as written (no fused multiply-add) so that a consumer
/// recomputing it gets the same bits. A float tag with `scale = 1` and `offset = 0` keeps its
/// exact `f32` value widened to `f64` (123.456 reads as 123.45600128173828).
pub fn apply_scale(raw: f64, scale: f64, offset: f64) -> f64 {
    raw * scale + offset
}

/// The type's name as written in the sensor map.
pub fn type_name(data_type: DataType) -> &'static str {
    match data_type {
        DataType::U16 => "u16",
        DataType::I16 => "i16",
        DataType::U32 => "u32",
        DataType::I32 => "i32",
        DataType::F32 => "f32",
    }
}

fn word16(word: u16, order: ByteOrder) -> u16 {
    match order {
        ByteOrder::ABCD | ByteOrder::CDAB => word,
        ByteOrder::BADC | ByteOrder::DCBA => word.swap_bytes(),
    }
}

fn word32(first: u16, second: u16, order: ByteOrder) -> u32 {
    let [b0, b1] = first.to_be_bytes();
    let [b2, b3] = second.to_be_bytes();
    // Put the wire bytes back in A B C D order.
    let abcd = match order {
        ByteOrder::ABCD => [b0, b1, b2, b3],
        ByteOrder::CDAB => [b2, b3, b0, b1],
        ByteOrder::BADC => [b1, b0, b3, b2],
        ByteOrder::DCBA => [b3, b2, b1, b0],
    };
    u32::from_be_bytes(abcd)
}

#[cfg(test)]
// Exact float comparisons are the point: decoding and scaling must produce these very bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    const ORDERS: [ByteOrder; 4] = [
        ByteOrder::ABCD,
        ByteOrder::CDAB,
        ByteOrder::BADC,
        ByteOrder::DCBA,
    ];

    /// The registers a device using `order` sends for the big-endian bytes `abcd`.
    fn wire(abcd: [u8; 4], order: ByteOrder) -> [u16; 2] {
        let [a, b, c, d] = abcd;
        let bytes = match order {
            ByteOrder::ABCD => [a, b, c, d],
            ByteOrder::CDAB => [c, d, a, b],
            ByteOrder::BADC => [b, a, d, c],
            ByteOrder::DCBA => [d, c, b, a],
        };
        [
            u16::from_be_bytes([bytes[0], bytes[1]]),
            u16::from_be_bytes([bytes[2], bytes[3]]),
        ]
    }

    #[test]
    fn f32_decodes_in_every_byte_order() {
        // 123.456f32 is 0x42F6E979.
        let expected = [
            (ByteOrder::ABCD, [0x42F6, 0xE979]),
            (ByteOrder::CDAB, [0xE979, 0x42F6]),
            (ByteOrder::BADC, [0xF642, 0x79E9]),
            (ByteOrder::DCBA, [0x79E9, 0xF642]),
        ];
        for (order, words) in expected {
            assert_eq!(wire(123.456f32.to_be_bytes(), order), words, "{order:?}");
            assert_eq!(
                decode(&words, DataType::F32, order),
                Ok(f64::from(123.456f32)),
                "{order:?}"
            );
        }
        assert_eq!(f64::from(123.456f32), 123.456_001_281_738_28);
    }

    #[test]
    fn i32_and_u32_decode_in_every_byte_order() {
        for order in ORDERS {
            let words = wire((-2i32).to_be_bytes(), order);
            assert_eq!(decode(&words, DataType::I32, order), Ok(-2.0), "{order:?}");
            let words = wire(4_000_000_000u32.to_be_bytes(), order);
            assert_eq!(
                decode(&words, DataType::U32, order),
                Ok(4_000_000_000.0),
                "{order:?}"
            );
            let words = wire(i32::MIN.to_be_bytes(), order);
            assert_eq!(
                decode(&words, DataType::I32, order),
                Ok(-2_147_483_648.0),
                "{order:?}"
            );
        }
        // 4_000_000_000 is 0xEE6B2800: low word first in CDAB.
        assert_eq!(
            decode(&[0x2800, 0xEE6B], DataType::U32, ByteOrder::CDAB),
            Ok(4_000_000_000.0)
        );
        assert_eq!(
            decode(&[0xFFFE, 0xFFFF], DataType::I32, ByteOrder::CDAB),
            Ok(-2.0)
        );
    }

    #[test]
    fn sixteen_bit_types_swap_bytes_only_in_byte_swapped_orders() {
        for order in [ByteOrder::ABCD, ByteOrder::CDAB] {
            assert_eq!(decode(&[0xFFFF], DataType::I16, order), Ok(-1.0));
            assert_eq!(decode(&[0xFFFF], DataType::U16, order), Ok(65535.0));
            assert_eq!(decode(&[0x1194], DataType::U16, order), Ok(4500.0));
            assert_eq!(decode(&[0xFF38], DataType::I16, order), Ok(-200.0));
        }
        for order in [ByteOrder::BADC, ByteOrder::DCBA] {
            assert_eq!(decode(&[0xFFFF], DataType::I16, order), Ok(-1.0));
            assert_eq!(decode(&[0x9411], DataType::U16, order), Ok(4500.0));
            assert_eq!(decode(&[0x38FF], DataType::I16, order), Ok(-200.0));
        }
    }

    #[test]
    fn scale_and_offset_apply_after_decoding() {
        // A pressure in hundredths of a bar and a temperature stored as tenths of a degree + 50.
        assert_eq!(
            decode_scaled(&[450], DataType::U16, ByteOrder::ABCD, 0.01, 0.0),
            Ok(4.5)
        );
        assert_eq!(
            decode_scaled(&[0xFF38], DataType::I16, ByteOrder::ABCD, 0.1, 50.0),
            Ok(30.0)
        );
        assert_eq!(apply_scale(-2.0, 1.0, 0.0), -2.0);
    }

    #[test]
    fn a_wrong_register_count_or_a_nan_is_an_error() {
        assert_eq!(
            decode(&[1], DataType::F32, ByteOrder::ABCD),
            Err(DecodeError::WordCount {
                data_type: DataType::F32,
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            decode(&[0x7FC0, 0x0000], DataType::F32, ByteOrder::ABCD),
            Err(DecodeError::NotFinite { raw: 0x7FC0_0000 })
        );
        assert_eq!(
            DecodeError::NotFinite { raw: 0x7FC0_0000 }.to_string(),
            "the registers hold a float that is not a finite number (0x7fc00000)"
        );
        assert_eq!(
            decode(&[1], DataType::F32, ByteOrder::ABCD)
                .unwrap_err()
                .to_string(),
            "f32 needs 2 register(s), the device sent 1"
        );
    }
}
