//! Splitting the gateways between collector instances: `shard = "i/n"`.
//!
//! A gateway belongs to shard `fnv1a64(gateway id) % n`, with FNV-1a 64 over the id's UTF-8
//! bytes (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`). The hash is written down
//! here rather than taken from `std` because `std`'s hasher is seeded per process and may change
//! between Rust releases: two instances, or one instance before and after an upgrade, must agree.
//!
//! # Invariants
//! - A gateway maps to the same shard for a given `n`, on every host and every version.
//! - The `n` shards of one `n` cover every gateway exactly once.
//! - Exactly once does not depend on the shard: when `n` changes (instances added or removed, or
//!   two instances briefly disagree during a rollout), a gateway may be applied by two instances
//!   at once, and the Delta commit protocol plus the gateway's `txn` watermark still apply each
//!   reading once. Sharding only saves the LISTs and the lost commit races.

use std::fmt;

/// One shard of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u64,
    count: u64,
}

impl Shard {
    /// Shard `index` of `count`; `None` unless `index < count`.
    pub fn new(index: u64, count: u64) -> Option<Self> {
        (index < count).then_some(Self { index, count })
    }

    /// Parses `"<index>/<count>"`, like `"0/4"`; the error names the fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not a shard; write \"<index>/<count>\" with 0 <= index < count, like \"0/4\" for the first of four instances"
            )
        };
        let (index, count) = text.split_once('/').ok_or_else(bad)?;
        let index: u64 = index.trim().parse().map_err(|_| bad())?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!(
                "`{text}` has a count of 0; write \"<index>/<count>\" with count >= 1, like \"0/4\""
            ));
        }
        Self::new(index, count).ok_or_else(|| {
            format!(
                "`{text}`: index {index} is not below count {count}; the shards of {count} instances are 0/{count} to {}/{count}",
                count - 1
            )
        })
    }

    /// The shard `gateway` belongs to among `count`.
    pub fn of(gateway: &str, count: u64) -> u64 {
        fnv1a64(gateway.as_bytes()) % count.max(1)
    }

    /// Whether this instance applies `gateway`.
    pub fn owns(&self, gateway: &str) -> bool {
        Self::of(gateway, self.count) == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64_as_documented() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn every_gateway_has_exactly_one_shard() {
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).unwrap()).collect();
        let mut per_shard = [0; 3];
        for n in 0..300 {
            let gateway = format!("gw-{n}");
            let owners: Vec<usize> = (0..3).filter(|&i| shards[i].owns(&gateway)).collect();
            assert_eq!(owners.len(), 1, "{gateway}");
            per_shard[owners[0]] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 70), "{per_shard:?}");
    }

    #[test]
    fn shard_settings_parse_or_name_the_fix() {
        assert_eq!(Shard::parse("1/4").unwrap().to_string(), "1/4");
        assert_eq!(Shard::parse("0/1").unwrap(), Shard::new(0, 1).unwrap());
        assert_eq!(
            Shard::parse("4/4").unwrap_err(),
            "`4/4`: index 4 is not below count 4; the shards of 4 instances are 0/4 to 3/4"
        );
        assert_eq!(
            Shard::parse("0/0").unwrap_err(),
            "`0/0` has a count of 0; write \"<index>/<count>\" with count >= 1, like \"0/4\""
        );
        assert_eq!(
            Shard::parse("first").unwrap_err(),
            "`first` is not a shard; write \"<index>/<count>\" with 0 <= index < count, like \"0/4\" for the first of four instances"
        );
    }
}
