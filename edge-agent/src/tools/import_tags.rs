//! `edge-agent import-tags`: turns a tag export from an OPC server or SCADA into sensor-map TOML,
//! so a plant engineer starts from the tag list the plant already has instead of retyping it.
//!
//! The output is a run of `[[modbus.tags]]` tables (with a comment header naming the source) to
//! place under a `[[modbus]]` device. Rows that cannot be converted are reported with their line
//! number and the fix; every other row is still converted.
//!
//! # Accepted files
//!
//! Both formats are CSV with a header row: comma-separated (semicolon when the header holds no
//! comma, as Kepware writes with its `;` delimiter option), fields optionally in double quotes with
//! `""` for a quote, UTF-8 with or without a byte-order mark. Column names are matched ignoring
//! case, spaces and punctuation (`Eng Units` and `Eng. Units` are the same column); columns not
//! listed here are ignored, and so are blank lines.
//!
//! ## `kepware`: a KEPServerEX / Kepware Modbus device exported with File › Export CSV
//!
//! | column | required | use |
//! |---|---|---|
//! | `Tag Name` | yes | the tag name |
//! | `Address` | yes | Modbus address in the 5- or 6-digit notation, one-based: `400001`/`40001` → holding 0, `300001`/`30001` → input 0, `000001`/`00001` → coil 0, `100001`/`10001` → discrete input 0; `400001.3` is bit 3 (0 = least significant) of holding 0 and becomes `type = "bit"` |
//! | `Data Type` | no | `Word` → u16, `Short` → i16, `DWord` → u32, `Long` → i32, `Float` → f32, `Double` → f64, `LLong` → i64, `QWord` → u64, `Boolean` → bool; empty or `Default` means Word for registers and Boolean for coils and discrete inputs |
//! | `Scaling` | no | empty or `None`: no scaling; `Linear`: scale and offset from the four columns below |
//! | `Raw Low`, `Raw High`, `Scaled Low`, `Scaled High` | with `Linear` | value = raw × scale + offset through both points |
//! | `Negate Value` | no | `1` negates the scaled value |
//! | `Eng Units` | no | the tag's unit |
//! | `Description` | no | written as a comment above the tag |
//!
//! Kepware keeps the word order of 32-bit values in the device settings, not in the tag export:
//! every tag gets the sensor map's default `ABCD`; set `byte_order` where the device differs.
//!
//! ## `ignition`: an Ignition tag export (CSV) of OPC tags on Ignition's Modbus driver
//!
//! | column | required | use |
//! |---|---|---|
//! | `Name` | yes | the tag name |
//! | `OPCItemPath` | yes | `[device]PREFIXn` (optionally after `ns=1;s=`), `n` one-based as with Ignition's default addressing: `HR` i16, `HRUS` u16, `HRI` i32, `HRUI` u32, `HRF` f32, `HRD` f64, `HRI_64` i64, `HRUI_64` u64, the same with `IR` for input registers, `C` coil, `DI` discrete input |
//! | `ScaleMode` | no | empty, `0` or `Off`: no scaling; `1` or `Linear`: scale and offset from `RawLow`, `RawHigh`, `ScaledLow`, `ScaledHigh` |
//! | `EngUnit` | no | the tag's unit |
//! | `Documentation` | no | written as a comment above the tag |
//!
//! The `[device]` part of the item path selects rows with `--device`; without it, every row must
//! name the same device. The wire type comes from the address prefix, not from `DataType`.
//!
//! # What always holds
//! - Every row is either converted or reported; the output holds only converted rows.
//! - The output, placed under a `[[modbus]]` device, passes `edge-agent validate`: names are
//!   checked against the sensor map's rules and duplicate names and overlapping registers are
//!   reported as bad rows instead of being written.
//! - A type or register kind the agent cannot read yet is a bad row, decided by the agent's own
//!   config types, so the tool follows the agent as it learns new types.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::IntoDeserializer;

use crate::config::{DataType, RegisterKind, is_safe_name};

/// The export formats `import-tags` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Kepware / KEPServerEX CSV export of a Modbus device.
    Kepware,
    /// Ignition CSV tag export of tags on Ignition's Modbus driver.
    Ignition,
}

