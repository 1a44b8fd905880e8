//! The learned Modbus read plans: what each device taught the agent about its register map (tags
//! it refuses, registers that do not exist between two tags, the largest request it accepts), kept
//! in the buffer file so a restart does not send the refused requests again.
//!
//! # What always holds
//! - One row per device, in the table `modbus_plans`, keyed by the device's name and stamped with
//!   its link (`tcp 10.0.0.7:502 unit 1`, or the bus, its line and the unit id) and a fingerprint
//!   of everything that shapes its read plan (see
//!   [`crate::sources::modbus`]). A row is used only when both are equal to the running
//!   device's: a device moved to another address, or a map whose tags moved, starts from
//!   nothing, and its old row is deleted on that first load.
//! - A row is written only when the device's plan changed (a hole or a limit learned, a tag that
//!   answers again), never per poll; a plan with nothing learned deletes the row.
//! - The table lives in the buffer file and is reached through a connection of its own, opened
//!   for each load or save and closed after it: a device learns rarely, so no connection per
//!   device stays open. Commits use `synchronous = NORMAL`: a plan lost to a power cut is learned
//!   again with a few refused requests, which is cheaper than an fsync per write on slow flash.
//! - The rows are diagnostics, not data: they are never uploaded, the salvage of a damaged
//!   buffer does not carry them over, and a row that cannot be read (written by a later version,
//!   edited by hand) is deleted and learned again rather than failing the device. A device
//!   removed from the map leaves its row until its name is used again or the row is deleted by
//!   hand; a row takes a few hundred bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;

use super::sqlite::BufferError;
use crate::config::RegisterKind;
use crate::sources::modbus::plan::Learned;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS modbus_plans (
    device        TEXT PRIMARY KEY,
    link          TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    isolated      TEXT NOT NULL,
    cuts          TEXT NOT NULL,
    max_registers INTEGER,
    max_bits      INTEGER,
    learned_us    INTEGER NOT NULL
) STRICT;
";

/// Which plan a row belongs to: a device as it is reached and mapped now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanKey {
    /// The device's name in the sensor map.
    pub device: String,
    /// How the device is reached, as text: `tcp 10.0.0.7:502 unit 1`, or
    /// `bus line5 (/dev/ttyUSB0 19200 8E1) unit 3`.
    pub link: String,
    /// A hash of what shapes the read plan: the tags' names and wire spans, the addressing,
    /// `max_gap` and the configured request limits.
    pub fingerprint: String,
}

/// What a load found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recalled {
    /// The plan learned by an earlier run of this very device.
    Plan(Learned),
    /// Nothing was stored for the device.
    Nothing,
    /// A row was stored for another link or map of this device (or could not be read); it was
    /// deleted. `reason` says which, for the log.
    Discarded { reason: String },
}

/// The learned plans in the buffer file at `path`.
#[derive(Debug, Clone)]
pub struct PlanMemory {
    path: PathBuf,
}

impl PlanMemory {
    /// The plans of the buffer file at `buffer`, which the agent created before its sources
    /// started. Nothing is opened until the first load or save.
    pub fn new(buffer: &Path) -> Self {
        Self {
            path: buffer.to_owned(),
        }
    }

    /// The buffer file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<Connection, BufferError> {
        let err = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        if !self.path.exists() {
            return Err(BufferError::Missing {
                path: self.path.clone(),
            });
        }
        let conn = Connection::open_with_flags(
            &self.path,
            // Never create the file: a missing buffer means a wrong path, not a first start.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(conn)
    }

