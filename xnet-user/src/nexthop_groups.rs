//! The next-hop groups as packets see them (`NH_GROUPS`), shared between the data plane,
//! which creates and releases groups as routes come and go, and whoever learns first that
//! a next hop died — the BFD thread — so that packets stop going there at once: one map
//! write per group that holds it, however many prefixes use the group (prefix-independent
//! convergence). The routes move later, at the routing core's pace.
//!
//! A dead member's slots take live members in turn; the count stays, so flows hashed to
//! live members keep their next hop. A group with no live member keeps them all: nothing
//! better exists until the routes move.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use smallvec::SmallVec;
use xnet_common::{NhGroup, MAX_ECMP};

/// A group's member: its next-hop id and that next hop's address.
pub type Member = (u32, IpAddr);

pub struct Groups {
    map: Array<MapData, NhGroup>,
    members: crate::fastmap::Map<u32, SmallVec<[Member; 4]>>,
    dead: crate::fastmap::Set<IpAddr>,
}

/// The table behind a lock: the data plane writes groups rarely (a full table shares a
/// handful), the BFD thread on a failure.
#[derive(Clone)]
pub struct SharedGroups(Arc<Mutex<Groups>>);

impl SharedGroups {
    /// A second handle on the data plane's `NH_GROUPS` map (`map` is its handle).
    pub fn new(map: &MapData) -> Result<SharedGroups> {
        use std::os::fd::AsFd;
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the next-hop group map's descriptor")?;
        let data = MapData::from_fd(fd).context("next-hop group map")?;
        let map: Array<MapData, NhGroup> = Map::Array(data).try_into()?;
        Ok(SharedGroups(Arc::new(Mutex::new(Groups {
            map,
            members: Default::default(),
            dead: Default::default(),
        }))))
    }

    pub fn lock(&self) -> MutexGuard<'_, Groups> {
        // A panic while holding it leaves plain data: still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Groups {
    /// Writes group `id` with `members` (at most `MAX_ECMP`).
    pub fn write(&mut self, id: u32, members: &[Member]) -> Result<()> {
        let value = self.value(members);
        self.map.set(id, &value, 0)?;
        self.members.insert(id, members.iter().copied().collect());
        Ok(())
    }

    /// Group `id` is no longer used (its slot is left as it was).
    pub fn forget(&mut self, id: u32) {
        self.members.remove(&id);
    }

    /// `via` died (`alive` false) or is back: every group holding it is rewritten.
    /// Returns how many.
    pub fn set_alive(&mut self, via: IpAddr, alive: bool) -> Result<usize> {
        let changed = if alive {
            self.dead.remove(&via)
        } else {
            self.dead.insert(via)
        };
        if !changed {
            return Ok(0);
        }
        let rewrite: Vec<(u32, NhGroup)> = self
            .members
            .iter()
            .filter(|(_, m)| m.iter().any(|(_, v)| *v == via))
            .map(|(g, m)| (*g, self.value(m)))
            .collect();
        for (g, value) in &rewrite {
            self.map.set(*g, value, 0)?;
        }
        Ok(rewrite.len())
    }

    fn value(&self, members: &[Member]) -> NhGroup {
        let mut value = NhGroup {
            count: members.len() as u32,
            ..Default::default()
        };
        for (slot, (id, _)) in value.members.iter_mut().zip(members) {
            *slot = *id;
        }
        if self.dead.is_empty() {
            return value;
        }
        let live: SmallVec<[u32; MAX_ECMP]> = members
            .iter()
            .filter(|(_, v)| !self.dead.contains(v))
            .map(|(id, _)| *id)
            .collect();
        if live.is_empty() {
            return value;
        }
        let mut next = live.iter().cycle();
        for (slot, (_, v)) in value.members.iter_mut().zip(members) {
            if self.dead.contains(v) {
                *slot = *next.next().expect("not empty");
            }
        }
        value
    }
}
