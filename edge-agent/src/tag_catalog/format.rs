//! The tag catalog's wire format and object keys: what the agent uploads and the collector
//! reads. It compiles with the agent's `runtime` feature off (serde only), like
//! [`crate::contract`]; `docs/batch-contract.md` (*Tag catalog*) is its human-readable version and
//! both change together.
//!
//! # Invariants
//! - The key is `<prefix>tags/gateway=<id>/<effective_at_us, 20 digits>-<hash>.json`: keys of one
//!   gateway sort by the time their catalog took effect, and the key names the content.
//! - The catalog folder lies beside the gateway folders (`<prefix>gateway=<id>/`), never inside
//!   one, so a collector that predates catalogs lists it as a foreign folder and leaves it alone.
//! - `hash` is [`catalog_hash`] of the gateway and the tags in the order written (sorted by
//!   device, then tag); a reader recomputes it and refuses a catalog whose hash differs.

use serde::{Deserialize, Serialize};

use crate::contract::check_gateway_id;

/// The version of the catalog format written in every catalog's `format_version`. A reader
/// refuses a newer one; fields are only ever added, and readers ignore fields they do not know.
pub const FORMAT_VERSION: u32 = 1;

/// The folder below the raw zone's prefix that holds every gateway's catalogs.
pub const CATALOG_FOLDER: &str = "tags/";

/// One gateway's tag catalog, as uploaded (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagCatalog {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The gateway id (as in its batches).
    pub gateway: String,
    /// When the sensor map this catalog describes took effect on the gateway (its start, or
    /// the accepted reload), microseconds since the Unix epoch, gateway clock. The catalog's
    /// attributes hold for readings from then until the gateway's next catalog.
    pub effective_at_us: i64,
    /// [`catalog_hash`] of `gateway` and `tags`, 16 lowercase hex digits.
    pub hash: String,
    /// Every tag, sorted by device, then tag; no (device, tag) twice.
    pub tags: Vec<CatalogTag>,
}

/// One tag of a catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CatalogTag {
    /// Device name, as in the readings.
    pub device: String,
    /// Tag name, as in the readings.
    pub tag: String,
    /// The source that reads it: `modbus`, `mqtt` or `file_drop`.
    pub source: String,
    /// The site (the map's `site`, as in the readings).
    pub site: String,
    /// The plant area, when the map names one.
    pub area: Option<String>,
    /// The production line, when the map names one.
    pub line: Option<String>,
    /// The machine, when the map names one.
    pub machine: Option<String>,
    /// Engineering unit, as in the readings.
    pub unit: Option<String>,
    /// What the value is, in words.
    pub description: Option<String>,
    /// The sensor map's type: a Modbus type (`f32`, `u16`, `bool`, `string`, ...) or, for MQTT
    /// and dropped files, `number` or `string`.
    pub data_type: String,
}

/// Why a catalog object is not accepted. Each is a property of its key or bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "object key `{0}` is not a tag catalog key; expected `<prefix>tags/gateway=<id>/<effective_at_us, 20 digits>-<16 hex digits>.json`"
    )]
    Key(String),
    #[error("is not a tag catalog: {0}")]
    Json(String),
    #[error(
        "was written in catalog format {found}, this reader knows up to {FORMAT_VERSION}; upgrade the reader"
    )]
    NewerFormat { found: u32 },
    #[error("says gateway `{found}` but lies under the catalog folder of gateway `{folder}`")]
    ForeignGateway { folder: String, found: String },
    #[error(
        "its key says effective at {key_us} µs and hash {key_hash}, its content says {found_us} µs and hash {found_hash}"
    )]
    KeyMismatch {
        key_us: i64,
        key_hash: String,
        found_us: i64,
        found_hash: String,
    },
    #[error("its hash is {declared} but its tags hash to {computed}; the content was altered")]
    HashMismatch { declared: String, computed: String },
    #[error("lists tag `{tag}` of device `{device}` twice or out of order")]
    Unsorted { device: String, tag: String },
}

