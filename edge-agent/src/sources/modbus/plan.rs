//! Request planning: which read requests one poll of a device sends.
//!
//! # What always holds
//! - The plan is a pure function of the tags' wire spans, the device's `max_gap`, its request
//!   size limits and what the device taught the poller ([`Planner::isolate`],
//!   [`Planner::cut_before`], [`Planner::limit_to`]): the same map and the same lessons give the
//!   same requests in the same order, so request counts can be tested exactly.
//! - One request reads one table. Tags are taken in (table, address) order and merged greedily
//!   while the request stays within the device's limit and at most `max_gap` unused registers
//!   (or bits) lie between one tag and the next. The limit is the smallest of the protocol
//!   maximum (125 registers for holding and input registers, 2000 bits for coils and discrete
//!   inputs), the device's `max_registers_per_request` / `max_bits_per_request`, and the size
//!   the device was seen to accept when it refused a longer read ([`Planner::limit_to`]). A
//!   single tag wider than the limit is still read, alone. The registers in a gap are read and
//!   thrown away; every tag keeps its own decode.
//! - A tag the device refused alone with "illegal data address" (a hole) is never part of a
//!   merged request again; it is still asked for alone every poll, so it reads bad with the
//!   device's own answer and comes back by itself when the PLC program grows the register.
//! - A cut, learned where a merged request was refused although its two halves were answered,
//!   keeps the tags on either side in separate requests: the registers between them do not exist.
//! - A learned size limit only ever goes down, and never below one tag: it is the largest
//!   request the device answered that was shorter than the shortest it refused.
//! - What was learned can be taken out as [`Learned`] (in wire terms: table and address, not tag
//!   indices) and put back into a planner of the same map ([`Planner::restore_learned`]), which
//!   then sends the very requests the first one sent.

use std::collections::BTreeSet;

use crate::config::RegisterKind;

/// The most holding or input registers one request may read (Modbus application protocol
/// specification, functions 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// The most coils or discrete inputs one request may read (functions 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// The largest request the protocol allows for a table.
pub fn max_count(kind: RegisterKind) -> u16 {
    if kind.is_bits() {
        MAX_BITS
    } else {
        MAX_REGISTERS
    }
}

/// The most registers and bits one request of a device may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Holding and input registers, 1 to [`MAX_REGISTERS`].
    pub registers: u16,
    /// Coils and discrete inputs, 1 to [`MAX_BITS`].
    pub bits: u16,
}

impl Limits {
    /// The protocol maximum, lowered to what the sensor map says where it says so (a value
    /// outside the protocol's range is clamped into it).
    pub fn new(registers: Option<u16>, bits: Option<u16>) -> Self {
        Self {
            registers: registers.map_or(MAX_REGISTERS, |n| n.clamp(1, MAX_REGISTERS)),
            bits: bits.map_or(MAX_BITS, |n| n.clamp(1, MAX_BITS)),
        }
    }

    /// The limit for `kind`'s table.
    pub fn of(self, kind: RegisterKind) -> u16 {
        if kind.is_bits() {
            self.bits
        } else {
            self.registers
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(None, None)
    }
}

/// What a device taught its planner, in wire terms, so it can be kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    /// Tags read alone, as (table, first wire address), in plan order.
    pub isolated: Vec<(RegisterKind, u16)>,
    /// Tags that start a new request, as (table, first wire address), in plan order.
    pub cuts: Vec<(RegisterKind, u16)>,
    /// The learned register limit, when the device refused a longer read.
    pub max_registers: Option<u16>,
    /// The learned bit limit, when the device refused a longer read.
    pub max_bits: Option<u16>,
}

impl Learned {
    /// Whether nothing was learned.
    pub fn is_empty(&self) -> bool {
        self.isolated.is_empty()
            && self.cuts.is_empty()
            && self.max_registers.is_none()
            && self.max_bits.is_none()
    }
}

/// Where one tag lives on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagSpan {
    /// The tag's index in the device's `tags`.
    pub tag: usize,
    /// Its table.
    pub kind: RegisterKind,
    /// Its first wire address.
    pub start: u16,
    /// How many registers (or bits) it occupies.
    pub count: u16,
}

