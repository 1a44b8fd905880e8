//! The gateway's tag catalog: every tag the sensor map defines, with where it sits in the plant
//! (site, area, line, machine), its unit, description, data type and source, published to the
//! raw zone whenever it changes, so the collector can keep a history of the asset hierarchy
//! (`docs/batch-contract.md`, *Tag catalog*).
//!
//! [`format`] is the wire format and the object keys, shared with the collector like
//! [`crate::contract`]; [`build`] derives a catalog from a sensor map; [`publish`] uploads it.
//!
//! # Invariants
//! - A catalog's `hash` depends only on its gateway and its tags (sorted by device, then tag),
//!   never on when it was built: the same map gives the same hash on every gateway start.
//! - A catalog is uploaded only when its hash differs from the last one this gateway's buffer
//!   folder recorded as uploaded; the record is written only after the store confirmed the PUT.
//! - Publishing never holds up readings: it runs in its own task, retries failures with a
//!   capped backoff, and a newer catalog replaces one still waiting for its upload.
//! - Tags whose device or tag name is only known at run time (MQTT topic levels, file columns,
//!   Sparkplug B metrics) are not in the catalog.

pub mod format;

#[cfg(feature = "runtime")]
pub mod build;
#[cfg(feature = "runtime")]
pub mod publish;

pub use format::{CatalogKey, CatalogTag, TagCatalog, catalog_hash};
#[cfg(feature = "runtime")]
pub use publish::CatalogPublisher;
