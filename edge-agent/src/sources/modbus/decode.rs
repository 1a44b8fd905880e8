//! Turning register words and bits into engineering values.
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
//! 64-bit values (bytes `A`..`H`) follow the same two rules, as Telegraf's modbus input does:
//! `CDAB` and `DCBA` reverse the order of the words (`GH EF CD AB`), `BADC` and `DCBA` swap the
//! bytes inside each word (`BA DC FE HG`). A 16-bit value has bytes `A B` only: `ABCD` and `CDAB`
//! read it as sent, `BADC` and `DCBA` swap its two bytes; `bit` numbers the bits of that
//! 16-bit value, 0 being the least significant.
//!
//! # Strings
//! A `string` tag of `length` registers holds up to `2 * length` ASCII characters, in register
//! order. `ABCD` takes each register's high byte first (`"AB"` is `0x4142`), `BADC` its low byte
//! first (`"AB"` is `0x4241`, as many PLCs that store strings little-endian send it); `CDAB` and
//! `DCBA` read like `ABCD` and `BADC` (there is no word order to reverse; validation refuses them
//! for strings). The text ends at the first NUL byte (what follows it, often a longer earlier
//! value left behind, is ignored) and trailing spaces are dropped: `"MIX-7\0\0\0"` and
//! `"MIX-7   "` both read `MIX-7`. Every byte before the end must be printable ASCII (0x20 to
//! 0x7E): any other byte, such as a control character or the first byte of a UTF-8 or Latin-1
//! letter, makes the reading bad with [`DecodeError::NotAscii`] naming the byte and its
//! position. Nothing is replaced: a half-right text in the table is worse than a visible bad
//! reading, and the error says where to look.

use crate::config::{ByteOrder, DataType, ModbusTag};

/// A decoded value: a number (the batch's `value`) or the text of a string tag (`value_text`).
#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    Number(f64),
    Text(String),
}

impl TagValue {
    /// The number, for a numeric value.
    pub fn number(&self) -> Option<f64> {
        match self {
            TagValue::Number(n) => Some(*n),
            TagValue::Text(_) => None,
        }
    }

    /// The text, for a string tag's value.
    pub fn text(&self) -> Option<&str> {
        match self {
            TagValue::Number(_) => None,
            TagValue::Text(t) => Some(t),
        }
    }
}

impl std::fmt::Display for TagValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TagValue::Number(n) => write!(f, "{n}"),
            TagValue::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Register words that cannot be decoded as the configured type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The device answered with a different number of registers (or bits) than the type needs.
    #[error("{} needs {expected} register(s), the device sent {found}", type_name(*.data_type))]
    WordCount {
        data_type: DataType,
        expected: usize,
        found: usize,
    },
    /// The registers hold an `f32` that is not a number (NaN or infinite).
    #[error("the registers hold a float that is not a finite number ({raw:#010x})")]
    NotFinite { raw: u32 },
    /// The registers hold an `f64` that is not a number (NaN or infinite).
    #[error("the registers hold a float that is not a finite number ({raw:#018x})")]
    NotFinite64 { raw: u64 },
    /// `bool` and `bit` are not decoded from words alone: `bool` comes from a coil or discrete
    /// input ([`decode_bool`]), `bit` needs its bit number ([`decode_bit`]).
    #[error("{} is not decoded from register words alone; use {}", type_name(*.data_type), match .data_type { DataType::Bit => "decode_bit with the bit number", _ => "decode_bool on the coil or discrete input" })]
    NotAWordType { data_type: DataType },
    /// Only `bool` is read from coils and discrete inputs.
    #[error("{} cannot be read from coils or discrete inputs, which hold single bits; use bool", type_name(*.data_type))]
    NotABitType { data_type: DataType },
    /// A bit number past the 16 bits of a register.
    #[error("bit {bit} does not exist in a 16-bit register (bits 0 to 15)")]
    BitOutOfRange { bit: u8 },
    /// `string` is decoded as text ([`decode_text`]), not as a number.
    #[error("string is text, not a number; decode it with decode_text and the tag's length")]
    NotANumber,
    /// A string's registers hold a byte that is not printable ASCII before the text ends.
    #[error(
        "character {position} of the string is byte {byte:#04x}, which is not printable ASCII (0x20 to 0x7e); check the tag's address, length and byte_order against the device's manual"
    )]
    NotAscii {
        /// The byte as it arrived.
        byte: u8,
        /// Its 1-based position in the text, after the byte order was applied.
        position: usize,
    },
}