impl Format {
    fn title(self) -> &'static str {
        match self {
            Format::Kepware => "Kepware CSV export",
            Format::Ignition => "Ignition CSV tag export",
        }
    }

    fn cli_name(self) -> &'static str {
        match self {
            Format::Kepware => "kepware",
            Format::Ignition => "ignition",
        }
    }

    fn name_column(self) -> &'static str {
        match self {
            Format::Kepware => "Tag Name",
            Format::Ignition => "Name",
        }
    }

    fn address_column(self) -> &'static str {
        match self {
            Format::Kepware => "Address",
            Format::Ignition => "OPCItemPath",
        }
    }
}

/// Why a tag export could not be converted, or why one row of it was left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("{}: cannot read the tag export ({reason}); check the path and its permissions", file.display())]
    Io { file: PathBuf, reason: String },
    /// The file has no header row.
    #[error("{}: the file is empty; export the tags with their header row", file.display())]
    Empty { file: PathBuf },
    /// The header lacks a column the format needs.
    #[error("{}:{line}: the header has no `{column}` column; --format {} needs the columns `{}` and `{}`; check --format and the header row", file.display(), format.cli_name(), format.name_column(), format.address_column())]
    MissingColumn {
        file: PathBuf,
        line: usize,
        column: &'static str,
        format: Format,
    },
    /// A quoted field is never closed.
    #[error("{}:{line}: a quoted field starts here and is never closed; close it with `\"` or remove the stray quote", file.display())]
    UnclosedQuote { file: PathBuf, line: usize },
    /// One row could not be converted; the message says why and how to fix it.
    #[error("{}:{line}: {}{message}", file.display(), tag.as_ref().map(|t| format!("tag `{t}`: ")).unwrap_or_default())]
    BadRow {
        file: PathBuf,
        line: usize,
        tag: Option<String>,
        message: String,
    },
}

/// Exit code when the export cannot be read (EX_NOINPUT from sysexits.h).
pub const EXIT_NOINPUT: u8 = 66;
/// Exit code when the export or some of its rows are malformed (EX_DATAERR).
pub const EXIT_DATAERR: u8 = 65;

impl ImportError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Io { .. } => EXIT_NOINPUT,
            Self::Empty { .. }
            | Self::MissingColumn { .. }
            | Self::UnclosedQuote { .. }
            | Self::BadRow { .. } => EXIT_DATAERR,
        }
    }
}

/// The converted tags and the rows left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// Sensor-map TOML: a comment header and one `[[modbus.tags]]` table per converted row.
    pub toml: String,
    /// How many rows were converted.
    pub converted: usize,
    /// One [`ImportError::BadRow`] per row left out, top to bottom.
    pub bad_rows: Vec<ImportError>,
}

/// Reads and converts the export at `file`.
pub fn import_file(
    file: &Path,
    format: Format,
    device: Option<&str>,
) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(file).map_err(|e| ImportError::Io {
        file: file.to_owned(),
        reason: e.to_string(),
    })?;
    // Exports from Windows tools are sometimes not UTF-8; a replaced character in a description
    // is better than refusing the whole file.
    let text = String::from_utf8_lossy(&bytes);
    import_str(&text, file, format, device)
}

/// Converts export text as if read from `file` (used in messages and in the output's header).
pub fn import_str(
    text: &str,
    file: &Path,
    format: Format,
    device: Option<&str>,
) -> Result<Imported, ImportError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let records = parse_csv(text, file)?;
    let mut records = records.into_iter();
    let Some(header) = records.next() else {
        return Err(ImportError::Empty {
            file: file.to_owned(),
        });
    };
    let columns = Columns::new(&header, format, file)?;

    let mut converter = Converter {
        file,
        format,
        device,
        tags: Vec::new(),
        bad_rows: Vec::new(),
        first_device: None,
        skipped_other_devices: 0,
    };
    for record in records {
        converter.row(&columns, &record);
    }
    let toml = converter.render();
    Ok(Imported {
        toml,
        converted: converter.tags.len(),
        bad_rows: converter.bad_rows,
    })
}

