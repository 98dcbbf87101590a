//! The one layer that programs the XDP data plane. Config, BGP, IKE and policy all call this
//! small API (segments, interfaces, next hops through routes, neighbours, local addresses)
//! and never touch a BPF map themselves.
//!
//! Update order keeps packets in flight safe: a next hop and its group are written before
//! the route that points to them; a route entry is one 32-bit store (see `lpm`); freed
//! next-hop and group ids are reused last (FIFO), long after any packet could hold them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, DevMap, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use serde::Serialize;
use smallvec::SmallVec;

use crate::nexthop_groups::{Member, SharedGroups};
use xnet_common::route::GROUP_SIZE;
use xnet_common::{
    names, IfConfig, IfStats, NextHop, Outcome, Reason, MAX_ECMP, NH_F_KERNEL, NH_F_VALID,
};

use crate::lpm::{LpmUsage, NodeMemory, RouteTables, TableId};
use crate::policy::Compiled;
use xnet_common::policy::{
    Counter, RuleKey, RuleValue, Service, Tuple, MAX_INSTANCES, MAX_SERVICES, MAX_TUPLES,
    META_CLASS_ROOTS, META_EPOCH, META_TUPLES_GEN0, PORTS,
};

/// The XDP object, embedded at build time by `cargo xtask build` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xnet.bpf.o"));

pub use crate::routing::{NhKey, TUNNEL};

struct NhState {
    id: u32,
    refs: u32,
}

struct GroupState {
    id: u32,
    refs: u32,
}

#[derive(Clone, Copy)]
struct Segment {
    v4: TableId,
    v6: TableId,
    v4_root: u32,
    v6_root: u32,
    /// Flow sampling: 1 in `sample` packets (0: off).
    sample: u32,
}

struct Port {
    segment: u32,
    mac: [u8; 6],
    /// Its counters' index in `IF_STATS`.
    slot: u32,
}

/// FIFO id allocator: a freed id is the last to be handed out again.
struct Ids {
    next: u32,
    max: u32,
    free: VecDeque<u32>,
}

impl Ids {
    fn new(max: u32) -> Self {
        // Id 0 stays unused so that a zeroed entry never looks valid.
        Self {
            next: 1,
            max,
            free: VecDeque::new(),
        }
    }
    fn alloc(&mut self, what: &str) -> Result<u32> {
        if self.next < self.max {
            self.next += 1;
            return Ok(self.next - 1);
        }
        self.free
            .pop_front()
            .ok_or_else(|| anyhow!("no free {what} id (limit {})", self.max))
    }
    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// The route-table array, mapped into this process.
struct NodeMap {
    ptr: *mut AtomicU32,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through atomics.
unsafe impl Send for NodeMap {}

impl NodeMap {
    fn new(map: &MapData, entries: u32) -> Result<Self> {
        let bytes = (entries as usize * 4).next_multiple_of(4096);
        // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE, shared with the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of {}: {}",
                names::MAP_ROUTE_NODES,
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            ptr: ptr.cast(),
            len: entries as usize,
            bytes,
        })
    }
}