impl TagSpan {
    /// One past the last wire address; `u32` because a tag may end at 65535.
    fn end(self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// One read request and the tags whose values it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRequest {
    /// The table read.
    pub kind: RegisterKind,
    /// The first wire address read.
    pub start: u16,
    /// How many registers (or bits) are read.
    pub count: u16,
    /// The tags answered by it, as indices into the device's `tags`, in address order.
    pub tags: Vec<usize>,
}

impl PlannedRequest {
    /// The smallest request covering `spans`, which are non-empty, of one table and in address
    /// order.
    fn covering(spans: &[TagSpan]) -> Self {
        let start = spans.iter().map(|s| s.start).min().unwrap_or(0);
        let end = spans
            .iter()
            .map(|s| s.end())
            .max()
            .unwrap_or(u32::from(start));
        Self {
            kind: spans.first().map_or(RegisterKind::Holding, |s| s.kind),
            start,
            // Spans come from validated tags, which end at 65536 at most.
            count: u16::try_from(end - u32::from(start)).unwrap_or(u16::MAX),
            tags: spans.iter().map(|s| s.tag).collect(),
        }
    }
}

/// Orders the tables in a plan: bits first, then registers, as in the protocol's function codes.
fn table_rank(kind: RegisterKind) -> u8 {
    match kind {
        RegisterKind::Coil => 1,
        RegisterKind::Discrete => 2,
        RegisterKind::Holding => 3,
        RegisterKind::Input => 4,
    }
}

/// A device's read plan and what the device taught about its register map.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Every plannable tag, in (table, address, end, index) order.
    spans: Vec<TagSpan>,
    max_gap: u16,
    /// Tags read alone: the device refused them alone with "illegal data address".
    isolated: BTreeSet<usize>,
    /// Tags that start a new request: the registers between them and the tag before do not exist.
    cuts: BTreeSet<usize>,
    /// The limits the sensor map allows (the protocol's unless it says less).
    configured: Limits,
    /// Limits learned from refusals, when below the configured ones.
    learned_registers: Option<u16>,
    learned_bits: Option<u16>,
    requests: Vec<PlannedRequest>,
}

impl Planner {
    /// Plans `spans` (one per tag that has a wire address) with at most `max_gap` unused
    /// registers or bits read between two tags of one request, and the protocol maximum per
    /// request.
    pub fn new(spans: Vec<TagSpan>, max_gap: u16) -> Self {
        Self::with_limits(spans, max_gap, Limits::default())
    }

    /// Like [`Planner::new`], with requests of at most `limits`.
    pub fn with_limits(mut spans: Vec<TagSpan>, max_gap: u16, limits: Limits) -> Self {
        spans.sort_by_key(|s| (table_rank(s.kind), s.start, s.end(), s.tag));
        let mut planner = Self {
            spans,
            max_gap,
            isolated: BTreeSet::new(),
            cuts: BTreeSet::new(),
            configured: limits,
            learned_registers: None,
            learned_bits: None,
            requests: Vec::new(),
        };
        planner.replan();
        planner
    }

    /// The most registers and bits one request reads now: the configured limits, lowered by
    /// what the device taught.
    pub fn limits(&self) -> Limits {
        Limits {
            registers: self
                .learned_registers
                .map_or(self.configured.registers, |n| {
                    n.min(self.configured.registers)
                }),
            bits: self
                .learned_bits
                .map_or(self.configured.bits, |n| n.min(self.configured.bits)),
        }
    }

    /// Keeps requests of `kind`'s table (registers, or bits) to at most `count` from now on:
    /// the device refused a longer one. Returns whether the plan's limit went down.
    pub fn limit_to(&mut self, kind: RegisterKind, count: u16) -> bool {
        let count = count.max(1);
        if count >= self.limits().of(kind) {
            return false;
        }
        if kind.is_bits() {
            self.learned_bits = Some(count);
        } else {
            self.learned_registers = Some(count);
        }
        self.replan();
        true
    }

    /// What the device taught so far, in wire terms.
    pub fn learned(&self) -> Learned {
        let wire = |tags: &BTreeSet<usize>| {
            self.spans
                .iter()
                .filter(|s| tags.contains(&s.tag))
                .map(|s| (s.kind, s.start))
                .collect::<Vec<_>>()
        };
        let mut isolated = wire(&self.isolated);
        // Bit tags of one register share its address: one entry stands for all of them.
        isolated.dedup();
        Learned {
            isolated,
            cuts: wire(&self.cuts),
            max_registers: self
                .learned_registers
                .filter(|&n| n < self.configured.registers),
            max_bits: self.learned_bits.filter(|&n| n < self.configured.bits),
        }
    }

