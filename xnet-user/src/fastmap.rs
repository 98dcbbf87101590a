//! Hash maps for the tables with an entry per prefix (RIB, routes installed, the trie's
//! prefix index): foldhash, seeded per process, instead of SipHash, which cost a quarter
//! of a full-table ingest.

pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