/// One CSV record and the line it starts on (1-based).
#[derive(Debug)]
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// RFC 4180 CSV with the delimiter guessed from the header line.
fn parse_csv(text: &str, file: &Path) -> Result<Vec<Record>, ImportError> {
    let header_line = text.lines().next().unwrap_or("");
    let delimiter = if !header_line.contains(',') && header_line.contains(';') {
        ';'
    } else {
        ','
    };
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut quote_line = 0;
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.trim().is_empty() => {
                field.clear();
                in_quotes = true;
                quote_line = line;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                push_record(&mut records, record_line, std::mem::take(&mut fields));
                line += 1;
                record_line = line;
            }
            c if c == delimiter => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(ImportError::UnclosedQuote {
            file: file.to_owned(),
            line: quote_line,
        });
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        push_record(&mut records, record_line, fields);
    }
    Ok(records)
}

fn push_record(records: &mut Vec<Record>, line: usize, fields: Vec<String>) {
    let fields: Vec<String> = fields.into_iter().map(|f| f.trim().to_owned()).collect();
    if fields.iter().any(|f| !f.is_empty()) {
        records.push(Record { line, fields });
    }
}

/// `Eng. Units`, `eng units` and `EngUnits` are one column.
fn normalize(column: &str) -> String {
    column
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Where each column the converter reads sits in a record.
struct Columns {
    name: usize,
    address: usize,
    data_type: Option<usize>,
    scaling: Option<usize>,
    raw_low: Option<usize>,
    raw_high: Option<usize>,
    scaled_low: Option<usize>,
    scaled_high: Option<usize>,
    negate: Option<usize>,
    unit: Option<usize>,
    description: Option<usize>,
}

impl Columns {
    fn new(header: &Record, format: Format, file: &Path) -> Result<Self, ImportError> {
        let find = |names: &[&str]| {
            header
                .fields
                .iter()
                .position(|f| names.contains(&normalize(f).as_str()))
        };
        let required = |column: &'static str| {
            find(&[normalize(column).as_str()]).ok_or_else(|| ImportError::MissingColumn {
                file: file.to_owned(),
                line: header.line,
                column,
                format,
            })
        };
        let name = required(format.name_column())?;
        let address = required(format.address_column())?;
        Ok(match format {
            Format::Kepware => Self {
                name,
                address,
                data_type: find(&["datatype"]),
                scaling: find(&["scaling"]),
                raw_low: find(&["rawlow"]),
                raw_high: find(&["rawhigh"]),
                scaled_low: find(&["scaledlow"]),
                scaled_high: find(&["scaledhigh"]),
                negate: find(&["negatevalue"]),
                unit: find(&["engunits", "engunit"]),
                description: find(&["description"]),
            },
            Format::Ignition => Self {
                name,
                address,
                // The address prefix decides the wire type; Ignition's DataType is the tag's
                // client-side type and may differ.
                data_type: None,
                scaling: find(&["scalemode"]),
                raw_low: find(&["rawlow"]),
                raw_high: find(&["rawhigh"]),
                scaled_low: find(&["scaledlow"]),
                scaled_high: find(&["scaledhigh"]),
                negate: None,
                unit: find(&["engunit", "engunits"]),
                description: find(&["documentation"]),
            },
        })
    }
}

fn field(record: &Record, index: Option<usize>) -> &str {
    index
        .and_then(|i| record.fields.get(i))
        .map_or("", String::as_str)
}

/// A converted row.
#[derive(Debug, Clone, PartialEq)]
struct Tag {
    line: usize,
    name: String,
    register: &'static str,
    address: u16,
    bit: Option<u8>,
    data_type: &'static str,
    /// Registers (or bits) the value occupies.
    width: u16,
    scale: f64,
    offset: f64,
    unit: Option<String>,
    description: Option<String>,
}

/// Where a row's value lives on the wire, before the agent's support is checked.
struct WireAddress {
    register: &'static str,
    address: u16,
    /// The bit of the register (Kepware's `400001.3`).
    bit: Option<u8>,
    /// The sensor-map type implied by the address (Ignition), if any.
    implied_type: Option<&'static str>,
}