    /// Takes back what a planner of the same map learned before (see [`Planner::learned`]).
    /// Entries that name no tag of this map are left out. Returns whether the plan changed.
    pub fn restore_learned(&mut self, learned: &Learned) -> bool {
        let before = self.requests.clone();
        for &(kind, start) in &learned.isolated {
            for span in self
                .spans
                .iter()
                .filter(|s| s.kind == kind && s.start == start)
            {
                self.isolated.insert(span.tag);
            }
        }
        for &(kind, start) in &learned.cuts {
            if let Some(span) = self
                .spans
                .iter()
                .find(|s| s.kind == kind && s.start == start)
            {
                self.cuts.insert(span.tag);
            }
        }
        if let Some(n) = learned.max_registers {
            self.learned_registers = Some(n.max(1));
        }
        if let Some(n) = learned.max_bits {
            self.learned_bits = Some(n.max(1));
        }
        self.replan();
        self.requests != before
    }

    /// The requests of one poll, in the order they are sent.
    pub fn requests(&self) -> &[PlannedRequest] {
        &self.requests
    }

    /// Whether `tag` is read alone because the device refused it.
    pub fn is_isolated(&self, tag: usize) -> bool {
        self.isolated.contains(&tag)
    }

    /// The two halves of a request of several tags (by tag count, first half in address order),
    /// each covering only its own tags; `None` for a single tag.
    pub fn split(&self, request: &PlannedRequest) -> Option<(PlannedRequest, PlannedRequest)> {
        if request.tags.len() < 2 {
            return None;
        }
        let spans: Vec<TagSpan> = request
            .tags
            .iter()
            .filter_map(|tag| self.spans.iter().find(|s| s.tag == *tag).copied())
            .collect();
        if spans.len() < 2 {
            return None;
        }
        let (left, right) = spans.split_at(spans.len() / 2);
        Some((
            PlannedRequest::covering(left),
            PlannedRequest::covering(right),
        ))
    }

    /// Reads `tag` alone from now on. Returns whether the plan changed.
    pub fn isolate(&mut self, tag: usize) -> bool {
        let changed = self.isolated.insert(tag);
        if changed {
            self.replan();
        }
        changed
    }

    /// Lets `tag` join merged requests again (it was answered alone). Returns whether the plan
    /// changed.
    pub fn restore(&mut self, tag: usize) -> bool {
        let changed = self.isolated.remove(&tag);
        if changed {
            self.replan();
        }
        changed
    }

    /// Starts a new request at `tag` from now on. Returns whether the plan changed.
    pub fn cut_before(&mut self, tag: usize) -> bool {
        let changed = self.cuts.insert(tag);
        if changed {
            self.replan();
        }
        changed
    }

