//! `max_connections_per_address`: the most connections one client address (an IPv6 one by
//! its /64 network, which one host is given whole) holds open at once, so that one client
//! cannot take all of `max_connections`. The balancers named in
//! `client_address_trusted_peers` are not counted: every client behind them shares their
//! address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use tower_fhir::proxy::SourceNetwork;

use crate::config::Network;

/// The open connections of each address, and the most each may hold.
#[derive(Debug)]
pub(crate) struct PerAddress {
    limit: u32,
    exempt: Vec<Network>,
    open: Mutex<HashMap<SourceNetwork, u32>>,
}

impl PerAddress {
    /// At most `limit` connections an address, `exempt` not counted.
    pub(crate) fn new(limit: u32, exempt: Vec<Network>) -> Self {
        Self {
            limit,
            exempt,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A connection from `peer` counted until the slot is dropped, or `None` when its address
    /// already holds the limit (the connection is to be closed unserved).
    pub(crate) fn admit(&'static self, peer: IpAddr) -> Option<Slot> {
        let peer = peer.to_canonical();
        if self.exempt.iter().any(|network| network.contains(peer)) {
            return Some(Slot(None));
        }
        let source = SourceNetwork::of(Some(peer));
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(source).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot(Some((self, source))))
    }

    /// How many addresses hold a connection now (for the tests).
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One admitted connection's place in its address's count (none for an exempt peer).
#[derive(Debug)]
pub(crate) struct Slot(Option<(&'static PerAddress, SourceNetwork)>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((counts, source)) = self.0.take() {
            let mut open = counts.open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = open.get_mut(&source) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&source);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_the_limit_and_its_slots_come_back() {
        let limits: &'static PerAddress = Box::leak(Box::new(PerAddress::new(
            2,
            vec![Network::parse("10.0.0.0/8").unwrap()],
        )));
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let (a, b) = (limits.admit(one).unwrap(), limits.admit(one).unwrap());
        assert!(limits.admit(one).is_none());
        // Another address is not held back; nor is a balancer, however many it holds.
        assert!(limits.admit("192.0.2.2".parse().unwrap()).is_some());
        let balancer: Vec<Slot> = (0..10)
            .map(|_| limits.admit("10.1.2.3".parse().unwrap()).unwrap())
            .collect();
        drop(a);
        let c = limits.admit(one).unwrap();
        assert!(limits.admit(one).is_none());
        drop((b, c, balancer));
        assert_eq!(limits.addresses(), 0, "counts left behind");
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_network() {
        let limits: &'static PerAddress = Box::leak(Box::new(PerAddress::new(1, Vec::new())));
        let _held = limits.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(limits
            .admit("2001:db8:1:2::ffff".parse().unwrap())
            .is_none());
        assert!(limits.admit("2001:db8:1:3::1".parse().unwrap()).is_some());
        // An IPv4 address written as IPv6 is that IPv4 address.
        let _v4 = limits.admit("192.0.2.9".parse().unwrap()).unwrap();
        assert!(limits.admit("::ffff:192.0.2.9".parse().unwrap()).is_none());
    }
}