struct Converter<'a> {
    file: &'a Path,
    format: Format,
    device: Option<&'a str>,
    tags: Vec<Tag>,
    bad_rows: Vec<ImportError>,
    /// Ignition: the device of the first row, when `--device` was not given.
    first_device: Option<String>,
    /// Ignition: rows of other devices left out because of `--device`.
    skipped_other_devices: usize,
}

impl Converter<'_> {
    fn row(&mut self, columns: &Columns, record: &Record) {
        let name = field(record, Some(columns.name)).to_owned();
        let tag = if name.is_empty() {
            None
        } else {
            Some(name.clone())
        };
        match self.convert(columns, record, name) {
            Ok(Some(tag)) => self.tags.push(tag),
            Ok(None) => self.skipped_other_devices += 1,
            Err(message) => self.bad_rows.push(ImportError::BadRow {
                file: self.file.to_owned(),
                line: record.line,
                tag,
                message,
            }),
        }
    }

    /// `Ok(None)`: the row belongs to a device not selected with `--device`.
    fn convert(
        &mut self,
        columns: &Columns,
        record: &Record,
        name: String,
    ) -> Result<Option<Tag>, String> {
        if name.is_empty() {
            return Err(format!(
                "the `{}` column is empty; name the tag or delete the row",
                self.format.name_column()
            ));
        }
        if !is_safe_name(&name) {
            return Err(
                "the name is not allowed in a sensor map; rename the tag to 1-64 letters, digits, `-`, `_` and `.`, starting with a letter or digit".to_owned(),
            );
        }
        let raw_address = field(record, Some(columns.address));
        let wire = match self.format {
            Format::Kepware => kepware_address(raw_address)?,
            Format::Ignition => {
                let (device, wire) = ignition_item_path(raw_address)?;
                if !self.keeps_device(&device)? {
                    return Ok(None);
                }
                wire
            }
        };
        let data_type = match wire.implied_type {
            Some(implied) => implied,
            None => kepware_type(field(record, columns.data_type), wire.register, wire.bit)?,
        };
        check_supported(wire.register, data_type)?;
        let width = register_width(data_type);
        if u32::from(wire.address) + u32::from(width) - 1 > u32::from(u16::MAX) {
            return Err(format!(
                "{data_type} at {} address {} ends past the last address 65535; check the address",
                wire.register, wire.address
            ));
        }
        let (scale, offset) = self.scaling(columns, record)?;
        let unit = Some(field(record, columns.unit).to_owned()).filter(|u| !u.is_empty());
        let description =
            Some(field(record, columns.description).to_owned()).filter(|d| !d.is_empty());
        let tag = Tag {
            line: record.line,
            name,
            register: wire.register,
            address: wire.address,
            bit: wire.bit,
            data_type,
            width,
            scale,
            offset,
            unit,
            description,
        };
        self.check_against_earlier(&tag)?;
        Ok(Some(tag))
    }

    /// Whether an Ignition row of `device` is converted.
    fn keeps_device(&mut self, device: &str) -> Result<bool, String> {
        if let Some(wanted) = self.device {
            return Ok(device == wanted);
        }
        match &self.first_device {
            None => {
                self.first_device = Some(device.to_owned());
                Ok(true)
            }
            Some(first) if first == device => Ok(true),
            Some(first) => Err(format!(
                "the row belongs to device `{device}` but earlier rows to `{first}`; convert one device at a time with --device {device}"
            )),
        }
    }

    // Exact comparisons on purpose: only identical limits make the line degenerate.
    #[expect(
        clippy::float_cmp,
        reason = "identical limits are what make scaling undefined"
    )]
    fn scaling(&self, columns: &Columns, record: &Record) -> Result<(f64, f64), String> {
        let mode = field(record, columns.scaling);
        let linear = match (self.format, mode.to_ascii_lowercase().as_str()) {
            (_, "" | "none") | (Format::Ignition, "0" | "off") => false,
            (Format::Kepware, "linear") | (Format::Ignition, "1" | "linear") => true,
            _ => {
                return Err(format!(
                    "scaling `{mode}` is not supported; use linear scaling or none, or convert the values downstream"
                ));
            }
        };
        let (mut scale, mut offset) = (1.0, 0.0);
        if linear {
            let number = |index: Option<usize>, column: &str| -> Result<f64, String> {
                let text = field(record, index);
                text.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        format!("linear scaling needs a number in `{column}`, found `{text}`; fill in the scaling range")
                    })
            };
            let raw_low = number(columns.raw_low, "Raw Low")?;
            let raw_high = number(columns.raw_high, "Raw High")?;
            let scaled_low = number(columns.scaled_low, "Scaled Low")?;
            let scaled_high = number(columns.scaled_high, "Scaled High")?;
            if raw_low == raw_high || scaled_low == scaled_high {
                return Err(format!(
                    "linear scaling from {raw_low}..{raw_high} to {scaled_low}..{scaled_high} is not a line; use two different raw and two different scaled values"
                ));
            }
            scale = (scaled_high - scaled_low) / (raw_high - raw_low);
            offset = scaled_low - raw_low * scale;
        }
        if field(record, columns.negate) == "1" {
            scale = -scale;
            offset = -offset;
        }
        // `-0` in a sensor map would only puzzle the reader.
        Ok((scale, offset + 0.0))
    }

    fn check_against_earlier(&self, tag: &Tag) -> Result<(), String> {
        for earlier in &self.tags {
            if earlier.name == tag.name {
                return Err(format!(
                    "the name is already used on line {}; tag names must be unique within a device, rename one of them",
                    earlier.line
                ));
            }
            let (first, last) = range(tag);
            let (e_first, e_last) = range(earlier);
            // Two bit tags share a register unless they name the same bit.
            let both_bits = earlier.bit.is_some() && tag.bit.is_some();
            let clash = if both_bits {
                earlier.address == tag.address && earlier.bit == tag.bit
            } else {
                first <= e_last && e_first <= last
            };
            if earlier.register == tag.register && clash {
                return Err(format!(
                    "{} overlaps tag `{}` on line {} ({}); give each tag its own registers or leave one out",
                    describe(tag),
                    earlier.name,
                    earlier.line,
                    describe(earlier)
                ));
            }
        }
        Ok(())
    }

    #[expect(
        clippy::float_cmp,
        reason = "only the exact defaults 1 and 0 may be left out of the map"
    )]
    fn render(&self) -> String {
        let mut out = String::new();
        let source = self.file.file_name().map_or_else(
            || self.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            out,
            "# Converted by `edge-agent import-tags` from {source} ({}).",
            self.format.title()
        );
        let rows = self.tags.len() + self.bad_rows.len();
        let _ = write!(out, "# {} of {rows} rows converted", self.tags.len());
        if let Some(device) = self.device {
            let _ = write!(out, " for device `{device}`");
        }
        if self.skipped_other_devices > 0 {
            let _ = write!(
                out,
                " ({} rows of other devices skipped)",
                self.skipped_other_devices
            );
        }
        if self.bad_rows.is_empty() {
            out.push_str(".\n");
        } else {
            out.push_str("; the rows left out are listed on stderr.\n");
        }
        out.push_str("# Place these tables under the [[modbus]] device they belong to.\n");
        if self.format == Format::Kepware {
            out.push_str(
                "# Kepware keeps the word order in the device settings: set byte_order on 32- and 64-bit tags if it is not ABCD.\n",
            );
        }
        for tag in &self.tags {
            out.push('\n');
            if let Some(description) = &tag.description {
                for line in description.lines() {
                    let _ = writeln!(out, "# {line}");
                }
            }
            out.push_str("[[modbus.tags]]\n");
            let _ = writeln!(out, "name = {}", toml_string(&tag.name));
            let _ = writeln!(out, "register = \"{}\"", tag.register);
            let _ = writeln!(out, "address = {}", tag.address);
            let _ = writeln!(out, "type = \"{}\"", tag.data_type);
            if let Some(bit) = tag.bit {
                let _ = writeln!(out, "bit = {bit}");
            }
            if tag.scale != 1.0 {
                let _ = writeln!(out, "scale = {}", toml_float(tag.scale));
            }
            if tag.offset != 0.0 {
                let _ = writeln!(out, "offset = {}", toml_float(tag.offset));
            }
            if let Some(unit) = &tag.unit {
                let _ = writeln!(out, "unit = {}", toml_string(unit));
            }
        }
        out
    }
}

