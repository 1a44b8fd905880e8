//! The (`gateway`, `seq`) keys committed recently, so a reading the agent put twice (its
//! PutRecords retries are at least once) lands in the live table once.

use std::collections::{HashSet, VecDeque};

/// A bounded set of keys: the oldest are forgotten first.
#[derive(Debug)]
pub(super) struct RecentKeys {
    capacity: usize,
    keys: HashSet<(String, i64)>,
    order: VecDeque<(String, i64)>,
}

impl RecentKeys {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            keys: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    pub(super) fn contains(&self, gateway: &str, seq: i64) -> bool {
        // The tuple borrow cannot be expressed without allocating; keys are short.
        self.keys.contains(&(gateway.to_owned(), seq))
    }

    pub(super) fn insert(&mut self, gateway: &str, seq: i64) {
        let key = (gateway.to_owned(), seq);
        if !self.keys.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_keys_are_forgotten_beyond_the_capacity() {
        let mut recent = RecentKeys::new(2);
        recent.insert("gw-1", 1);
        recent.insert("gw-1", 1);
        recent.insert("gw-2", 1);
        assert!(recent.contains("gw-1", 1) && recent.contains("gw-2", 1));
        recent.insert("gw-1", 2);
        assert!(!recent.contains("gw-1", 1));
        assert!(recent.contains("gw-2", 1) && recent.contains("gw-1", 2));
    }
}
