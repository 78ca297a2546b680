//! Open connections per client address, so that one client holding connections open without sending
//! anything cannot use up the server's connection limit (slowloris from a single address). Checked at
//! accept, before hyper reads a byte: a connection over the limit is closed unread. Behind a reverse
//! proxy every connection comes from the proxy's address: HERALD_HTTP_CONNECTIONS_PER_ADDRESS raises
//! the limit, or lifts it (0; the server's own limit still holds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct PerAddress {
    /// 0: no limit per address.
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address until dropped.
pub struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// At most `limit` connections per address (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Mutex::default(),
        }
    }

    /// A slot for one more connection from `ip`, or None when it holds the limit already.
    /// An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = ip.to_canonical();
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if self.limit > 0 && *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: Arc::clone(self),
            ip,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // counts stay consistent even if a holder panicked (each update is one step)
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::CONNECTIONS_PER_ADDRESS as MAX_PER_ADDRESS;

    #[test]
    fn connections_are_counted_per_address() {
        let table = Arc::new(PerAddress::new(MAX_PER_ADDRESS));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut held: Vec<AddressSlot> = (0..MAX_PER_ADDRESS - 1)
            .map(|_| table.take(a).expect("under the limit"))
            .collect();
        held.push(table.take(mapped).expect("the same address, IPv4-mapped"));
        assert!(table.take(a).is_none() && table.take(mapped).is_none());
        assert!(table.take(b).is_some(), "another address is not held up");
        held.pop();
        assert!(
            table.take(a).is_some(),
            "a closed connection frees its place"
        );
        held.clear();
        assert!(table.lock().is_empty(), "nothing left behind");
    }

    #[test]
    fn zero_lifts_the_limit() {
        let table = Arc::new(PerAddress::new(0));
        let proxy: IpAddr = "10.0.0.7".parse().unwrap();
        let held: Vec<AddressSlot> = (0..1000)
            .map(|_| table.take(proxy).expect("no limit"))
            .collect();
        assert_eq!(table.lock()[&proxy], 1000);
        drop(held);
        assert!(table.lock().is_empty(), "still counted, and freed");
    }
}