fn range(tag: &Tag) -> (u32, u32) {
    let first = u32::from(tag.address);
    (first, first + u32::from(tag.width) - 1)
}

fn describe(tag: &Tag) -> String {
    if let Some(bit) = tag.bit {
        return format!("bit {bit} of {} {}", tag.register, tag.address);
    }
    let (first, last) = range(tag);
    if first == last {
        format!("{} {first}", tag.register)
    } else {
        format!("{} {first}-{last}", tag.register)
    }
}

/// Kepware's Modbus notation: a table digit then a one-based number, 5 digits (`40001`) or 6
/// (`400001`).
fn kepware_address(text: &str) -> Result<WireAddress, String> {
    let fix = "use the one-based 5- or 6-digit notation: 4xxxxx holding, 3xxxxx input, 0xxxxx coil, 1xxxxx discrete input (400001 is holding 0)";
    if text.is_empty() {
        return Err(format!("the address is empty; {fix}"));
    }
    let (text, bit) = match text.split_once('.') {
        None => (text, None),
        Some((register, bit)) => {
            let bit = bit.parse::<u8>().ok().filter(|b| *b <= 15).ok_or_else(|| {
                format!("bit `{bit}` in address `{text}` does not exist; use a bit number from 0 to 15, as in 400001.3")
            })?;
            (register, Some(bit))
        }
    };
    if !(5..=6).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("address `{text}` is not a Modbus address; {fix}"));
    }
    let (table, number) = text.split_at(1);
    let register = match table {
        "4" => "holding",
        "3" => "input",
        "0" => "coil",
        "1" => "discrete",
        _ => {
            return Err(format!(
                "address `{text}` starts with {table}, which is no Modbus table; {fix}"
            ));
        }
    };
    let address =
        one_based(number).ok_or_else(|| format!("address `{text}` is outside its table; {fix}"))?;
    if bit.is_some() && matches!(register, "coil" | "discrete") {
        return Err(format!(
            "address `{text}.{}` names a bit of a {register}, which is a single bit already; leave out the bit number",
            bit.unwrap_or_default()
        ));
    }
    Ok(WireAddress {
        register,
        address,
        bit,
        implied_type: None,
    })
}