impl TagCatalog {
    /// A catalog of `tags` (sorted and deduplicated here: the first of a (device, tag) wins)
    /// with its hash.
    pub fn new(gateway: &str, effective_at_us: i64, mut tags: Vec<CatalogTag>) -> Self {
        // Stable sort, so the first definition of a (device, tag) is the one kept.
        tags.sort_by(|a, b| (&a.device, &a.tag).cmp(&(&b.device, &b.tag)));
        tags.dedup_by(|b, a| a.device == b.device && a.tag == b.tag);
        Self {
            format_version: FORMAT_VERSION,
            gateway: gateway.to_owned(),
            effective_at_us,
            hash: catalog_hash(gateway, &tags),
            tags,
        }
    }

    /// Checks a catalog read from under `key` (deserialised by the reader's JSON library)
    /// against its key: format version, gateway, time, hash, order.
    pub fn check(self, key: &CatalogKey) -> Result<Self, CatalogError> {
        let catalog = self;
        if catalog.format_version > FORMAT_VERSION {
            return Err(CatalogError::NewerFormat {
                found: catalog.format_version,
            });
        }
        if catalog.gateway != key.gateway {
            return Err(CatalogError::ForeignGateway {
                folder: key.gateway.clone(),
                found: catalog.gateway,
            });
        }
        if catalog.effective_at_us != key.effective_at_us || catalog.hash != key.hash {
            return Err(CatalogError::KeyMismatch {
                key_us: key.effective_at_us,
                key_hash: key.hash.clone(),
                found_us: catalog.effective_at_us,
                found_hash: catalog.hash,
            });
        }
        for pair in catalog.tags.windows(2) {
            if (&pair[0].device, &pair[0].tag) >= (&pair[1].device, &pair[1].tag) {
                return Err(CatalogError::Unsorted {
                    device: pair[1].device.clone(),
                    tag: pair[1].tag.clone(),
                });
            }
        }
        let computed = catalog_hash(&catalog.gateway, &catalog.tags);
        if computed != catalog.hash {
            return Err(CatalogError::HashMismatch {
                declared: catalog.hash,
                computed,
            });
        }
        Ok(catalog)
    }

    /// The catalog's object key.
    pub fn key(&self) -> CatalogKey {
        CatalogKey {
            gateway: self.gateway.clone(),
            effective_at_us: self.effective_at_us,
            hash: self.hash.clone(),
        }
    }
}

/// The content hash of a catalog: 64-bit FNV-1a over the gateway id and each tag's fields in
/// declaration order, as 16 lowercase hex digits. Each text is followed by a unit separator
/// (0x1F); an absent optional field is a single 0x00 in its place, a present one starts with
/// 0x01, so `None` and `Some("")` differ. It detects change, it is not a signature.
pub fn catalog_hash(gateway: &str, tags: &[CatalogTag]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    let text = |feed: &mut dyn FnMut(&[u8]), s: &str| {
        feed(s.as_bytes());
        feed(&[0x1F]);
    };
    let optional = |feed: &mut dyn FnMut(&[u8]), s: Option<&str>| match s {
        None => feed(&[0x00]),
        Some(s) => {
            feed(&[0x01]);
            feed(s.as_bytes());
            feed(&[0x1F]);
        }
    };
    text(&mut feed, gateway);
    for tag in tags {
        feed(&[0x1E]);
        text(&mut feed, &tag.device);
        text(&mut feed, &tag.tag);
        text(&mut feed, &tag.source);
        text(&mut feed, &tag.site);
        optional(&mut feed, tag.area.as_deref());
        optional(&mut feed, tag.line.as_deref());
        optional(&mut feed, tag.machine.as_deref());
        optional(&mut feed, tag.unit.as_deref());
        optional(&mut feed, tag.description.as_deref());
        text(&mut feed, &tag.data_type);
    }
    format!("{hash:016x}")
}

/// Where a catalog lies in the raw zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CatalogKey {
    pub gateway: String,
    pub effective_at_us: i64,
    pub hash: String,
}

impl CatalogKey {
    /// The folder (below the raw zone's prefix) of every gateway's catalogs: `<prefix>tags/`.
    pub fn folder(prefix: &str) -> String {
        format!("{prefix}{CATALOG_FOLDER}")
    }

