//! Tools for the plant engineer: read a device now ([`probe`]) and turn an existing tag export
//! into a sensor map ([`import_tags`]).

pub mod import_tags;
pub mod probe;