/// `1` → 0 … `65536` → 65535.
fn one_based(number: &str) -> Option<u16> {
    let n: u32 = number.parse().ok()?;
    u16::try_from(n.checked_sub(1)?).ok()
}

/// `ns=1;s=[press-3]HRF101` → (`press-3`, holding 100 as f32).
fn ignition_item_path(text: &str) -> Result<(String, WireAddress), String> {
    let fix = "use Ignition's Modbus address `[device]PREFIXn`, for example [press-3]HRF101";
    let path = text.rsplit_once(";s=").map_or(text, |(_, path)| path);
    let Some((device, address)) = path.strip_prefix('[').and_then(|rest| rest.split_once(']'))
    else {
        return Err(format!(
            "item path `{text}` names no device in brackets; {fix}"
        ));
    };
    let digits = address
        .find(|c: char| c.is_ascii_digit())
        .ok_or_else(|| format!("item path `{text}` has no register number; {fix}"))?;
    let (prefix, number) = address.split_at(digits);
    // Ignition writes the 64-bit prefixes with a suffix after the number's prefix: HRI_64.
    let (register, implied) = match prefix.to_ascii_uppercase().as_str() {
        "HR" => ("holding", "i16"),
        "HRUS" => ("holding", "u16"),
        "HRI" => ("holding", "i32"),
        "HRUI" => ("holding", "u32"),
        "HRF" => ("holding", "f32"),
        "HRD" => ("holding", "f64"),
        "HRI_" | "HRI_64" => ("holding", "i64"),
        "HRUI_" | "HRUI_64" => ("holding", "u64"),
        "IR" => ("input", "i16"),
        "IRUS" => ("input", "u16"),
        "IRI" => ("input", "i32"),
        "IRUI" => ("input", "u32"),
        "IRF" => ("input", "f32"),
        "IRD" => ("input", "f64"),
        "IRI_" | "IRI_64" => ("input", "i64"),
        "IRUI_" | "IRUI_64" => ("input", "u64"),
        "C" => ("coil", "bool"),
        "DI" => ("discrete", "bool"),
        _ => {
            return Err(format!(
                "address prefix `{prefix}` in `{text}` is not supported; use HR, HRUS, HRI, HRUI, HRF, HRD, HRI_64, HRUI_64, the same with IR, C or DI"
            ));
        }
    };
    // `HRI_64100` is not a thing: the 64-bit prefixes are `HRI_64` followed by the number.
    let number = if prefix.ends_with('_') {
        number
            .strip_prefix("64")
            .ok_or_else(|| format!("address prefix `{prefix}` in `{text}` is not supported; use HRI_64 or HRUI_64 for 64-bit values"))?
    } else {
        number
    };
    if number.contains('.') {
        return Err(format!(
            "bit address `{text}` is not supported by import-tags; read the whole register and add the bit tag by hand"
        ));
    }
    let address = one_based(number).ok_or_else(|| {
        format!(
            "register number in `{text}` must be 1-65536 (Ignition's one-based addressing); {fix}"
        )
    })?;
    Ok((
        device.to_owned(),
        WireAddress {
            register,
            address,
            bit: None,
            implied_type: Some(implied),
        },
    ))
}