    /// The folder of one gateway's catalogs: `<prefix>tags/gateway=<id>/`.
    pub fn gateway_prefix(prefix: &str, gateway: &str) -> String {
        format!("{}gateway={gateway}/", Self::folder(prefix))
    }

    /// The full object key below `prefix`. A time before 1970 (a gateway clock never set) is
    /// written as 0, so keys stay fixed-width and sorted.
    pub fn to_key(&self, prefix: &str) -> String {
        format!(
            "{}{:020}-{}.json",
            Self::gateway_prefix(prefix, &self.gateway),
            self.effective_at_us.max(0),
            self.hash
        )
    }

    /// Parses a full object key written by [`CatalogKey::to_key`] with the same `prefix`.
    pub fn parse(prefix: &str, key: &str) -> Result<Self, CatalogError> {
        let bad = || CatalogError::Key(key.to_owned());
        let rest = key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(CATALOG_FOLDER))
            .and_then(|rest| rest.strip_prefix("gateway="))
            .ok_or_else(bad)?;
        let (gateway, file) = rest.split_once('/').ok_or_else(bad)?;
        check_gateway_id(gateway).map_err(|_| bad())?;
        let stem = file.strip_suffix(".json").ok_or_else(bad)?;
        let (digits, hash) = stem.split_once('-').ok_or_else(bad)?;
        let is_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if hash.len() != 16 || !is_hex(hash) {
            return Err(bad());
        }
        Ok(Self {
            gateway: gateway.to_owned(),
            effective_at_us: digits.parse().map_err(|_| bad())?,
            hash: hash.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(device: &str, name: &str, unit: Option<&str>) -> CatalogTag {
        CatalogTag {
            device: device.to_owned(),
            tag: name.to_owned(),
            source: "modbus".to_owned(),
            site: "plant-ost".to_owned(),
            area: None,
            line: Some("line1".to_owned()),
            machine: None,
            unit: unit.map(str::to_owned),
            description: None,
            data_type: "f32".to_owned(),
        }
    }

    #[test]
    fn the_hash_follows_the_content_not_the_time_or_the_order_given() {
        let a = TagCatalog::new(
            "gw-1",
            1,
            vec![tag("press-3", "b", None), tag("press-3", "a", Some("bar"))],
        );
        let b = TagCatalog::new(
            "gw-1",
            2,
            vec![tag("press-3", "a", Some("bar")), tag("press-3", "b", None)],
        );
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.tags, b.tags);
        let psi = TagCatalog::new(
            "gw-1",
            1,
            vec![tag("press-3", "a", Some("psi")), tag("press-3", "b", None)],
        );
        assert_ne!(a.hash, psi.hash);
        let empty_unit = TagCatalog::new("gw-1", 1, vec![tag("press-3", "b", Some(""))]);
        let no_unit = TagCatalog::new("gw-1", 1, vec![tag("press-3", "b", None)]);
        assert_ne!(empty_unit.hash, no_unit.hash);
        assert_eq!(a.hash.len(), 16);
    }

    #[test]
    fn keys_sort_by_time_and_parse_back() {
        let catalog = TagCatalog::new("gw-1", 1_700_000_000_000_000, vec![tag("d", "t", None)]);
        let key = catalog.key().to_key("raw/");
        assert_eq!(
            key,
            format!(
                "raw/tags/gateway=gw-1/00001700000000000000-{}.json",
                catalog.hash
            )
        );
        assert_eq!(CatalogKey::parse("raw/", &key).unwrap(), catalog.key());
        for bad in [
            "raw/tags/gateway=gw-1/1700000000000000-0123456789abcdef.json",
            "raw/tags/gateway=gw-1/00001700000000000000-0123456789ABCDEF.json",
            "raw/tags/gateway=GW/00001700000000000000-0123456789abcdef.json",
            "raw/gateway=gw-1/00001700000000000000-0123456789abcdef.json",
        ] {
            assert!(CatalogKey::parse("raw/", bad).is_err(), "{bad}");
        }
    }
}