    /// The plan stored for `key`. A row of the same device under another link or fingerprint,
    /// or one that cannot be read, is deleted and reported as [`Recalled::Discarded`].
    pub fn load(&self, key: &PlanKey) -> Result<Recalled, BufferError> {
        let conn = self.open()?;
        let err = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let row = conn
            .query_row(
                "SELECT link, fingerprint, isolated, cuts, max_registers, max_bits
                   FROM modbus_plans WHERE device = ?1",
                [&key.device],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(err)?;
        let Some((link, fingerprint, isolated, cuts, max_registers, max_bits)) = row else {
            return Ok(Recalled::Nothing);
        };
        let reason = if link != key.link {
            format!("it was learned on {link}")
        } else if fingerprint != key.fingerprint {
            "the device's tags, addressing, max_gap or request limits changed since".to_owned()
        } else {
            match decode(&isolated, &cuts, max_registers, max_bits) {
                Ok(learned) => return Ok(Recalled::Plan(learned)),
                Err(why) => format!("the stored plan cannot be read ({why})"),
            }
        };
        conn.execute("DELETE FROM modbus_plans WHERE device = ?1", [&key.device])
            .map_err(err)?;
        Ok(Recalled::Discarded { reason })
    }

    /// Stores `learned` as the plan of `key` (replacing what the device had), or deletes the
    /// device's row when nothing was learned.
    pub fn save(&self, key: &PlanKey, learned: &Learned, now_us: i64) -> Result<(), BufferError> {
        let conn = self.open()?;
        let err = |source| BufferError::Sqlite {
            path: self.path.clone(),
            source,
        };
        if learned.is_empty() {
            conn.execute("DELETE FROM modbus_plans WHERE device = ?1", [&key.device])
                .map_err(err)?;
            return Ok(());
        }
        conn.execute(
            "INSERT INTO modbus_plans
                 (device, link, fingerprint, isolated, cuts, max_registers, max_bits, learned_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (device) DO UPDATE SET
                 link = excluded.link, fingerprint = excluded.fingerprint,
                 isolated = excluded.isolated, cuts = excluded.cuts,
                 max_registers = excluded.max_registers, max_bits = excluded.max_bits,
                 learned_us = excluded.learned_us",
            params![
                key.device,
                key.link,
                key.fingerprint,
                encode(&learned.isolated),
                encode(&learned.cuts),
                learned.max_registers.map(i64::from),
                learned.max_bits.map(i64::from),
                now_us,
            ],
        )
        .map_err(err)?;
        Ok(())
    }
}

/// `[["holding",2],["coil",7]]`: readable in the `sqlite3` shell, and no tag indices, which a
/// reordered map would change.
fn encode(places: &[(RegisterKind, u16)]) -> String {
    Value::Array(
        places
            .iter()
            .map(|&(kind, address)| Value::Array(vec![kind.name().into(), address.into()]))
            .collect(),
    )
    .to_string()
}

fn decode_places(text: &str) -> Result<Vec<(RegisterKind, u16)>, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Value::Array(items) = value else {
        return Err(format!("`{text}` is not a list"));
    };
    items
        .iter()
        .map(|item| {
            let place = item.as_array().map(Vec::as_slice);
            let Some([Value::String(kind), Value::Number(address)]) = place else {
                return Err(format!("`{item}` is not [table, address]"));
            };
            let kind = [
                RegisterKind::Coil,
                RegisterKind::Discrete,
                RegisterKind::Holding,
                RegisterKind::Input,
            ]
            .into_iter()
            .find(|k| k.name() == kind)
            .ok_or_else(|| format!("unknown table `{kind}`"))?;
            let address = address
                .as_u64()
                .and_then(|a| u16::try_from(a).ok())
                .ok_or_else(|| format!("address {address} is not a register address"))?;
            Ok((kind, address))
        })
        .collect()
}

fn decode(
    isolated: &str,
    cuts: &str,
    max_registers: Option<i64>,
    max_bits: Option<i64>,
) -> Result<Learned, String> {
    let limit = |n: Option<i64>| {
        n.map(|n| u16::try_from(n).map_err(|_| format!("request limit {n} is out of range")))
            .transpose()
    };
    Ok(Learned {
        isolated: decode_places(isolated)?,
        cuts: decode_places(cuts)?,
        max_registers: limit(max_registers)?,
        max_bits: limit(max_bits)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;
    use crate::config::Durability;

    fn key(link: &str, fingerprint: &str) -> PlanKey {
        PlanKey {
            device: "press-3".to_owned(),
            link: link.to_owned(),
            fingerprint: fingerprint.to_owned(),
        }
    }

    fn learned() -> Learned {
        Learned {
            isolated: vec![(RegisterKind::Holding, 2), (RegisterKind::Coil, 65535)],
            cuts: vec![(RegisterKind::Input, 104)],
            max_registers: Some(64),
            max_bits: None,
        }
    }

    fn buffer(dir: &Path) -> PathBuf {
        let path = dir.join("b.db");
        drop(Buffer::open(&path, Durability::Full, "gw-1").unwrap());
        path
    }

    #[test]
    fn a_saved_plan_comes_back_for_the_same_device_link_and_map_only() {
        let dir = tempfile::tempdir().unwrap();
        let memory = PlanMemory::new(&buffer(dir.path()));
        let here = key("tcp 10.0.0.7:502 unit 1", "00aa");
        assert_eq!(memory.load(&here).unwrap(), Recalled::Nothing);
        memory.save(&here, &learned(), 1).unwrap();
        assert_eq!(memory.load(&here).unwrap(), Recalled::Plan(learned()));
        // Saving again replaces the row.
        let more = Learned {
            max_bits: Some(100),
            ..learned()
        };
        memory.save(&here, &more, 2).unwrap();
        assert_eq!(memory.load(&here).unwrap(), Recalled::Plan(more.clone()));

        // Another address: discarded, and gone for good.
        let moved = key("tcp 10.0.0.8:502 unit 1", "00aa");
        assert_eq!(
            memory.load(&moved).unwrap(),
            Recalled::Discarded {
                reason: "it was learned on tcp 10.0.0.7:502 unit 1".to_owned()
            }
        );
        assert_eq!(memory.load(&here).unwrap(), Recalled::Nothing);

        memory.save(&here, &more, 3).unwrap();
        assert!(matches!(
            memory
                .load(&key("tcp 10.0.0.7:502 unit 1", "00bb"))
                .unwrap(),
            Recalled::Discarded { .. }
        ));

        // Nothing learned: no row.
        memory.save(&here, &learned(), 4).unwrap();
        memory.save(&here, &Learned::default(), 5).unwrap();
        assert_eq!(memory.load(&here).unwrap(), Recalled::Nothing);
    }

    #[test]
    fn a_row_that_cannot_be_read_is_deleted_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = buffer(dir.path());
        let memory = PlanMemory::new(&path);
        let here = key("tcp 10.0.0.7:502 unit 1", "00aa");
        memory.save(&here, &learned(), 1).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE modbus_plans SET isolated = '[[\"tables\", 2]]'", [])
            .unwrap();
        drop(conn);
        assert_eq!(
            memory.load(&here).unwrap(),
            Recalled::Discarded {
                reason: "the stored plan cannot be read (unknown table `tables`)".to_owned()
            }
        );
        assert_eq!(memory.load(&here).unwrap(), Recalled::Nothing);
    }

    #[test]
    fn a_missing_buffer_is_reported_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.db");
        let memory = PlanMemory::new(&path);
        assert!(matches!(
            memory.load(&key("l", "f")),
            Err(BufferError::Missing { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn places_are_stored_as_table_and_address() {
        assert_eq!(
            encode(&learned().isolated),
            "[[\"holding\",2],[\"coil\",65535]]"
        );
        assert_eq!(decode_places("[]").unwrap(), Vec::new());
        assert_eq!(
            decode_places("[[\"input\",70000]]").unwrap_err(),
            "address 70000 is not a register address"
        );
        assert_eq!(
            decode_places("{}").unwrap_err(),
            "`{}` is not a list".to_owned()
        );
    }
}
