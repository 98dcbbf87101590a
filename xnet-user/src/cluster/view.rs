//! The cluster as one node sees it, and the firewall pool that follows: sans-IO, so every
//! rule is tested without etcd.

use std::collections::BTreeMap;

use super::NodeRecord;

#[derive(Debug, Clone, Default)]
pub struct View {
    /// This node's name.
    pub me: String,
    /// Whether etcd answers (a node that lost it steers by its own probes alone).
    pub connected: bool,
    /// Live nodes (keys under a lease that holds), by name, as they last published.
    pub members: BTreeMap<String, NodeRecord>,
}

impl View {
    /// Which of `service`'s `instances` (names) are in the pool, given this node's own
    /// probes `local` (None: not probed yet): an instance is in when a majority of the live
    /// nodes that have probed it see it healthy; this node's opinion is its current one,
    /// the others' as published. Without etcd: this node's own view.
    pub fn pool(&self, service: &str, instances: &[&str], local: &[Option<bool>]) -> Vec<bool> {
        if !self.connected {
            return local.iter().map(|h| *h == Some(true)).collect();
        }
        instances
            .iter()
            .zip(local)
            .map(|(name, mine)| {
                let others = self
                    .members
                    .iter()
                    .filter(|(node, _)| **node != self.me)
                    .filter_map(|(_, r)| r.health.get(service)?.get(*name).copied());
                let (mut yes, mut votes) = (0, 0);
                for up in mine.iter().copied().chain(others) {
                    votes += 1;
                    yes += up as usize;
                }
                yes * 2 > votes
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, fw1: Option<bool>, fw2: Option<bool>) -> (String, NodeRecord) {
        let mut health = BTreeMap::new();
        let mut fw = BTreeMap::new();
        if let Some(up) = fw1 {
            fw.insert("fw1".to_string(), up);
        }
        if let Some(up) = fw2 {
            fw.insert("fw2".to_string(), up);
        }
        health.insert("fw".to_string(), fw);
        (
            node.to_string(),
            NodeRecord {
                node: node.into(),
                health,
                ..Default::default()
            },
        )
    }

    fn view(members: Vec<(String, NodeRecord)>) -> View {
        View {
            me: "a".into(),
            connected: true,
            members: members.into_iter().collect(),
        }
    }

    const FW: [&str; 2] = ["fw1", "fw2"];

    #[test]
    fn an_instance_is_in_the_pool_when_a_majority_of_live_nodes_see_it_healthy() {
        // Three nodes: b and c see fw1 down, we see it up: out; fw2 up for two of three: in.
        let v = view(vec![
            record("a", Some(false), Some(false)), // our stale record: ignored
            record("b", Some(false), Some(true)),
            record("c", Some(false), Some(false)),
        ]);
        assert_eq!(
            v.pool("fw", &FW, &[Some(true), Some(true)]),
            vec![false, true]
        );
        // Two nodes that disagree: no majority, out (both directions then agree on it).
        let v = view(vec![record("b", Some(false), Some(true))]);
        assert_eq!(
            v.pool("fw", &FW, &[Some(true), Some(true)]),
            vec![false, true]
        );
    }

    #[test]
    fn nodes_that_have_not_probed_an_instance_do_not_vote() {
        let v = view(vec![record("b", None, None)]);
        assert_eq!(
            v.pool("fw", &FW, &[Some(true), Some(false)]),
            vec![true, false]
        );
        // Nobody has probed: nothing in the pool.
        assert_eq!(v.pool("fw", &FW, &[None, None]), vec![false, false]);
        // A node that left (its key expired) no longer votes.
        let v = view(vec![]);
        assert_eq!(
            v.pool("fw", &FW, &[Some(true), Some(true)]),
            vec![true, true]
        );
    }

    #[test]
    fn without_etcd_a_node_steers_by_its_own_probes() {
        let mut v = view(vec![record("b", Some(false), Some(false))]);
        v.connected = false;
        assert_eq!(v.pool("fw", &FW, &[Some(true), None]), vec![true, false]);
    }
}