impl NodeMemory for NodeMap {
    fn entries(&self) -> &[AtomicU32] {
        // SAFETY: ptr is a live mapping of len u32 entries for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for NodeMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// Data-plane counters, summed over CPUs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub interfaces: Vec<(u32, IfStats)>,
    /// Packets by reason, all interfaces together (and bytes, in `reason_bytes`).
    pub reasons: Vec<(&'static str, u64)>,
    pub reason_bytes: Vec<(&'static str, u64)>,
    /// Per interface, the reasons its packets met (those with any).
    #[serde(skip)]
    pub per_reason: Vec<(u32, Vec<(Reason, Counter)>)>,
}

impl Counters {
    pub fn reason(&self, r: Reason) -> u64 {
        self.reasons
            .iter()
            .find(|(n, _)| *n == r.name())
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
    pub fn interface(&self, ifindex: u32) -> IfStats {
        self.interfaces
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    tables: RouteTables<NodeMap>,
    segments: crate::fastmap::Map<u32, Segment>,
    ports: crate::fastmap::Map<u32, Port>,
    nexthops: crate::fastmap::Map<NhKey, NhState>,
    nh_ids: Ids,
    /// Next hops by id, for releasing a group's members.
    nh_by_id: crate::fastmap::Map<u32, NhKey>,
    groups: crate::fastmap::Map<Vec<u32>, GroupState>,
    /// Each group's (sorted) members by group id. A route's group is the leaf the trie
    /// holds for its prefix: the trie's prefix index is the one record of the routes.
    group_members: crate::fastmap::Map<u32, Vec<u32>>,
    group_ids: Ids,
    /// `NH_GROUPS` as packets see them, shared with the BFD thread.
    shared_groups: SharedGroups,
    neighbours: HashMap<(u32, IpAddr), [u8; 6]>,
    locals: Vec<IpAddr>,
    attached: Vec<(u32, aya::programs::xdp::XdpLinkId)>,
    /// Interfaces with `xnet_tunnel_in` at TC ingress.
    tunnel_in: Vec<(String, SchedClassifierLinkId)>,
    /// The entries each policy generation holds.
    written: [Vec<RuleKey>; 2],
    /// Firewall services: their instances' next-hop ids.
    services: HashMap<u32, Vec<(NhKey, u32)>>,
    /// Policy epoch (`META_EPOCH`; its low bit is the generation packets use now).
    epoch: u32,
    classes: Classes,
}

/// The policy's address classes: four tables (IPv4 source, IPv4 destination, IPv6 source,
/// IPv6 destination) in the route-table memory, made when the first rules arrive; each
/// rule prefix has a stable id there.
struct Classes {
    tables: Option<[TableId; 4]>,
    ids: HashMap<(usize, IpNet), u32>,
    /// Class ids are route-table leaves: 0 is "no class", and they stay below NODE_PTR.
    alloc: Ids,
    /// Prefixes of the rule set in force, and those only the previous one had (removed at
    /// the next switch, when no packet can still be classifying with them).
    live: HashSet<(usize, IpNet)>,
    stale: HashSet<(usize, IpNet)>,
    /// Port classes written per generation.
    ports: [Vec<u32>; 2],
}

impl Default for Classes {
    fn default() -> Self {
        Self {
            tables: None,
            ids: HashMap::new(),
            alloc: Ids::new(xnet_common::route::NODE_PTR),
            live: HashSet::new(),
            stale: HashSet::new(),
            ports: Default::default(),
        }
    }
}

fn class_table(dir: usize, net: &IpNet) -> usize {
    dir + if matches!(net, IpNet::V6(_)) { 2 } else { 0 }
}

impl Dataplane {
    /// Loads the XDP object with `groups` route-table groups (256 entries each).
    pub fn load(groups: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this xnet binary was built without its XDP object; build it with `cargo xtask build`");
        }
        let entries = groups
            .checked_mul(GROUP_SIZE)
            .context("route_table_groups too large")?;
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(if std::env::var_os("XNET_VERIFIER_LOG").is_some() {
                aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS
            } else {
                aya::VerifierLogLevel::default()
            })
            .map_max_entries(names::MAP_ROUTE_NODES, groups)
            .load(OBJECT)
            .context("loading the XDP object (are you root, with BPF enabled?)")?;
        // Kept alive for the program's lifetime: dropping it closes the log map.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logging not available: {e}");
                None
            }
        };
        let nodes = match ebpf.map(names::MAP_ROUTE_NODES) {
            Some(aya::maps::Map::Array(data)) => NodeMap::new(data, entries)?,
            _ => bail!("map {} missing from the XDP object", names::MAP_ROUTE_NODES),
        };
        let shared_groups = match ebpf.map(names::MAP_NH_GROUPS) {
            Some(aya::maps::Map::Array(data)) => SharedGroups::new(data)?,
            _ => bail!("map {} missing from the XDP object", names::MAP_NH_GROUPS),
        };
        let p: &mut Xdp = ebpf
            .program_mut(names::PROG_FORWARD)
            .context(names::PROG_FORWARD)?
            .try_into()?;
        p.load()
            .with_context(|| format!("verifier rejected {}", names::PROG_FORWARD))?;
        let p: &mut SchedClassifier = ebpf
            .program_mut(names::PROG_TUNNEL_IN)
            .context(names::PROG_TUNNEL_IN)?
            .try_into()?;
        p.load()
            .with_context(|| format!("verifier rejected {}", names::PROG_TUNNEL_IN))?;
        Ok(Self {
            ebpf,
            _logger: logger,
            tables: RouteTables::new(nodes),
            segments: Default::default(),
            ports: Default::default(),
            nexthops: Default::default(),
            nh_ids: Ids::new(xnet_common::limits::NEXTHOPS),
            nh_by_id: Default::default(),
            groups: Default::default(),
            group_members: Default::default(),
            group_ids: Ids::new(xnet_common::limits::NH_GROUPS),
            shared_groups,
            neighbours: HashMap::new(),
            locals: Vec::new(),
            attached: Vec::new(),
            tunnel_in: Vec::new(),
            written: [Vec::new(), Vec::new()],
            services: HashMap::new(),
            epoch: 0,
            classes: Classes::default(),
        })
    }

    /// Drains eBPF log records into the agent's log.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self._logger {
            l.flush();
        }
    }