    fn replan(&mut self) {
        let limits = self.limits();
        let mut requests = Vec::new();
        let mut current: Vec<TagSpan> = Vec::new();
        for &span in &self.spans {
            if let Some(first) = current.first().copied() {
                let last_isolated = current.iter().any(|s| self.isolated.contains(&s.tag));
                let end = current.iter().map(|s| s.end()).max().unwrap_or(first.end());
                let merged_end = end.max(span.end());
                let fits = span.kind == first.kind
                    && !last_isolated
                    && !self.isolated.contains(&span.tag)
                    && !self.cuts.contains(&span.tag)
                    && u32::from(span.start) <= end + u32::from(self.max_gap)
                    && merged_end - u32::from(first.start) <= u32::from(limits.of(span.kind));
                if !fits {
                    requests.push(PlannedRequest::covering(&current));
                    current.clear();
                }
            }
            current.push(span);
        }
        if !current.is_empty() {
            requests.push(PlannedRequest::covering(&current));
        }
        self.requests = requests;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegisterKind::{Coil, Discrete, Holding, Input};

    fn span(tag: usize, kind: RegisterKind, start: u16, count: u16) -> TagSpan {
        TagSpan {
            tag,
            kind,
            start,
            count,
        }
    }

    /// `(table, start, count, tags)` of every request.
    fn shape(planner: &Planner) -> Vec<(RegisterKind, u16, u16, Vec<usize>)> {
        planner
            .requests()
            .iter()
            .map(|r| (r.kind, r.start, r.count, r.tags.clone()))
            .collect()
    }

    #[test]
    fn contiguous_and_near_tags_of_one_table_share_a_request() {
        let planner = Planner::new(
            vec![
                span(0, Holding, 100, 2),
                span(1, Holding, 102, 1),
                // 7 unused registers (103-109): within a gap of 10.
                span(2, Holding, 110, 4),
                // 11 unused registers (114-124): too far.
                span(3, Holding, 125, 1),
                span(4, Input, 100, 1),
                span(5, Coil, 3, 1),
                span(6, Coil, 0, 1),
                span(7, Discrete, 7, 1),
            ],
            10,
        );
        assert_eq!(
            shape(&planner),
            vec![
                (Coil, 0, 4, vec![6, 5]),
                (Discrete, 7, 1, vec![7]),
                (Holding, 100, 14, vec![0, 1, 2]),
                (Holding, 125, 1, vec![3]),
                (Input, 100, 1, vec![4]),
            ]
        );
    }

    #[test]
    fn a_gap_of_zero_merges_only_contiguous_tags() {
        let planner = Planner::new(
            vec![
                span(0, Holding, 0, 2),
                span(1, Holding, 2, 2),
                span(2, Holding, 5, 1),
            ],
            0,
        );
        assert_eq!(
            shape(&planner),
            vec![(Holding, 0, 4, vec![0, 1]), (Holding, 5, 1, vec![2])]
        );
    }

    #[test]
    fn bits_of_one_register_share_it() {
        let planner = Planner::new(
            vec![
                span(0, Holding, 20, 1),
                span(1, Holding, 20, 1),
                span(2, Holding, 21, 1),
            ],
            0,
        );
        assert_eq!(shape(&planner), vec![(Holding, 20, 2, vec![0, 1, 2])]);
    }

    #[test]
    fn requests_stop_at_the_protocol_maximum() {
        // 70 f32 registers pairs: 140 registers, more than one request may read.
        let spans = (0..70).map(|i| span(i, Holding, u16::try_from(i * 2).unwrap(), 2));
        let planner = Planner::new(spans.collect(), 10);
        let requests = planner.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!((requests[0].start, requests[0].count), (0, 124));
        assert_eq!(requests[0].tags.len(), 62);
        assert_eq!((requests[1].start, requests[1].count), (124, 16));

        let coils = (0..2001).map(|i| span(i, Coil, u16::try_from(i).unwrap(), 1));
        let planner = Planner::new(coils.collect(), 0);
        let counts: Vec<u16> = planner.requests().iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![2000, 1]);
    }

    #[test]
    fn a_tag_ending_at_the_last_register_is_planned() {
        let planner = Planner::new(vec![span(0, Holding, 65534, 2)], 10);
        assert_eq!(shape(&planner), vec![(Holding, 65534, 2, vec![0])]);
    }

    #[test]
    fn splits_halve_by_tags_and_cover_only_their_own_tags() {
        let planner = Planner::new(
            vec![
                span(0, Holding, 0, 1),
                span(1, Holding, 4, 2),
                span(2, Holding, 8, 1),
                span(3, Holding, 12, 4),
                span(4, Holding, 20, 1),
            ],
            10,
        );
        let whole = planner.requests()[0].clone();
        assert_eq!((whole.start, whole.count), (0, 21));
        let (left, right) = planner.split(&whole).unwrap();
        assert_eq!((left.start, left.count, left.tags), (0, 6, vec![0, 1]));
        assert_eq!(
            (right.start, right.count, right.tags.clone()),
            (8, 13, vec![2, 3, 4])
        );
        let (a, b) = planner.split(&right).unwrap();
        assert_eq!((a.start, a.count, b.start, b.count), (8, 1, 12, 9));
        assert_eq!(planner.split(&a), None);
    }

    #[test]
    fn an_isolated_tag_is_read_alone_and_splits_the_run_around_it() {
        let mut planner = Planner::new(
            (0..6)
                .map(|i| span(i, Holding, u16::try_from(i).unwrap(), 1))
                .collect(),
            10,
        );
        assert!(planner.isolate(2));
        assert!(!planner.isolate(2), "already isolated");
        assert_eq!(
            shape(&planner),
            vec![
                (Holding, 0, 2, vec![0, 1]),
                (Holding, 2, 1, vec![2]),
                (Holding, 3, 3, vec![3, 4, 5]),
            ]
        );
        assert!(planner.is_isolated(2));
        assert!(planner.restore(2));
        assert_eq!(
            shape(&planner),
            vec![(Holding, 0, 6, vec![0, 1, 2, 3, 4, 5])]
        );
    }

