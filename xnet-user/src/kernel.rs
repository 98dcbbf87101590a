//! The kernel side over rtnetlink: interfaces, the host's addresses, the neighbour table,
//! and the slow-path FIB mirror (one routing table per segment, selected by `ip rule iif`).

use std::net::IpAddr;

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::RuleAction;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder, RouteNextHopBuilder};

/// Routes the agent installs carry this protocol number, so they can be told apart
/// (`ip route show proto 250`) and cleaned up.
pub const RTPROT_XNET: u8 = 250;

/// The `ip rule` priorities the agent uses: `iif X lookup T` at BASE, and `iif X
/// unreachable` right after it, so a segment never falls through to the main table.
pub const RULE_PRIORITY: u32 = 1000;

/// The unspecified address of `a`'s family: a kernel next hop without gateway.
pub fn unspecified(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
    }
}

/// The kernel's main routing table (RT_TABLE_MAIN): what the host's own sockets use.
pub const MAIN_TABLE: u32 = 254;

#[derive(Debug, Clone)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    /// Present when the entry is usable (reachable, stale, delay, probe, permanent).
    pub mac: Option<[u8; 6]>,
}

pub struct Kernel {
    handle: Handle,
}

impl Kernel {
    /// Opens a netlink connection driven by a background tokio task.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Link> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let msg = links
            .try_next()
            .await
            .map_err(|e| match e {
                rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV => {
                    anyhow!("interface {name:?} does not exist")
                }
                e => anyhow!("interface {name:?}: {e}"),
            })?
            .ok_or_else(|| anyhow!("interface {name:?} does not exist"))?;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(m) if m.len() == 6 => {
                    Some([m[0], m[1], m[2], m[3], m[4], m[5]])
                }
                _ => None,
            })
            .ok_or_else(|| anyhow!("interface {name:?} has no Ethernet address"))?;
        Ok(Link {
            ifindex: msg.header.index,
            mac,
        })
    }

    /// Every address configured on this host (this network namespace).
    pub async fn addresses(&self) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        while let Some(msg) = s.try_next().await? {
            for a in msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    out.push(ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The connected subnets: (ifindex, interface address with its prefix length).
    pub async fn connected(&self) -> Result<Vec<(u32, IpNet)>> {
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        while let Some(msg) = s.try_next().await? {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    if let Ok(net) = IpNet::new(*ip, msg.header.prefix_len) {
                        out.push((msg.header.index, net));
                    }
                }
            }
        }
        Ok(out)
    }

    pub async fn neighbours(&self) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let mut s = self
                .handle
                .neighbours()
                .get()
                .set_address_family(if v == IpVersion::V4 {
                    netlink_packet_route::AddressFamily::Inet
                } else {
                    netlink_packet_route::AddressFamily::Inet6
                })
                .execute();
            while let Some(msg) = s.try_next().await? {
                if let Some(n) = parse_neighbour(&msg) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Asks the kernel to keep `ip` on `ifindex` resolved on its own (a "managed"
    /// neighbour, Linux ≥ 5.16): next hops get their MAC without waiting for traffic, even
    /// with forwarding off. An entry the operator made permanent (or static, `noarp`) is
    /// kept as it is: returns false then, true when the entry is ours to manage.
    pub async fn manage_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<bool> {
        if self.operator_neighbour(ifindex, ip).await? {
            return Ok(false);
        }
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, ip)
            .state(NeighbourState::None)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        req.execute()
            .await
            .with_context(|| format!("managed neighbour {ip} on ifindex {ifindex}"))?;
        Ok(true)
    }

    /// Whether `ip` on `ifindex` has a permanent or noarp entry (set by hand, not learned).
    async fn operator_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<bool> {
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(if ip.is_ipv4() {
                netlink_packet_route::AddressFamily::Inet
            } else {
                netlink_packet_route::AddressFamily::Inet6
            })
            .execute();
        while let Some(msg) = s.try_next().await? {
            if msg.header.ifindex == ifindex
                && matches!(
                    msg.header.state,
                    NeighbourState::Permanent | NeighbourState::Noarp
                )
                && parse_neighbour(&msg).is_some_and(|n| n.ip == ip)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn forget_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if ip.is_ipv4() {
            netlink_packet_route::AddressFamily::Inet
        } else {
            netlink_packet_route::AddressFamily::Inet6
        };
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        self.handle.neighbours().del(msg).execute().await?;
        Ok(())
    }

    fn route_message(
        table: u32,
        net: IpNet,
        next_hops: &[(u32, IpAddr)],
    ) -> Result<netlink_packet_route::route::RouteMessage> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.addr(), net.prefix_len())?
            .table_id(table)
            .protocol(RouteProtocol::Other(RTPROT_XNET));
        match next_hops {
            [] => {}
            [(ifindex, via)] if via.is_unspecified() => b = b.output_interface(*ifindex),
            [(ifindex, via)] => b = b.gateway(*via)?.output_interface(*ifindex),
            many => {
                let hops = many
                    .iter()
                    .map(|(i, via)| {
                        let nb = if via.is_ipv4() {
                            RouteNextHopBuilder::new_ipv4()
                        } else {
                            RouteNextHopBuilder::new_ipv6()
                        };
                        // Unspecified: a device next hop (into an xfrm interface).
                        let nb = nb.interface(*i);
                        Ok(if via.is_unspecified() {
                            nb.build()
                        } else {
                            nb.via(*via)?.build()
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                b = b.multipath(hops);
            }
        }
        Ok(b.build())
    }

    /// `ip route replace`: a next hop with an unspecified gateway is a device route (into
    /// an xfrm interface).
    pub async fn replace_route(
        &self,
        table: u32,
        net: IpNet,
        next_hops: &[(u32, IpAddr)],
    ) -> Result<()> {
        let msg = Self::route_message(table, net, next_hops)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("kernel route {net} table {table}"))
    }

    pub async fn delete_route(&self, table: u32, net: IpNet) -> Result<()> {
        let msg = Self::route_message(table, net, &[])?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("deleting kernel route {net} table {table}"))
    }

    /// `ip link add NAME type xfrm if_id IF_ID` and up; a link of that name left behind
    /// (an agent that did not stop cleanly) is replaced. Returns its ifindex.
    pub async fn create_xfrm_interface(&self, name: &str, if_id: u32) -> Result<u32> {
        self.delete_link(name).await?;
        self.handle
            .link()
            .add(
                rtnetlink::LinkMessageBuilder::<rtnetlink::LinkXfrm>::new(name)
                    .if_id(if_id)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| match e {
                rtnetlink::Error::NetlinkError(m)
                    if m.raw_code() == -libc::EOPNOTSUPP || m.raw_code() == -libc::EINVAL =>
                {
                    anyhow!("this kernel has no xfrm interfaces (xfrm_interface module)")
                }
                e => anyhow!("creating xfrm interface {name:?}: {e}"),
            })?;
        self.link_index(name).await
    }

    /// Deletes link `name` if it exists.
    pub async fn delete_link(&self, name: &str) -> Result<()> {
        match self.link_index(name).await {
            Ok(i) => self
                .handle
                .link()
                .del(i)
                .execute()
                .await
                .with_context(|| format!("deleting interface {name:?}")),
            Err(_) => Ok(()),
        }
    }

    async fn link_index(&self, name: &str) -> Result<u32> {
        let msg = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| anyhow!("interface {name:?}: {e}"))?
            .ok_or_else(|| anyhow!("interface {name:?} does not exist"))?;
        Ok(msg.header.index)
    }

    /// How the main table reaches `addr`: (output ifindex, gateway if any), by longest
    /// prefix. The underlay of a tunnel endpoint.
    pub async fn route_to(&self, addr: IpAddr) -> Result<(u32, Option<IpAddr>)> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let msg = if addr.is_ipv4() {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        };
        let mut best: Option<(u8, u32, Option<IpAddr>)> = None;
        let mut s = self.handle.route().get(msg).execute();
        while let Some(m) = s.try_next().await? {
            let mut table = m.header.table as u32;
            let (mut dst, mut oif, mut gw) = (None, None, None);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(*a))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
                    _ => {}
                }
            }
            let len = m.header.destination_prefix_length;
            let dst = dst.unwrap_or(if addr.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            });
            let (Some(oif), Ok(net)) = (oif, IpNet::new(dst, len)) else {
                continue;
            };
            if table != MAIN_TABLE || !net.contains(&addr) || best.is_some_and(|(l, _, _)| l >= len)
            {
                continue;
            }
            best = Some((len, oif, gw));
        }
        best.map(|(_, o, g)| (o, g))
            .ok_or_else(|| anyhow!("no route to {addr} in the main table"))
    }

    /// Every route the agent installed (protocol 250), in any table: (table, prefix).
    /// A new agent removes the ones it no longer wants (a previous agent's leftovers).
    pub async fn our_routes(&self) -> Result<Vec<(u32, IpNet)>> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let mut out = Vec::new();
        for v6 in [false, true] {
            let msg = if v6 {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            };
            let mut s = self.handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await? {
                if m.header.protocol != RouteProtocol::Other(RTPROT_XNET) {
                    continue;
                }
                let mut table = m.header.table as u32;
                let mut dst: IpAddr = if v6 {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = (*a).into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = (*a).into(),
                        _ => {}
                    }
                }
                if let Ok(net) = IpNet::new(dst, m.header.destination_prefix_length) {
                    out.push((table, net));
                }
            }
        }
        Ok(out)
    }

    /// `ip rule add iif NAME lookup TABLE` and `iif NAME unreachable` after it, both
    /// families.
    pub async fn add_segment_rules(&self, iif: &str, table: u32, priority: u32) -> Result<()> {
        for v6 in [false, true] {
            for (prio, action) in [
                (priority, RuleAction::ToTable),
                (priority + 1, RuleAction::Unreachable),
            ] {
                let req = self
                    .handle
                    .rule()
                    .add()
                    .input_interface(iif.to_string())
                    .priority(prio)
                    .action(action);
                let req = if action == RuleAction::ToTable {
                    req.table_id(table)
                } else {
                    req
                };
                let r = if v6 {
                    req.v6().replace().execute().await
                } else {
                    req.v4().replace().execute().await
                };
                r.with_context(|| format!("ip rule iif {iif} priority {prio}"))?;
            }
        }
        Ok(())
    }

    pub async fn delete_segment_rules(&self, iif: &str) -> Result<()> {
        for v in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<_> = self.handle.rule().get(v).execute().try_collect().await?;
            for r in rules {
                let ours = r.attributes.iter().any(|a| {
                    matches!(a, netlink_packet_route::rule::RuleAttribute::Iifname(n) if n == iif)
                });
                if ours {
                    self.handle.rule().del(r).execute().await?;
                }
            }
        }
        Ok(())
    }
}

fn parse_neighbour(msg: &NeighbourMessage) -> Option<Neighbour> {
    let ip = msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    let mac = msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
            Some([m[0], m[1], m[2], m[3], m[4], m[5]])
        }
        _ => None,
    });
    Some(Neighbour {
        ifindex: msg.header.ifindex,
        ip,
        mac: if usable { mac } else { None },
    })
}