    /// Attaches the forwarding program to `ifindex`. `generic` selects skb mode.
    pub fn attach(&mut self, ifindex: u32, generic: bool) -> Result<()> {
        let mode = if generic {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        };
        let p: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_FORWARD)
            .unwrap()
            .try_into()?;
        let link = p
            .attach(ifindex, mode)
            .with_context(|| format!("attaching XDP ({mode:?} mode) to ifindex {ifindex}"))?;
        self.attached.push((ifindex, link));
        Ok(())
    }

    /// Detaches the forwarding program from every interface.
    pub fn detach_all(&mut self) {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_FORWARD)
            .unwrap()
            .try_into()
            .unwrap();
        for (ifindex, link) in self.attached.drain(..) {
            if let Err(e) = p.detach(link) {
                log::warn!("detaching XDP from ifindex {ifindex}: {e}");
            }
        }
    }

    /// Detaches the forwarding program from `ifindex` (if attached).
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let Some(pos) = self.attached.iter().position(|(i, _)| *i == ifindex) else {
            return Ok(());
        };
        let (_, link) = self.attached.remove(pos);
        let p: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_FORWARD)
            .unwrap()
            .try_into()?;
        p.detach(link)
            .with_context(|| format!("detaching XDP from ifindex {ifindex}"))?;
        Ok(())
    }

    /// Takes `ifindex` out of the data plane: its packets are no longer ours (XDP, if still
    /// attached, passes them), it is no egress port; next hops through it go invalid.
    pub fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        let Some(port) = self.ports.remove(&ifindex) else {
            return Ok(());
        };
        let mut ifs: Array<_, IfConfig> = self.map_mut(names::MAP_INTERFACES)?;
        ifs.set(ifindex, &IfConfig::default(), 0)?;
        let mut ports: DevMap<_> = self.map_mut(names::MAP_TX_PORTS)?;
        let _ = ports.set(port.slot, 0, None, 0);
        self.rewrite_nexthops_via(ifindex)
    }

    /// Next hops through `ifindex` again, after its port came or went.
    fn rewrite_nexthops_via(&mut self, ifindex: u32) -> Result<()> {
        let keys: Vec<NhKey> = self
            .nexthops
            .keys()
            .filter(|k| k.ifindex == ifindex)
            .copied()
            .collect();
        for k in keys {
            self.write_nexthop(k)?;
        }
        Ok(())
    }

    fn zero_counts(&mut self, slot: u32) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("{e}"))?;
        let mut counts: PerCpuArray<_, Counter> = self.map_mut(names::MAP_COUNTS)?;
        for r in Reason::ALL {
            let zero =
                aya::maps::PerCpuValues::try_from(vec![Counter::default(); ncpus.get() as usize])?;
            counts.set(slot * Reason::COUNT + r as u32, zero, 0)?;
        }
        Ok(())
    }

    /// Attaches the decrypted-traffic program at TC ingress of `name` (an xfrm interface,
    /// or one where policy-based tunnels' ESP arrives). A filter of that name left by an
    /// agent that died goes first.
    pub fn attach_tunnel_in(&mut self, name: &str) -> Result<()> {
        // Ours already (a reload applies the tunnels' policy again).
        if self.tunnel_in.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let c = std::ffi::CString::new(name)?;
        // Already there (another program's, or ours): fine.
        let _ = tc::qdisc_add_clsact(&c);
        let _ = tc::qdisc_detach_program(&c, TcAttachType::Ingress.into(), names::PROG_TUNNEL_IN);
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROG_TUNNEL_IN)
            .unwrap()
            .try_into()?;
        let link = p.attach(&c, TcAttachType::Ingress).with_context(|| {
            format!("attaching {} to {name} (TC ingress)", names::PROG_TUNNEL_IN)
        })?;
        self.tunnel_in.push((name.to_string(), link));
        Ok(())
    }

    /// Detaches the decrypted-traffic program everywhere.
    pub fn detach_tunnel_in(&mut self) {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROG_TUNNEL_IN)
            .unwrap()
            .try_into()
            .unwrap();
        for (name, link) in self.tunnel_in.drain(..) {
            if let Err(e) = p.detach(link) {
                log::warn!("detaching {} from {name}: {e}", names::PROG_TUNNEL_IN);
            }
        }
    }

    /// Detaches the decrypted-traffic program from `name` (an interface a reload removed).
    pub fn detach_tunnel_in_from(&mut self, name: &str) {
        let Some(i) = self.tunnel_in.iter().position(|(n, _)| n == name) else {
            return;
        };
        let (_, link) = self.tunnel_in.remove(i);
        if let Ok(p) = TryInto::<&mut SchedClassifier>::try_into(
            self.ebpf.program_mut(names::PROG_TUNNEL_IN).unwrap(),
        ) {
            if let Err(e) = p.detach(link) {
                log::debug!("detaching {} from {name}: {e}", names::PROG_TUNNEL_IN);
            }
        }
    }

    /// Puts IPsec connector `connector`'s decrypted packets into `segment` (`flags` as
    /// for interfaces).
    pub fn set_tunnel(&mut self, connector: u32, segment: u32, flags: u32) -> Result<()> {
        let seg = self
            .segments
            .get(&segment)
            .with_context(|| format!("unknown segment id {segment}"))?;
        let cfg = IfConfig {
            segment,
            v4_root: seg.v4_root,
            v6_root: seg.v6_root,
            flags,
            slot: 0,
            sample: 0,
        };
        let mut map: Array<_, IfConfig> = self.map_mut(names::MAP_TUNNELS)?;
        map.set(connector, &cfg, 0)
            .with_context(|| format!("TUNNELS[{connector}]"))?;
        Ok(())
    }

    /// Connector `connector` is gone: its decrypted packets are no longer ours.
    pub fn clear_tunnel(&mut self, connector: u32) -> Result<()> {
        let mut map: Array<_, IfConfig> = self.map_mut(names::MAP_TUNNELS)?;
        map.set(connector, &IfConfig::default(), 0)
            .with_context(|| format!("TUNNELS[{connector}]"))?;
        Ok(())
    }

    /// Samples one packet in `rate` (0: none) on the segment's interfaces for flow export.
    pub fn set_flow_sampling(&mut self, segment: u32, rate: u32) -> Result<()> {
        let seg = self
            .segments
            .get_mut(&segment)
            .with_context(|| format!("unknown segment id {segment}"))?;
        seg.sample = rate;
        let ports: Vec<u32> = self
            .ports
            .iter()
            .filter(|(_, p)| p.segment == segment)
            .map(|(&i, _)| i)
            .collect();
        let mut ifs: Array<_, IfConfig> = self.map_mut(names::MAP_INTERFACES)?;
        for ifindex in ports {
            {
                let mut cfg = ifs.get(&ifindex, 0)?;
                cfg.sample = rate;
                ifs.set(ifindex, &cfg, 0)?;
            }
        }
        Ok(())
    }

    /// The ring buffer of flow samples (once: its reader owns it).
    pub fn flow_samples(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let m = self
            .ebpf
            .take_map(names::MAP_FLOW_SAMPLES)
            .context("the flow samples ring buffer is taken or missing")?;
        Ok(aya::maps::RingBuf::try_from(m)?)
    }

    pub fn attached(&self) -> Vec<u32> {
        self.attached.iter().map(|(i, _)| *i).collect()
    }

    /// Graceful restart, old agent: pins every attachment under `dir` (one file per
    /// ifindex) and lets go of it. The kernel keeps the program and its maps alive through
    /// the pins, so packets keep being forwarded after this process exits.
    pub fn pin_all(&mut self, dir: &Path) -> Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_FORWARD)
            .unwrap()
            .try_into()?;
        let mut pinned = Vec::new();
        let mut result = Ok(());
        for (ifindex, id) in std::mem::take(&mut self.attached) {
            let path = dir.join(ifindex.to_string());
            let r = p
                .take_link(id)
                .map_err(anyhow::Error::from)
                .and_then(|l| {
                    FdLink::try_from(l)
                        .map_err(|e| anyhow!("{e} (attached through netlink, not a BPF link)"))
                })
                .and_then(|l| l.pin(&path).map_err(anyhow::Error::from))
                .with_context(|| {
                    format!(
                        "pinning the XDP link of ifindex {ifindex} at {}",
                        path.display()
                    )
                });
            match r {
                Ok(l) => pinned.push(l),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_err() {
            // All or nothing: unpinned links detach when dropped.
            for l in pinned {
                let _ = l.unpin();
            }
        }
        result
    }

    /// Graceful restart, new agent: the attachments a previous agent pinned under `dir`:
    /// ifindex and pin path.
    pub fn pinned(dir: &Path) -> Vec<(u32, std::path::PathBuf)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
            .collect()
    }

    /// Atomically puts our program behind a link a previous agent pinned at `path` (no
    /// packet sees an interface without XDP), then removes the pin: the link is ours now.
    /// On failure the pin stays, and with it the old program.
    pub fn take_over(&mut self, ifindex: u32, path: &Path) -> Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_FORWARD)
            .unwrap()
            .try_into()?;
        let fd = FdLink::from(PinnedLink::from_pin(path)?);
        let link = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        let id = p
            .attach_to_link(link)
            .with_context(|| format!("replacing the XDP program on ifindex {ifindex}"))?;
        self.attached.push((ifindex, id));
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        Ok(())
    }

    /// Gives a segment its two route tables. Idempotent.
    pub fn add_segment(&mut self, id: u32) -> Result<()> {
        if self.segments.contains_key(&id) {
            return Ok(());
        }
        let (v4, v4_root) = self.tables.add_table(32)?;
        let (v6, v6_root) = self.tables.add_table(128)?;
        self.segments.insert(
            id,
            Segment {
                v4,
                v6,
                v4_root,
                v6_root,
                sample: 0,
            },
        );
        Ok(())
    }

    /// Puts `ifindex` (with its MAC) into `segment`: its packets are routed in that
    /// segment's tables, and it becomes an egress port.
    /// `flags`: `IF_F_FIREWALL`, `IF_F_DEFAULT_DENY`.
    pub fn set_interface(
        &mut self,
        ifindex: u32,
        segment: u32,
        mac: [u8; 6],
        flags: u32,
    ) -> Result<()> {
        let seg = *self
            .segments
            .get(&segment)
            .with_context(|| format!("unknown segment id {segment}"))?;
        if ifindex >= xnet_common::limits::IFINDEX {
            bail!(
                "ifindex {ifindex} is above {}: the data plane indexes interfaces by ifindex",
                xnet_common::limits::IFINDEX - 1
            );
        }
        let slot = match self.ports.get(&ifindex) {
            Some(p) => p.slot,
            // The lowest free slot (a reload may have freed one), its counters from zero.
            None => {
                let used: HashSet<u32> = self.ports.values().map(|p| p.slot).collect();
                let slot = (1..).find(|s| !used.contains(s)).unwrap();
                if slot > xnet_common::limits::INTERFACES {
                    bail!("more than {} interfaces", xnet_common::limits::INTERFACES);
                }
                self.zero_counts(slot)?;
                slot
            }
        };
        let cfg = IfConfig {
            segment,
            v4_root: seg.v4_root,
            v6_root: seg.v6_root,
            flags,
            slot,
            sample: seg.sample,
        };
        let mut ports: DevMap<_> = self.map_mut(names::MAP_TX_PORTS)?;
        ports
            .set(slot, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to TX_PORTS"))?;
        let mut ifs: Array<_, IfConfig> = self.map_mut(names::MAP_INTERFACES)?;
        ifs.set(ifindex, &cfg, 0)?;
        self.ports.insert(ifindex, Port { segment, mac, slot });
        // Next hops through this port may have become usable.
        self.rewrite_nexthops_via(ifindex)
    }

    /// The (IPv4, IPv6) root groups of a segment's tables.
    pub fn segment_roots(&self, segment: u32) -> Option<(u32, u32)> {
        self.segments.get(&segment).map(|s| (s.v4_root, s.v6_root))
    }

    pub fn segment_of(&self, ifindex: u32) -> Option<u32> {
        self.ports.get(&ifindex).map(|p| p.segment)
    }

    /// Routes `net` in `segment` over `next_hops` (ECMP when more than one); replaces any
    /// route for the same prefix.
    pub fn set_route(&mut self, segment: u32, net: IpNet, next_hops: &[NhKey]) -> Result<()> {
        if next_hops.is_empty() || next_hops.len() > MAX_ECMP {
            bail!(
                "{net}: needs 1 to {MAX_ECMP} next hops, got {}",
                next_hops.len()
            );
        }
        let seg = self
            .segments
            .get(&segment)
            .with_context(|| format!("unknown segment id {segment}"))?;
        let table = if net.addr().is_ipv4() { seg.v4 } else { seg.v6 };
        if let Some(nh) = next_hops
            .iter()
            .find(|nh| nh.via.is_ipv4() != net.addr().is_ipv4())
        {
            bail!("{net}: next hop {} is of the other address family", nh.via);
        }
        let old = self.tables.get(table, &net);
        let group = match self.existing_group(next_hops) {
            // A full table mostly shares a few groups: one reference more, nothing to write.
            Some(g) if old == Some(g) => return Ok(()),
            Some(g) => {
                self.groups.get_mut(&self.group_members[&g]).unwrap().refs += 1;
                g
            }
            None => {
                let mut ids = Vec::with_capacity(next_hops.len());
                for nh in next_hops {
                    match self.acquire_nexthop(*nh) {
                        Ok(id) => ids.push(id),
                        Err(e) => {
                            ids.iter().for_each(|&id| self.release_nexthop(id));
                            return Err(e);
                        }
                    }
                }
                ids.sort_unstable();
                match self.acquire_group(&ids) {
                    Ok(g) => g,
                    Err(e) => {
                        ids.iter().for_each(|&id| self.release_nexthop(id));
                        return Err(e);
                    }
                }
            }
        };
        if let Err(e) = self.tables.insert(table, &net, group) {
            self.release_group(group);
            return Err(e.into());
        }
        if let Some(old) = old {
            self.release_group(old);
        }
        Ok(())
    }

    /// The group whose members are exactly `next_hops`, if there is one.
    fn existing_group(&self, next_hops: &[NhKey]) -> Option<u32> {
        let mut ids = [0u32; MAX_ECMP];
        for (i, nh) in next_hops.iter().enumerate() {
            ids[i] = self.nexthops.get(nh)?.id;
        }
        let ids = &mut ids[..next_hops.len()];
        ids.sort_unstable();
        self.groups.get(&ids[..]).map(|g| g.id)
    }

    /// Removes the route for `net` in `segment`; returns whether there was one.
    pub fn remove_route(&mut self, segment: u32, net: IpNet) -> Result<bool> {
        let Some(seg) = self.segments.get(&segment) else {
            return Ok(false);
        };
        let table = if net.addr().is_ipv4() { seg.v4 } else { seg.v6 };
        match self.tables.remove(table, &net) {
            Some(group) => {
                self.release_group(group);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The next-hop group id a packet to `addr` in `segment` would use (0: no route).
    pub fn lookup(&self, segment: u32, addr: IpAddr) -> u32 {
        self.segments
            .get(&segment)
            .map(|s| {
                self.tables
                    .lookup(if addr.is_ipv4() { s.v4 } else { s.v6 }, addr)
            })
            .unwrap_or(0)
    }

    pub fn usage(&self) -> LpmUsage {
        self.tables.usage()
    }

    /// Learns (or forgets, with `None`) the MAC of neighbour `ip` on `ifindex`: next hops
    /// through it become usable by XDP, or go back to the kernel.
    pub fn set_neighbour(&mut self, ifindex: u32, ip: IpAddr, mac: Option<[u8; 6]>) -> Result<()> {
        let key = (ifindex, ip);
        let changed = match mac {
            Some(m) => self.neighbours.insert(key, m) != Some(m),
            None => self.neighbours.remove(&key).is_some(),
        };
        let nh = NhKey { ifindex, via: ip };
        if changed && self.nexthops.contains_key(&nh) {
            self.write_nexthop(nh)?;
        }
        Ok(())
    }

    pub fn neighbour(&self, ifindex: u32, ip: IpAddr) -> Option<[u8; 6]> {
        self.neighbours.get(&(ifindex, ip)).copied()
    }

    /// Next hops in use, with whether XDP can use them.
    pub fn nexthops(&self) -> Vec<(NhKey, bool)> {
        let mut v: Vec<_> = self
            .nexthops
            .keys()
            .map(|k| (*k, self.nexthop_value(*k).flags & NH_F_VALID != 0))
            .collect();
        v.sort();
        v
    }

    /// Makes the host's own addresses exactly `addrs`: packets to them go to the kernel.
    pub fn set_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let old = std::mem::take(&mut self.locals);
        let mut v4: BpfHashMap<_, [u8; 4], u32> = self.map_mut(names::MAP_LOCAL_V4)?;
        for a in &old {
            if let (IpAddr::V4(x), false) = (a, addrs.contains(a)) {
                let _ = v4.remove(&x.octets());
            }
        }
        for a in addrs {
            if let IpAddr::V4(x) = a {
                v4.insert(&x.octets(), &1, 0)?;
            }
        }
        let mut v6: BpfHashMap<_, [u8; 16], u32> = self.map_mut(names::MAP_LOCAL_V6)?;
        for a in &old {
            if let (IpAddr::V6(x), false) = (a, addrs.contains(a)) {
                let _ = v6.remove(&x.octets());
            }
        }
        for a in addrs {
            if let IpAddr::V6(x) = a {
                v6.insert(&x.octets(), &1, 0)?;
            }
        }
        // The filter in front of the two maps: every local address's bit set (written after
        // the additions above, so a new address is never filtered out).
        let bits = |set: &[IpAddr]| {
            let mut f = vec![0u64; xnet_common::LOCAL_FILTER_WORDS as usize];
            for a in set {
                let w = match a {
                    IpAddr::V4(x) => xnet_common::policy::words(&x.octets()),
                    IpAddr::V6(x) => xnet_common::policy::words(&x.octets()),
                };
                let (i, m) = xnet_common::local_filter_bit(&w);
                f[i as usize] |= m;
            }
            f
        };
        let (before, after) = (bits(&old), bits(addrs));
        let mut filter: Array<_, u64> = self.map_mut(names::MAP_LOCAL_FILTER)?;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b != a || old.is_empty() {
                filter.set(i as u32, a, 0)?;
            }
        }
        self.locals = addrs.to_vec();
        Ok(())
    }

    /// Replaces the whole rule set atomically: the unused generation is rewritten, then one
    /// store switches packets over to it.
    pub fn set_policy(&mut self, rules: &Compiled) -> Result<()> {
        let epoch = self.epoch.wrapping_add(1);
        let next = epoch & 1;
        let base = (next * MAX_TUPLES) as u16;
        self.set_classes(rules, next)?;
        // The unused generation's old entries: no packet has read them since the last
        // switch, long ago on a packet's time scale.
        let stale = std::mem::take(&mut self.written[next as usize]);
        let mut map: BpfHashMap<_, RuleKey, RuleValue> = self.map_mut(names::MAP_RULES)?;
        for k in &stale {
            let _ = map.remove(k);
        }
        let mut written = Vec::with_capacity(rules.entries.len());
        for (k, v) in &rules.entries {
            let key = RuleKey {
                tuple: k.tuple + base,
                ..*k
            };
            if let Err(e) = map.insert(&key, v, 0) {
                for k in &written {
                    let _ = map.remove(k);
                }
                return Err(anyhow!("writing policy entries: {e}"));
            }
            written.push(key);
        }
        self.written[next as usize] = written;
        let mut tuples: Array<_, Tuple> = self.map_mut(names::MAP_TUPLES)?;
        for (i, t) in rules.tuples.iter().enumerate() {
            tuples.set(next * MAX_TUPLES + i as u32, t, 0)?;
        }
        let mut meta: Array<_, u32> = self.map_mut(names::MAP_POLICY_META)?;
        meta.set(META_TUPLES_GEN0 + next, &(rules.tuples.len() as u32), 0)?;
        // One store switches rule set and cache epoch together.
        meta.set(META_EPOCH, &epoch, 0)?;
        self.epoch = epoch;
        Ok(())
    }

    /// Class tables and port classes for the rule set about to be switched to: its
    /// prefixes are added (beside the current set's: a finer partition serves both), the
    /// previous set's leftovers removed, and generation `next`'s port classes written.
    fn set_classes(&mut self, rules: &Compiled, next: u32) -> Result<()> {
        let wanted: HashSet<(usize, IpNet)> = rules
            .prefixes
            .iter()
            .enumerate()
            .flat_map(|(dir, set)| set.iter().map(move |n| (class_table(dir, n), *n)))
            .collect();
        if self.classes.tables.is_none() && !wanted.is_empty() {
            let mut tables = Vec::new();
            let mut meta: Vec<u32> = Vec::new();
            for bits in [32, 32, 128, 128] {
                let (t, root) = self.tables.add_table(bits)?;
                tables.push(t);
                meta.push(root + 1);
            }
            self.classes.tables = Some([tables[0], tables[1], tables[2], tables[3]]);
            let mut m: Array<_, u32> = self.map_mut(names::MAP_POLICY_META)?;
            for (i, r) in meta.iter().enumerate() {
                m.set(META_CLASS_ROOTS + i as u32, r, 0)?;
            }
        }
        if let Some(tables) = self.classes.tables {
            let c = &mut self.classes;
            for k in std::mem::take(&mut c.stale) {
                if wanted.contains(&k) || c.live.contains(&k) {
                    continue;
                }
                self.tables.remove(tables[k.0], &k.1);
                if let Some(id) = c.ids.remove(&k) {
                    c.alloc.release(id);
                }
            }
            for k in &wanted {
                if c.ids.contains_key(k) {
                    continue;
                }
                let id = c.alloc.alloc("policy prefix class")?;
                self.tables
                    .insert(tables[k.0], &k.1, id)
                    .with_context(|| format!("policy prefix {}", k.1))?;
                c.ids.insert(*k, id);
            }
            c.stale = c.live.difference(&wanted).copied().collect();
            c.live = wanted;
        }
        let port =
            |dir: usize, p: usize| rules.port_classes[dir].get(p).copied().unwrap_or(0) as u32;
        let new: Vec<u32> = (0..PORTS as usize)
            .map(|p| port(0, p) | port(1, p) << 16)
            .collect();
        let old = std::mem::take(&mut self.classes.ports[next as usize]);
        let mut map: Array<_, u32> = self.map_mut(names::MAP_PORT_CLASSES)?;
        for (p, v) in new.iter().enumerate() {
            if old.get(p).is_none_or(|o| o != v) && (!old.is_empty() || *v != 0) {
                map.set(next * PORTS + p as u32, v, 0)?;
            }
        }
        self.classes.ports[next as usize] = new;
        Ok(())
    }

    /// Declares firewall service `id` with its instances (next hops kept resolved like any
    /// other); none is used until `set_service_health` says it is healthy.
    pub fn set_service(&mut self, id: u32, instances: &[NhKey], fail_closed: bool) -> Result<()> {
        self.set_service_with_health(id, instances, &[], fail_closed)
    }

    /// `set_service` with `healthy` in the pool at once (a reload keeps a service's pool
    /// without a moment empty).
    pub fn set_service_with_health(
        &mut self,
        id: u32,
        instances: &[NhKey],
        healthy: &[(String, NhKey)],
        fail_closed: bool,
    ) -> Result<()> {
        if id >= MAX_SERVICES {
            bail!("service id {id} out of range");
        }
        let mut ids = Vec::new();
        for k in instances {
            ids.push((*k, self.acquire_nexthop(*k)?));
        }
        if let Some(old) = self.services.insert(id, ids) {
            old.iter().for_each(|(_, n)| self.release_nexthop(*n));
        }
        self.set_service_health(id, healthy, fail_closed)
    }

    /// The instances of service `id` that traffic may use now: their names (which place
    /// them in the Maglev table) and keys.
    pub fn set_service_health(
        &mut self,
        id: u32,
        pool: &[(String, NhKey)],
        fail_closed: bool,
    ) -> Result<()> {
        let declared = self.services.get(&id);
        let pool: Vec<(&str, u32)> = pool
            .iter()
            .filter_map(|(name, k)| {
                let (_, nh) = declared?.iter().find(|(d, _)| d == k)?;
                Some((name.as_str(), *nh))
            })
            .take(MAX_INSTANCES)
            .collect();
        let mut value = <Service as bytemuck::Zeroable>::zeroed();
        value.count = pool.len() as u32;
        value.fail_closed = fail_closed as u32;
        for (i, (_, nh)) in pool.iter().enumerate() {
            value.members[i] = *nh;
        }
        let names: Vec<&str> = pool.iter().map(|(n, _)| *n).collect();
        let table = crate::maglev::table(&names);
        value.table[..table.len()].copy_from_slice(&table);
        let mut arr: Array<_, Service> = self.map_mut(names::MAP_SERVICES)?;
        arr.set(id, &value, 0)?;
        Ok(())
    }

    /// Hits of rules 0..n, summed over CPUs.
    pub fn rule_counters(&self, n: usize) -> Result<Vec<Counter>> {
        let arr: PerCpuArray<_, Counter> = self.map(names::MAP_RULE_STATS)?;
        (0..n as u32)
            .map(|i| Ok(sum(arr.get(&i, 0)?.iter())))
            .collect()
    }

    /// Rearranges the per-rule counters after a policy change: new rule `i` takes the
    /// counters old rule `from[i]` had (None: from zero). Packets counted between the read
    /// and the write (microseconds) may land on the old index.
    pub fn move_rule_counters(&mut self, old: usize, from: &[Option<usize>]) -> Result<()> {
        let mut arr: PerCpuArray<_, Counter> = self.map_mut(names::MAP_RULE_STATS)?;
        let n = old.max(from.len()) as u32;
        let mut saved = Vec::with_capacity(n as usize);
        for i in 0..n {
            saved.push(arr.get(&i, 0)?);
        }
        let ncpus = saved.first().map_or(1, |v| v.len());
        for i in 0..n as usize {
            let values: Vec<Counter> = match from.get(i).copied().flatten() {
                Some(j) if j < saved.len() => saved[j].iter().copied().collect(),
                _ => vec![Counter::default(); ncpus],
            };
            arr.set(i as u32, aya::maps::PerCpuValues::try_from(values)?, 0)?;
        }
        Ok(())
    }

    /// Packets `steer` sent to next hop `k` (a firewall instance).
    pub fn steered_to(&self, k: NhKey) -> Result<Counter> {
        let Some(s) = self.nexthops.get(&k) else {
            return Ok(Counter::default());
        };
        let arr: PerCpuArray<_, Counter> = self.map(names::MAP_NH_STATS)?;
        Ok(sum(arr.get(&s.id, 0)?.iter()))
    }

    /// Reads every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let counts: PerCpuArray<_, Counter> = self.map(names::MAP_COUNTS)?;
        let read = |slot: u32, r: Reason| -> Result<Counter> {
            Ok(sum(counts
                .get(&(slot * Reason::COUNT + r as u32), 0)?
                .iter()))
        };
        let mut totals = [Counter::default(); Reason::COUNT as usize];
        let add = |t: &mut Counter, c: Counter| {
            t.packets += c.packets;
            t.bytes += c.bytes;
        };
        for r in Reason::ALL {
            add(&mut totals[r as usize], read(0, r)?);
        }
        let mut interfaces = Vec::new();
        let mut per_reason = Vec::new();
        for (&ifindex, port) in &self.ports {
            let mut s = IfStats::default();
            let mut reasons = Vec::new();
            for r in Reason::ALL {
                let c = read(port.slot, r)?;
                add(&mut totals[r as usize], c);
                s.rx += c.packets;
                s.rx_bytes += c.bytes;
                let (p, b) = match r.outcome() {
                    Outcome::Forwarded => (&mut s.forwarded, &mut s.forwarded_bytes),
                    Outcome::Passed => (&mut s.passed, &mut s.passed_bytes),
                    Outcome::Dropped => (&mut s.dropped, &mut s.dropped_bytes),
                };
                *p += c.packets;
                *b += c.bytes;
                if c.packets > 0 {
                    reasons.push((r, c));
                }
            }
            interfaces.push((ifindex, s));
            per_reason.push((ifindex, reasons));
        }
        interfaces.sort_by_key(|(i, _)| *i);
        per_reason.sort_by_key(|(i, _)| *i);
        let reasons = Reason::ALL
            .iter()
            .map(|r| (r.name(), totals[*r as usize].packets))
            .collect();
        let reason_bytes = Reason::ALL
            .iter()
            .map(|r| (r.name(), totals[*r as usize].bytes))
            .collect();
        Ok(Counters {
            interfaces,
            reasons,
            reason_bytes,
            per_reason,
        })
    }

    /// Runs program `prog` once on `packet` through `BPF_PROG_TEST_RUN`: the XDP action,
    /// the packet as the program left it, and the run's duration in ns.
    pub fn test_run(&mut self, prog: &str, packet: &[u8]) -> Result<(u32, Vec<u8>, u64)> {
        self.test_run_ingress(prog, packet, 0)
    }

    /// As `test_run`, with the packet arriving on `ifindex` (0: none).
    pub fn test_run_ingress(
        &mut self,
        prog: &str,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<(u32, Vec<u8>, u64)> {
        use aya::programs::{TestRun, TestRunOptions};
        let p: &mut Xdp = self
            .ebpf
            .program_mut(prog)
            .with_context(|| format!("no program {prog}"))?
            .try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        let mut out = vec![0u8; packet.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u32; 6];
        ctx[1] = packet.len() as u32;
        ctx[3] = ifindex;
        let ctx_bytes: &[u8] = bytemuck::cast_slice(&ctx);
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: if ifindex != 0 { Some(ctx_bytes) } else { None },
            repeat: 1,
            ..Default::default()
        };
        let r = p
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration.as_nanos() as u64))
    }

    /// Raw access for the benchmark: its extra maps and programs.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    // ---- internals ----

    fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(
        &'a self,
        name: &str,
    ) -> Result<T> {
        let m = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(T::try_from(m)?)
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> Result<T> {
        let m = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(T::try_from(m)?)
    }

    fn nexthop_value(&self, k: NhKey) -> NextHop {
        let mut nh = NextHop {
            ifindex: k.ifindex,
            ..Default::default()
        };
        if k.ifindex == TUNNEL {
            nh.flags = NH_F_KERNEL;
            return nh;
        }
        if let (Some(port), Some(mac)) = (
            self.ports.get(&k.ifindex),
            self.neighbours.get(&(k.ifindex, k.via)),
        ) {
            nh.smac = port.mac;
            nh.dmac = *mac;
            nh.flags = NH_F_VALID;
            nh.port = port.slot;
        }
        nh
    }

    fn write_nexthop(&mut self, k: NhKey) -> Result<()> {
        let id = self.nexthops[&k].id;
        let value = self.nexthop_value(k);
        let mut arr: Array<_, NextHop> = self.map_mut(names::MAP_NEXTHOPS)?;
        arr.set(id, &value, 0)?;
        Ok(())
    }

    fn acquire_nexthop(&mut self, k: NhKey) -> Result<u32> {
        if let Some(s) = self.nexthops.get_mut(&k) {
            s.refs += 1;
            return Ok(s.id);
        }
        let id = self.nh_ids.alloc("next-hop")?;
        self.nexthops.insert(k, NhState { id, refs: 1 });
        self.nh_by_id.insert(id, k);
        if let Err(e) = self.write_nexthop(k) {
            self.nexthops.remove(&k);
            self.nh_by_id.remove(&id);
            self.nh_ids.release(id);
            return Err(e);
        }
        Ok(id)
    }

    fn release_nexthop(&mut self, id: u32) {
        let Some(k) = self.nh_by_id.get(&id).copied() else {
            return;
        };
        let s = self.nexthops.get_mut(&k).unwrap();
        s.refs -= 1;
        if s.refs == 0 {
            self.nexthops.remove(&k);
            self.nh_by_id.remove(&id);
            self.nh_ids.release(id);
        }
    }

    /// The group for this (sorted) member set, created if new. Takes one reference on the
    /// group; the caller's next-hop references move into it.
    fn acquire_group(&mut self, members: &[u32]) -> Result<u32> {
        if let Some(g) = self.groups.get_mut(members) {
            g.refs += 1;
            let id = g.id;
            // The group already holds references on its members.
            for &m in members {
                self.release_nexthop(m);
            }
            return Ok(id);
        }
        let id = self.group_ids.alloc("next-hop group")?;
        let with_addrs: SmallVec<[Member; MAX_ECMP]> =
            members.iter().map(|m| (*m, self.nh_by_id[m].via)).collect();
        if let Err(e) = self.shared_groups.lock().write(id, &with_addrs) {
            self.group_ids.release(id);
            return Err(e);
        }
        self.groups
            .insert(members.to_vec(), GroupState { id, refs: 1 });
        self.group_members.insert(id, members.to_vec());
        Ok(id)
    }

    /// Prefix-independent convergence: next hop `via` died (`alive` false) or is back;
    /// see `nexthop_groups`. Returns how many groups were rewritten.
    pub fn set_nexthop_alive(&self, via: IpAddr, alive: bool) -> Result<usize> {
        self.shared_groups.lock().set_alive(via, alive)
    }

    /// The next-hop groups as packets see them, for whoever learns of a dead next hop
    /// first (the BFD thread).
    pub fn shared_groups(&self) -> SharedGroups {
        self.shared_groups.clone()
    }

    fn release_group(&mut self, id: u32) {
        let Some(members) = self.group_members.get(&id) else {
            return;
        };
        let g = self.groups.get_mut(members).unwrap();
        g.refs -= 1;
        if g.refs == 0 {
            let members = self.group_members.remove(&id).unwrap();
            self.groups.remove(&members);
            self.shared_groups.lock().forget(id);
            self.group_ids.release(id);
            for m in members {
                self.release_nexthop(m);
            }
        }
    }
}

fn sum<'a>(it: impl Iterator<Item = &'a Counter>) -> Counter {
    it.fold(Counter::default(), |a, c| Counter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}
