//! The Sparkplug B topic namespace:
//! `spBv1.0/<group id>/<message type>/<edge node id>[/<device id>]`, and the subscription filters
//! that can follow an edge node's births, data and deaths.

/// The first level of every Sparkplug B topic.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types that carry an edge node's or a device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NData => "NDATA",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DData => "DDATA",
            Self::DDeath => "DDEATH",
        }
    }

    fn is_device(self) -> bool {
        matches!(self, Self::DBirth | Self::DData | Self::DDeath)
    }
}

/// What a topic of the namespace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// A message of an edge node, or of one of its devices (`device` is set exactly for the
    /// `D…` kinds).
    Edge {
        group: &'a str,
        kind: Kind,
        node: &'a str,
        device: Option<&'a str>,
    },
    /// A host application's `STATE`, or a command (`NCMD`, `DCMD`) to a node or device: no
    /// measurements, and not the agent's business.
    NotMeasurements(&'static str),
}

/// The parts of `topic`, or `None` when it is not a well-formed Sparkplug B topic.
pub(crate) fn parse(topic: &str) -> Option<Parsed<'_>> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.first() != Some(&NAMESPACE) || levels.iter().any(|l| l.is_empty()) {
        return None;
    }
    if levels.get(1) == Some(&"STATE") {
        return Some(Parsed::NotMeasurements("STATE"));
    }
    let (group, kind, node) = (*levels.get(1)?, *levels.get(2)?, *levels.get(3)?);
    let kind = match kind {
        "NBIRTH" => Kind::NBirth,
        "NDATA" => Kind::NData,
        "NDEATH" => Kind::NDeath,
        "DBIRTH" => Kind::DBirth,
        "DDATA" => Kind::DData,
        "DDEATH" => Kind::DDeath,
        "NCMD" if levels.len() == 4 => return Some(Parsed::NotMeasurements("NCMD")),
        "DCMD" if levels.len() == 5 => return Some(Parsed::NotMeasurements("DCMD")),
        _ => return None,
    };
    let device = match (kind.is_device(), levels.len()) {
        (false, 4) => None,
        (true, 5) => Some(levels[4]),
        _ => return None,
    };
    Some(Parsed::Edge {
        group,
        kind,
        node,
        device,
    })
}

/// Checks that a `sparkplug_b` subscription's filter follows whole edge nodes: one group (or
/// `+` for all) with every message type, and optionally one edge node. A filter for one message
/// type would miss the births that data messages need. Returns the problem in words.
pub fn check_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let named = |level: &str| level == "+" || !(level.is_empty() || level.contains('#'));
    let ok = levels.first() == Some(&NAMESPACE)
        && match levels.as_slice() {
            [_, group, "#"] => named(group) && *group != "STATE",
            [_, group, "+", node, "#"] => named(group) && *group != "STATE" && named(node),
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{filter}` does not follow whole Sparkplug B edge nodes; a payload = \"sparkplug_b\" subscription needs every message type of a group or of one edge node, so births come with the data: topic = \"{NAMESPACE}/<group id>/#\" or \"{NAMESPACE}/<group id>/+/<edge node id>/#\" (`+` for any group or node)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_node_and_device_topics_parse() {
        assert_eq!(
            parse("spBv1.0/line3/NDATA/press-7"),
            Some(Parsed::Edge {
                group: "line3",
                kind: Kind::NData,
                node: "press-7",
                device: None
            })
        );
        assert_eq!(
            parse("spBv1.0/line3/DBIRTH/press-7/motor 1"),
            Some(Parsed::Edge {
                group: "line3",
                kind: Kind::DBirth,
                node: "press-7",
                device: Some("motor 1")
            })
        );
        assert_eq!(
            parse("spBv1.0/STATE/scada-1"),
            Some(Parsed::NotMeasurements("STATE"))
        );
        assert_eq!(
            parse("spBv1.0/line3/NCMD/press-7"),
            Some(Parsed::NotMeasurements("NCMD"))
        );
        assert_eq!(
            parse("spBv1.0/line3/DCMD/press-7/motor"),
            Some(Parsed::NotMeasurements("DCMD"))
        );
        for bad in [
            "spBv1.0/line3/NDATA",
            "spBv1.0/line3/NDATA/press-7/motor",
            "spBv1.0/line3/DDATA/press-7",
            "spBv1.0/line3/NDATA/",
            "spBv1.0/line3/NSTUFF/press-7",
            "spAv1.0/line3/NDATA/press-7",
            "plant/line3/NDATA/press-7",
            "spBv1.0//NDATA/press-7",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn filters_must_follow_whole_edge_nodes() {
        for good in [
            "spBv1.0/line3/#",
            "spBv1.0/+/#",
            "spBv1.0/line3/+/press-7/#",
            "spBv1.0/+/+/+/#",
        ] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for bad in [
            "spBv1.0/#",
            "spBv1.0/line3/NDATA/#",
            "spBv1.0/line3/+/press-7",
            "spBv1.0/STATE/#",
            "plant/line3/#",
            "spBv1.0/line3/+/press-7/+",
        ] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_filter("spBv1.0/line3/NDATA/#").unwrap_err(),
            "`spBv1.0/line3/NDATA/#` does not follow whole Sparkplug B edge nodes; a payload = \"sparkplug_b\" subscription needs every message type of a group or of one edge node, so births come with the data: topic = \"spBv1.0/<group id>/#\" or \"spBv1.0/<group id>/+/<edge node id>/#\" (`+` for any group or node)"
        );
    }
}