/// Kepware's data type names; `register` decides the default.
fn kepware_type(text: &str, register: &str, bit: Option<u8>) -> Result<&'static str, String> {
    let bits = matches!(register, "coil" | "discrete");
    if let Some(bit) = bit {
        return match text.to_ascii_lowercase().as_str() {
            "" | "default" | "boolean" => Ok("bit"),
            _ => Err(format!(
                "data type `{text}` does not fit the bit address (bit {bit}); use Boolean"
            )),
        };
    }
    let mapped = match text.to_ascii_lowercase().as_str() {
        "" | "default" => {
            if bits {
                "bool"
            } else {
                "u16"
            }
        }
        "boolean" => "bool",
        "word" => "u16",
        "short" => "i16",
        "dword" => "u32",
        "long" => "i32",
        "float" => "f32",
        "double" => "f64",
        "llong" => "i64",
        "qword" => "u64",
        _ => {
            return Err(format!(
                "data type `{text}` has no sensor-map equivalent; use Word, Short, DWord, Long, Float, Double, LLong, QWord or Boolean"
            ));
        }
    };
    if bits && mapped != "bool" {
        return Err(format!(
            "data type `{text}` does not fit a {register} address, which holds one bit; use Boolean"
        ));
    }
    if !bits && mapped == "bool" {
        return Err(format!(
            "Boolean on a {register} register needs a bit number; write the address as 400001.3 for bit 3, or use a word type"
        ));
    }
    Ok(mapped)
}

/// Asks the agent's own config types whether they know `register` and `data_type`, so the tool
/// never writes a map the agent refuses.
fn check_supported(register: &str, data_type: &str) -> Result<(), String> {
    if RegisterKind::deserialize(register.into_deserializer())
        .map_err(|_: serde::de::value::Error| ())
        .is_err()
    {
        return Err(format!(
            "{register} addresses are not supported by the agent yet; leave the row out"
        ));
    }
    if DataType::deserialize(data_type.into_deserializer())
        .map_err(|_: serde::de::value::Error| ())
        .is_err()
    {
        return Err(format!(
            "type {data_type} is not supported by the agent yet; use a 16- or 32-bit type if the device allows it, or leave the row out"
        ));
    }
    Ok(())
}

/// Registers (or bits) a sensor-map type occupies; only called for types the agent knows.
fn register_width(data_type: &str) -> u16 {
    let parsed: Result<DataType, serde::de::value::Error> =
        DataType::deserialize(data_type.into_deserializer());
    parsed.map_or(1, DataType::register_count)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A float as TOML reads it back to the same bits (`2` would be an integer: write `2.0`).
fn toml_float(v: f64) -> String {
    let text = v.to_string();
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}