    #[test]
    fn a_cut_keeps_the_tags_on_either_side_apart() {
        let mut planner = Planner::new(
            vec![
                span(0, Input, 0, 2),
                span(1, Input, 8, 2),
                span(2, Input, 10, 2),
            ],
            10,
        );
        assert!(planner.cut_before(1));
        assert_eq!(
            shape(&planner),
            vec![(Input, 0, 2, vec![0]), (Input, 8, 4, vec![1, 2])]
        );
    }

    #[test]
    fn configured_and_learned_limits_bound_every_request() {
        // 40 u16 tags, contiguous: one request under the protocol maximum.
        let spans = || {
            (0..40)
                .map(|i| span(i, Holding, u16::try_from(i).unwrap(), 1))
                .chain((40..60).map(|i| span(i, Coil, u16::try_from(i).unwrap(), 1)))
                .collect::<Vec<_>>()
        };
        let counts = |planner: &Planner| -> Vec<(RegisterKind, u16)> {
            planner
                .requests()
                .iter()
                .map(|r| (r.kind, r.count))
                .collect()
        };
        let mut planner = Planner::with_limits(spans(), 0, Limits::new(Some(16), Some(8)));
        assert_eq!(
            counts(&planner),
            vec![
                (Coil, 8),
                (Coil, 8),
                (Coil, 4),
                (Holding, 16),
                (Holding, 16),
                (Holding, 8)
            ]
        );
        // A learned limit above the configured one changes nothing.
        assert!(!planner.limit_to(Holding, 20));
        assert!(
            planner.limit_to(Input, 10),
            "input shares the register limit"
        );
        assert_eq!(
            planner.limits(),
            Limits {
                registers: 10,
                bits: 8
            }
        );
        assert_eq!(
            counts(&planner)[3..],
            [(Holding, 10), (Holding, 10), (Holding, 10), (Holding, 10)]
        );
        assert!(!planner.limit_to(Holding, 10), "not lower than before");
        assert_eq!(
            planner.learned(),
            Learned {
                max_registers: Some(10),
                ..Learned::default()
            }
        );
    }

    #[test]
    fn a_tag_wider_than_the_limit_is_still_read_alone() {
        let mut planner = Planner::new(
            vec![
                span(0, Holding, 0, 1),
                span(1, Holding, 1, 4),
                span(2, Holding, 5, 1),
            ],
            0,
        );
        assert!(planner.limit_to(Holding, 2));
        assert_eq!(
            shape(&planner),
            vec![
                (Holding, 0, 1, vec![0]),
                (Holding, 1, 4, vec![1]),
                (Holding, 5, 1, vec![2]),
            ]
        );
        assert!(planner.limit_to(Holding, 0));
        assert_eq!(planner.limits().registers, 1, "never below one register");
    }

    #[test]
    fn what_was_learned_comes_back_as_the_same_plan() {
        let spans = || {
            vec![
                span(0, Holding, 0, 1),
                span(1, Holding, 1, 1),
                span(2, Holding, 2, 1),
                span(3, Holding, 8, 2),
                span(4, Holding, 10, 1),
                span(5, Holding, 20, 1),
                span(6, Holding, 20, 1),
                span(7, Coil, 3, 1),
            ]
        };
        let mut first = Planner::new(spans(), 10);
        first.isolate(1);
        first.cut_before(3);
        first.isolate(5);
        first.isolate(6);
        first.limit_to(Coil, 1);
        let learned = first.learned();
        assert_eq!(
            learned,
            Learned {
                isolated: vec![(Holding, 1), (Holding, 20)],
                cuts: vec![(Holding, 8)],
                max_registers: None,
                max_bits: Some(1),
            }
        );
        let mut second = Planner::new(spans(), 10);
        assert!(second.restore_learned(&learned));
        assert_eq!(shape(&second), shape(&first));
        assert!(second.is_isolated(6), "both bits of register 20");
        assert!(
            !second.restore_learned(&learned),
            "nothing new the second time"
        );
        // Entries that name nothing in this map are ignored.
        let mut other = Planner::new(vec![span(0, Input, 0, 1)], 10);
        assert!(!other.restore_learned(&learned));
        assert!(Learned::default().is_empty());
    }
}
