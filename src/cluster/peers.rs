//! The other nodes as event claimants: a node names itself in its claims
//! (`n<node_id>.<pid>.<random>`), so another node can tell from a claim
//! whether the process that holds it still runs (its node's lease is live
//! and was written by that pid) and wait for its outcome, rather than
//! take an event still in flight for a duplicate.

use futures_util::future::BoxFuture;

use super::Cluster;
use crate::dispatch::claims::Peers;
use crate::ids::NodeId;

impl Peers for Cluster {
    fn owner(&self) -> String {
        format!(
            "n{}.{}.{:016x}",
            self.inner.node,
            std::process::id(),
            rand::random::<u64>()
        )
    }

    fn is_live<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some((node, pid)) = parse_owner(owner) else {
                // Written by a process outside cluster mode.
                return false;
            };
            // Unreadable counts as gone: the claim is then taken for
            // abandoned, a duplicate, never broadcast twice.
            self.inner
                .lease_holds(node, |lease| lease.pid == pid)
                .await
                .unwrap_or(false)
        })
    }
}

/// The node id and pid in an owner name written by [`Peers::owner`].
fn parse_owner(owner: &str) -> Option<(NodeId, u32)> {
    let mut parts = owner.strip_prefix('n')?.split('.');
    let node = NodeId::new(parts.next()?.parse().ok()?)?;
    let pid = parts.next()?.parse().ok()?;
    Some((node, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_name_gives_back_its_node_and_pid_and_others_give_none() {
        let node = NodeId::new(7).unwrap();
        assert_eq!(parse_owner("n7.4242.00000000deadbeef"), Some((node, 4242)));
        assert_eq!(parse_owner("4242-00000000deadbeef"), None);
        assert_eq!(parse_owner("n7"), None);
    }
}