/// Decodes the raw registers of one word-typed value (`u16` to `f64`), before scaling.
pub fn decode(
    words: &[u16],
    data_type: DataType,
    byte_order: ByteOrder,
) -> Result<f64, DecodeError> {
    if data_type == DataType::String {
        return Err(DecodeError::NotANumber);
    }
    let expected = usize::from(data_type.register_count());
    if words.len() != expected {
        return Err(DecodeError::WordCount {
            data_type,
            expected,
            found: words.len(),
        });
    }
    let value = match data_type {
        DataType::Bool | DataType::Bit => return Err(DecodeError::NotAWordType { data_type }),
        DataType::String => return Err(DecodeError::NotANumber),
        DataType::U16 => f64::from(word16(words[0], byte_order)),
        DataType::I16 => f64::from(word16(words[0], byte_order).cast_signed()),
        DataType::U32 => f64::from(u32::from_be_bytes(value_bytes(words, byte_order))),
        DataType::I32 => f64::from(i32::from_be_bytes(value_bytes(words, byte_order))),
        DataType::F32 => {
            let raw = u32::from_be_bytes(value_bytes(words, byte_order));
            let value = f32::from_bits(raw);
            if !value.is_finite() {
                return Err(DecodeError::NotFinite { raw });
            }
            f64::from(value)
        }
        DataType::U64 | DataType::I64 | DataType::F64 => {
            let raw = u64::from_be_bytes(value_bytes(words, byte_order));
            match data_type {
                // The value column is f64: beyond 2^53 the nearest f64 is the documented result.
                #[allow(clippy::cast_precision_loss)]
                DataType::U64 => raw as f64,
                #[allow(clippy::cast_precision_loss)]
                DataType::I64 => raw.cast_signed() as f64,
                _ => {
                    let value = f64::from_bits(raw);
                    if !value.is_finite() {
                        return Err(DecodeError::NotFinite64 { raw });
                    }
                    value
                }
            }
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

/// Bit `bit` (0 = least significant) of a register, after `byte_order`'s byte swap: 0.0 or 1.0.
pub fn decode_bit(word: u16, bit: u8, byte_order: ByteOrder) -> Result<f64, DecodeError> {
    if bit > 15 {
        return Err(DecodeError::BitOutOfRange { bit });
    }
    Ok(f64::from((word16(word, byte_order) >> bit) & 1))
}

/// A coil or discrete input: 0.0 or 1.0.
pub fn decode_bool(bit: bool) -> f64 {
    f64::from(u8::from(bit))
}

/// Decodes the bits a coil or discrete input read answered (only the first is used), before
/// scaling. Only `bool` fits these tables.
pub fn decode_bits(bits: &[bool], data_type: DataType) -> Result<f64, DecodeError> {
    if data_type != DataType::Bool {
        return Err(DecodeError::NotABitType { data_type });
    }
    match bits {
        [bit, ..] => Ok(decode_bool(*bit)),
        [] => Err(DecodeError::WordCount {
            data_type,
            expected: 1,
            found: 0,
        }),
    }
}

/// Decodes the registers of one tag of a holding or input register table, before scaling:
/// `bit` takes bit `bit` of the first word, every other type goes through [`decode`].
pub fn decode_words(
    words: &[u16],
    data_type: DataType,
    bit: Option<u8>,
    byte_order: ByteOrder,
) -> Result<f64, DecodeError> {
    match (data_type, bit, words) {
        (DataType::Bit, Some(bit), [word]) => decode_bit(*word, bit, byte_order),
        (DataType::Bit, Some(_), _) => Err(DecodeError::WordCount {
            data_type,
            expected: 1,
            found: words.len(),
        }),
        _ => decode(words, data_type, byte_order),
    }
}

/// Decodes a string tag's `length` registers into its text (see the module doc: byte order per
/// register, ends at the first NUL, trailing spaces dropped, printable ASCII only).
pub fn decode_text(
    words: &[u16],
    length: u16,
    byte_order: ByteOrder,
) -> Result<String, DecodeError> {
    if words.len() != usize::from(length) {
        return Err(DecodeError::WordCount {
            data_type: DataType::String,
            expected: usize::from(length),
            found: words.len(),
        });
    }
    let mut text = String::with_capacity(words.len() * 2);
    let bytes = words
        .iter()
        .flat_map(|&word| word16(word, byte_order).to_be_bytes());
    for (index, byte) in bytes.enumerate() {
        match byte {
            0 => break,
            0x20..=0x7E => text.push(char::from(byte)),
            _ => {
                return Err(DecodeError::NotAscii {
                    byte,
                    position: index + 1,
                });
            }
        }
    }
    text.truncate(text.trim_end_matches(' ').len());
    Ok(text)
}

/// Decodes one tag of a holding or input register table, before scaling: a string tag into
/// its text, every other type into a number ([`decode_words`]).
pub fn decode_register_tag(words: &[u16], tag: &ModbusTag) -> Result<TagValue, DecodeError> {
    if tag.data_type == DataType::String {
        decode_text(words, tag.register_count(), tag.byte_order).map(TagValue::Text)
    } else {
        decode_words(words, tag.data_type, tag.bit, tag.byte_order).map(TagValue::Number)
    }
}

/// `raw * scale + offset`, computed as written (no fused multiply-add) so that a consumer
/// recomputing it gets the same bits. A float tag with `scale = 1` and `offset = 0` keeps its
/// exact `f32` value widened to `f64` (123.456 reads as 123.45600128173828).
pub fn apply_scale(raw: f64, scale: f64, offset: f64) -> f64 {
    raw * scale + offset
}

/// The type's name as written in the sensor map.
pub fn type_name(data_type: DataType) -> &'static str {
    data_type.name()
}

fn word16(word: u16, order: ByteOrder) -> u16 {
    match order {
        ByteOrder::ABCD | ByteOrder::CDAB => word,
        ByteOrder::BADC | ByteOrder::DCBA => word.swap_bytes(),
    }
}

/// The value's bytes, most significant first, from its `N / 2` registers in wire order (the
/// caller has checked the count).
fn value_bytes<const N: usize>(words: &[u16], order: ByteOrder) -> [u8; N] {
    let mut in_order: Vec<u16> = words.iter().map(|&word| word16(word, order)).collect();
    if matches!(order, ByteOrder::CDAB | ByteOrder::DCBA) {
        in_order.reverse();
    }
    let mut bytes = [0; N];
    for (pair, word) in bytes.chunks_exact_mut(2).zip(in_order) {
        pair.copy_from_slice(&word.to_be_bytes());
    }
    bytes
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

    #[test]
    fn sixty_four_bit_types_generalise_the_four_orders() {
        // The bytes 01 02 .. 08 as each order sends them (Telegraf's generalisation).
        let wire = [
            (ByteOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
            (ByteOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
            (ByteOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
            (ByteOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, words) in wire {
            // 0x0102030405060708 needs 57 bits: the value column holds the nearest f64.
            assert_eq!(
                decode(&words, DataType::U64, order),
                Ok(72_623_859_790_382_856.0),
                "{order:?}"
            );
        }
        // 1.5 is 0x3FF8000000000000; -2 is 0xFFFF_FFFF_FFFF_FFFE.
        assert_eq!(
            decode(&[0, 0, 0, 0x3FF8], DataType::F64, ByteOrder::CDAB),
            Ok(1.5)
        );
        assert_eq!(
            decode(&[0xF83F, 0, 0, 0], DataType::F64, ByteOrder::BADC),
            Ok(1.5)
        );
        assert_eq!(
            decode(
                &[0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
                DataType::I64,
                ByteOrder::DCBA
            ),
            Ok(-2.0)
        );
        assert_eq!(
            decode(&[0x20, 0, 0, 0], DataType::U64, ByteOrder::ABCD),
            Ok(9_007_199_254_740_992.0)
        );
        assert_eq!(
            decode(&[0x7FF8, 0, 0, 0], DataType::F64, ByteOrder::ABCD),
            Err(DecodeError::NotFinite64 {
                raw: 0x7FF8_0000_0000_0000
            })
        );
        assert_eq!(
            decode(&[1, 2], DataType::F64, ByteOrder::ABCD)
                .unwrap_err()
                .to_string(),
            "f64 needs 4 register(s), the device sent 2"
        );
    }

    /// The registers a device using `order` sends for `text`, NUL-padded to `length` registers.
    fn string_wire(text: &[u8], length: usize, order: ByteOrder) -> Vec<u16> {
        let mut bytes = text.to_vec();
        bytes.resize(length * 2, 0);
        bytes
            .chunks_exact(2)
            .map(|pair| {
                let word = u16::from_be_bytes([pair[0], pair[1]]);
                match order {
                    ByteOrder::ABCD | ByteOrder::CDAB => word,
                    ByteOrder::BADC | ByteOrder::DCBA => word.swap_bytes(),
                }
            })
            .collect()
    }

    #[test]
    fn strings_read_high_byte_first_in_abcd_and_low_byte_first_in_badc() {
        // "MIX-7" in four registers: 'M' 'I' | 'X' '-' | '7' NUL | NUL NUL.
        assert_eq!(
            string_wire(b"MIX-7", 4, ByteOrder::ABCD),
            [0x4D49, 0x582D, 0x3700, 0x0000]
        );
        assert_eq!(
            decode_text(&[0x4D49, 0x582D, 0x3700, 0x0000], 4, ByteOrder::ABCD),
            Ok("MIX-7".to_owned())
        );
        assert_eq!(
            decode_text(&[0x494D, 0x2D58, 0x0037, 0x0000], 4, ByteOrder::BADC),
            Ok("MIX-7".to_owned())
        );
        // The same registers read in the other order give the swapped text, not an error.
        // The wrong order gives the pairs swapped; its NUL now comes first in the third word.
        assert_eq!(
            decode_text(&[0x4D49, 0x582D, 0x3700, 0x0000], 4, ByteOrder::BADC),
            Ok("IM-X".to_owned())
        );
        // CDAB and DCBA have no word order to reverse: per register they read like ABCD, BADC.
        for (order, like) in [
            (ByteOrder::CDAB, ByteOrder::ABCD),
            (ByteOrder::DCBA, ByteOrder::BADC),
        ] {
            let words = string_wire(b"BATCH 0042", 5, like);
            assert_eq!(decode_text(&words, 5, order), decode_text(&words, 5, like));
        }
    }

    #[test]
    fn trailing_nuls_and_spaces_are_not_part_of_the_text() {
        for order in ORDERS {
            let read = |text: &[u8], length: usize| {
                decode_text(
                    &string_wire(text, length, order),
                    u16::try_from(length).unwrap(),
                    order,
                )
            };
            assert_eq!(read(b"PN-4471", 4), Ok("PN-4471".to_owned()), "{order:?}");
            assert_eq!(read(b"PN-4471 ", 4), Ok("PN-4471".to_owned()), "{order:?}");
            assert_eq!(read(b"AB   ", 8), Ok("AB".to_owned()), "{order:?}");
            // Leading and inner spaces are text.
            assert_eq!(read(b"  A B", 3), Ok("  A B".to_owned()), "{order:?}");
            // Every character used: no terminator needed.
            assert_eq!(read(b"ABCDEFGH", 4), Ok("ABCDEFGH".to_owned()), "{order:?}");
            // Only padding: an empty text, still a good reading.
            assert_eq!(read(b"", 3), Ok(String::new()), "{order:?}");
            assert_eq!(read(b"      ", 3), Ok(String::new()), "{order:?}");
            // What follows the first NUL is ignored, even bytes that are not ASCII.
            assert_eq!(read(b"OK\0\xC3\xA9X", 4), Ok("OK".to_owned()), "{order:?}");
        }
    }

    #[test]
    fn a_byte_that_is_not_printable_ascii_makes_the_string_bad_and_is_named() {
        // "Füller" in Latin-1: 'F' 0xFC ...
        let words = string_wire(b"F\xFCller", 4, ByteOrder::ABCD);
        let err = decode_text(&words, 4, ByteOrder::ABCD).unwrap_err();
        assert_eq!(
            err,
            DecodeError::NotAscii {
                byte: 0xFC,
                position: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "character 2 of the string is byte 0xfc, which is not printable ASCII (0x20 to 0x7e); check the tag's address, length and byte_order against the device's manual"
        );
        // Control characters (a tab, DEL) are refused too; the position counts after the swap.
        let words = string_wire(b"AB\tC", 2, ByteOrder::BADC);
        assert_eq!(
            decode_text(&words, 2, ByteOrder::BADC),
            Err(DecodeError::NotAscii {
                byte: b'\t',
                position: 3
            })
        );
        assert_eq!(
            decode_text(&[0x417F], 1, ByteOrder::ABCD),
            Err(DecodeError::NotAscii {
                byte: 0x7F,
                position: 2
            })
        );
    }

    #[test]
    fn a_string_needs_exactly_its_length_in_registers() {
        assert_eq!(
            decode_text(&[0x4142], 3, ByteOrder::ABCD)
                .unwrap_err()
                .to_string(),
            "string needs 3 register(s), the device sent 1"
        );
        assert_eq!(
            decode(&[0x4142], DataType::String, ByteOrder::ABCD),
            Err(DecodeError::NotANumber)
        );
        let tag = ModbusTag::string("recipe", crate::config::RegisterKind::Holding, 0, 2);
        assert_eq!(
            decode_register_tag(&[0x4142, 0x4300], &tag),
            Ok(TagValue::Text("ABC".to_owned()))
        );
        let number = ModbusTag::new("n", crate::config::RegisterKind::Holding, 0, DataType::U16);
        assert_eq!(
            decode_register_tag(&[7], &number),
            Ok(TagValue::Number(7.0))
        );
    }

    #[test]
    fn bits_and_bools_read_zero_or_one() {
        // 0x8005: bits 0, 2 and 15 set.
        let read = |bit| decode_bit(0x8005, bit, ByteOrder::ABCD);
        assert_eq!(
            (read(0), read(1), read(2), read(15)),
            (Ok(1.0), Ok(0.0), Ok(1.0), Ok(1.0))
        );
        // Byte-swapped devices send 0x0580 for the same status word.
        assert_eq!(decode_bit(0x0580, 15, ByteOrder::BADC), Ok(1.0));
        assert_eq!(decode_bit(0x0580, 7, ByteOrder::DCBA), Ok(0.0));
        assert_eq!(
            decode_bit(0x8005, 16, ByteOrder::ABCD),
            Err(DecodeError::BitOutOfRange { bit: 16 })
        );
        assert_eq!((decode_bool(true), decode_bool(false)), (1.0, 0.0));
        assert_eq!(
            decode(&[1], DataType::Bit, ByteOrder::ABCD)
                .unwrap_err()
                .to_string(),
            "bit is not decoded from register words alone; use decode_bit with the bit number"
        );
    }
}
