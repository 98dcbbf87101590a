//! One BGP session per neighbour, as a tokio task: Idle → Connect/Active → OpenSent →
//! OpenConfirm → Established (RFC 4271 §8), with connect-retry back-off, hold and keepalive
//! timers, connection-collision resolution (§6.8) and NOTIFICATIONs with the right codes.
//! It reports to the agent through [`Event`]s and sends what the agent puts in its
//! advertisement channel.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use log::{info, warn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::packet::*;

/// What the session needs to know.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Distinguishes this session task from an earlier one for the same peer (after a
    /// reconfiguration), so the agent can ignore the old one's last events.
    pub id: u64,
    pub name: String,
    pub segment: u32,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub peer: IpAddr,
    pub port: u16,
    pub remote_asn: u32,
    pub hold_time: u16,
    pub passive: bool,
    pub max_prefixes: Option<usize>,
    /// Source address of the session (else the kernel picks).
    pub local_address: Option<IpAddr>,
}

/// Connects to `target`, from `local` when given.
async fn connect(target: SocketAddr, local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(l) = local {
        sock.bind(SocketAddr::new(l, 0))?;
    }
    sock.connect(target).await
}

/// A route to advertise; the session adds next-hop-self and, for eBGP, its AS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub net: IpNet,
    pub attrs: Attrs,
}

#[derive(Debug)]
pub enum Event {
    Established {
        peer: IpAddr,
        peer_id: Ipv4Addr,
    },
    Update {
        peer: IpAddr,
        peer_id: Ipv4Addr,
        ebgp: bool,
        update: Box<Update>,
    },
    Down {
        peer: IpAddr,
        reason: String,
    },
}

/// Session state as `xnet bgp` shows it.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub state: &'static str,
    pub since: Option<Instant>,
    pub sent: usize,
    pub last_error: Option<String>,
}

pub type SharedState = Arc<std::sync::Mutex<State>>;

fn set(state: &SharedState, s: &'static str) {
    let mut st = state.lock().unwrap();
    if st.state != s {
        st.state = s;
        st.since = Some(Instant::now());
    }
}

/// Runs the session until the agent drops its channels.
pub async fn run(
    cfg: SessionConfig,
    events: mpsc::Sender<(u64, Event)>,
    mut incoming: mpsc::Receiver<TcpStream>,
    adverts: watch::Receiver<Arc<Vec<Advert>>>,
    state: SharedState,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        set(&state, if cfg.passive { "Active" } else { "Connect" });
        let target = SocketAddr::new(cfg.peer, cfg.port);
        let stream = tokio::select! {
            s = incoming.recv() => match s { Some(s) => s, None => return },
            r = async { tokio::time::timeout(Duration::from_secs(5), connect(target, cfg.local_address)).await }, if !cfg.passive => {
                match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => { retry(&state, &mut backoff, format!("connect to {target}: {e}")).await; continue; }
                    Err(_) => { retry(&state, &mut backoff, format!("connect to {target}: timed out")).await; continue; }
                }
            }
        };
        let mut s = Session {
            cfg: &cfg,
            stream,
            four_octet: false,
            max_len: MAX_LEN,
            peer_id: Ipv4Addr::UNSPECIFIED,
        };
        let result = s.run(&events, &mut incoming, adverts.clone(), &state).await;
        let reason = match result {
            Ok(()) => "closed".to_string(),
            Err(e) => e,
        };
        warn!("bgp {} ({}): session down: {reason}", cfg.name, cfg.peer);
        state.lock().unwrap().last_error = Some(reason.clone());
        if events
            .send((
                cfg.id,
                Event::Down {
                    peer: cfg.peer,
                    reason,
                },
            ))
            .await
            .is_err()
        {
            return;
        }
        retry(&state, &mut backoff, String::new()).await;
    }
}

async fn retry(state: &SharedState, backoff: &mut Duration, why: String) {
    set(state, "Idle");
    if !why.is_empty() {
        state.lock().unwrap().last_error = Some(why);
    }
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(30));
}

struct Session<'a> {
    cfg: &'a SessionConfig,
    stream: TcpStream,
    four_octet: bool,
    max_len: usize,
    peer_id: Ipv4Addr,
}

impl Session<'_> {
    async fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(msg)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    async fn notify(&mut self, e: &BgpError) -> String {
        let _ = self
            .send(&encode_notification(e.code, e.subcode, &[]))
            .await;
        format!("sent NOTIFICATION: {e}")
    }

    async fn read(&mut self) -> Result<Message, String> {
        let mut hdr = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut hdr)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let len = match frame_len(&hdr, self.max_len) {
            Ok(l) => l,
            Err(e) => return Err(self.notify(&e).await),
        };
        let mut buf = hdr.to_vec();
        buf.resize(len, 0);
        self.stream
            .read_exact(&mut buf[HEADER_LEN..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        match decode(&buf, self.four_octet, self.max_len) {
            Ok(Message::Notification { code, subcode, .. }) => {
                Err(format!("received NOTIFICATION {code}/{subcode}"))
            }
            Ok(m) => Ok(m),
            Err(e) => Err(self.notify(&e).await),
        }
    }

    async fn read_within(&mut self, hold: Duration) -> Result<Message, String> {
        if hold.is_zero() {
            return self.read().await;
        }
        match tokio::time::timeout(hold, self.read()).await {
            Ok(r) => r,
            Err(_) => Err(self
                .notify(&BgpError {
                    code: ERR_HOLD_TIMER,
                    subcode: 0,
                    reason: "hold timer expired".into(),
                })
                .await),
        }
    }

    fn family(&self) -> (u16, u8) {
        (
            if self.cfg.peer.is_ipv4() {
                AFI_IPV4
            } else {
                AFI_IPV6
            },
            SAFI_UNICAST,
        )
    }

    async fn run(
        &mut self,
        events: &mpsc::Sender<(u64, Event)>,
        incoming: &mut mpsc::Receiver<TcpStream>,
        mut adverts: watch::Receiver<Arc<Vec<Advert>>>,
        state: &SharedState,
    ) -> Result<(), String> {
        let _ = self.stream.set_nodelay(true);
        let open = Open {
            asn: self.cfg.local_asn,
            hold_time: self.cfg.hold_time,
            router_id: self.cfg.router_id,
            families: vec![self.family()],
            four_octet: true,
            route_refresh: true,
            extended_message: true,
            graceful_restart: false,
        };
        self.send(&encode_open(&open)).await?;
        set(state, "OpenSent");
        // RFC 4271 suggests a large hold time until the OPEN arrives.
        let peer_open = match self.read_within(Duration::from_secs(240)).await? {
            Message::Open(o) => o,
            other => {
                return Err(self
                    .notify(&BgpError {
                        code: ERR_FSM,
                        subcode: 1,
                        reason: format!("expected OPEN, got {other:?}"),
                    })
                    .await)
            }
        };
        if peer_open.asn != self.cfg.remote_asn {
            let e = BgpError {
                code: ERR_OPEN,
                subcode: 2,
                reason: format!(
                    "peer AS {} (configured {})",
                    peer_open.asn, self.cfg.remote_asn
                ),
            };
            return Err(self.notify(&e).await);
        }
        if peer_open.router_id == self.cfg.router_id && self.cfg.remote_asn == self.cfg.local_asn {
            return Err(self
                .notify(&BgpError {
                    code: ERR_OPEN,
                    subcode: 3,
                    reason: "same BGP identifier".into(),
                })
                .await);
        }
        if !peer_open.families.contains(&self.family()) {
            warn!(
                "bgp {}: peer does not announce {:?}; routes may not flow",
                self.cfg.name,
                self.family()
            );
        }
        self.four_octet = peer_open.four_octet;
        // RFC 8654: larger messages once both sides announced them.
        if peer_open.extended_message {
            self.max_len = MAX_LEN_EXTENDED;
        }
        self.peer_id = peer_open.router_id;
        let hold = Duration::from_secs(self.cfg.hold_time.min(peer_open.hold_time) as u64);
        self.send(&encode_keepalive()).await?;
        set(state, "OpenConfirm");
        // Connection collision (§6.8): an incoming connection from this peer while we are
        // in OpenConfirm. The side with the higher BGP identifier keeps the connection it
        // initiated; the other is closed with Cease 7.
        loop {
            tokio::select! {
                m = self.read_within(hold.max(Duration::from_secs(3))) => {
                    match m? {
                        Message::Keepalive => break,
                        other => return Err(self.notify(&BgpError { code: ERR_FSM, subcode: 2, reason: format!("expected KEEPALIVE, got {other:?}") }).await),
                    }
                }
                Some(mut other) = incoming.recv() => {
                    let _ = other.write_all(&encode_notification(ERR_CEASE, 7, &[])).await;
                }
            }
        }
        set(state, "Established");
        info!(
            "bgp {} ({}): established, AS {}, id {}, hold {}s",
            self.cfg.name,
            self.cfg.peer,
            peer_open.asn,
            peer_open.router_id,
            hold.as_secs()
        );
        let ebgp = self.cfg.remote_asn != self.cfg.local_asn;
        events
            .send((
                self.cfg.id,
                Event::Established {
                    peer: self.cfg.peer,
                    peer_id: self.peer_id,
                },
            ))
            .await
            .map_err(|_| "agent gone")?;
        let local = self
            .stream
            .local_addr()
            .map_err(|e| e.to_string())?
            .ip()
            .to_canonical();
        let mut sent: HashMap<IpNet, Attrs> = HashMap::new();
        // What the peer currently announces, for the max-prefix limit.
        let mut received: std::collections::HashSet<IpNet> = std::collections::HashSet::new();
        let current = adverts.borrow_and_update().clone();
        self.advertise(&current, &mut sent, local, ebgp).await?;
        state.lock().unwrap().sent = sent.len();
        let keepalive = if hold.is_zero() {
            Duration::from_secs(3600)
        } else {
            hold / 3
        };
        let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            tokio::select! {
                m = self.read_within(hold) => match m? {
                    Message::Update(u) => {
                        if let Some(why) = &u.treat_as_withdraw {
                            warn!("bgp {} ({}): malformed UPDATE treated as withdraw (RFC 7606): {why}", self.cfg.name, self.cfg.peer);
                        }
                        if let Some(max) = self.cfg.max_prefixes {
                            for n in u.withdrawn.iter().chain(u.mp_unreach.iter().flat_map(|m| m.withdrawn.iter())) {
                                received.remove(n);
                            }
                            received.extend(u.nlri.iter().chain(u.mp_reach.iter().flat_map(|m| m.nlri.iter())).copied());
                            if received.len() > max {
                                let e = BgpError { code: ERR_CEASE, subcode: 1, reason: format!("maximum number of prefixes reached ({} > {max})", received.len()) };
                                return Err(self.notify(&e).await);
                            }
                        }
                        events.send((self.cfg.id, Event::Update { peer: self.cfg.peer, peer_id: self.peer_id, ebgp, update: Box::new(u) })).await.map_err(|_| "agent gone")?;
                    }
                    Message::Keepalive => {}
                    Message::RouteRefresh { .. } => {
                        let all = adverts.borrow().clone();
                        sent.clear();
                        self.advertise(&all, &mut sent, local, ebgp).await?;
                    }
                    Message::Open(_) => return Err(self.notify(&BgpError { code: ERR_FSM, subcode: 3, reason: "OPEN while established".into() }).await),
                    Message::Notification { .. } => unreachable!("read() returns NOTIFICATIONs as errors"),
                },
                _ = ka.tick() => self.send(&encode_keepalive()).await?,
                changed = adverts.changed() => {
                    if changed.is_err() {
                        let _ = self.send(&encode_notification(ERR_CEASE, 2, &[])).await;
                        return Ok(());
                    }
                    let all = adverts.borrow_and_update().clone();
                    self.advertise(&all, &mut sent, local, ebgp).await?;
                    state.lock().unwrap().sent = sent.len();
                }
                Some(mut other) = incoming.recv() => {
                    let _ = other.write_all(&encode_notification(ERR_CEASE, 7, &[])).await;
                }
            }
        }
    }

    /// Sends what changed between `sent` and `want`: withdrawals, then announcements with
    /// next-hop-self (and our AS prepended for eBGP).
    async fn advertise(
        &mut self,
        want: &[Advert],
        sent: &mut HashMap<IpNet, Attrs>,
        local: IpAddr,
        ebgp: bool,
    ) -> Result<(), String> {
        let (afi, safi) = self.family();
        let want: HashMap<IpNet, &Attrs> = want
            .iter()
            .filter(|a| a.net.addr().is_ipv4() == (afi == AFI_IPV4))
            .map(|a| (a.net, &a.attrs))
            .collect();
        let gone: Vec<IpNet> = sent
            .keys()
            .filter(|n| !want.contains_key(n))
            .copied()
            .collect();
        for chunk in gone.chunks(500) {
            let msg = if afi == AFI_IPV4 {
                encode_update(chunk, None, &[], None, self.four_octet)
            } else {
                encode_update(
                    &[],
                    None,
                    &[],
                    Some(&MpUnreach {
                        afi,
                        safi,
                        withdrawn: chunk.to_vec(),
                    }),
                    self.four_octet,
                )
            };
            self.send(&msg).await?;
        }
        for n in &gone {
            sent.remove(n);
        }
        // Group announcements by their attributes: one UPDATE carries many prefixes.
        let mut groups: HashMap<Attrs, Vec<IpNet>> = HashMap::new();
        for (net, attrs) in want {
            let mut a = attrs.clone();
            if ebgp {
                a.local_pref = None;
                match a.as_path.first_mut() {
                    Some(seg) if seg.kind == 2 && seg.asns.len() < 255 => {
                        seg.asns.insert(0, self.cfg.local_asn)
                    }
                    _ => a.as_path.insert(
                        0,
                        AsSegment {
                            kind: 2,
                            asns: vec![self.cfg.local_asn],
                        },
                    ),
                }
            } else if a.local_pref.is_none() {
                a.local_pref = Some(100);
            }
            a.next_hop = match local {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            };
            if sent.get(&net) != Some(&a) {
                sent.insert(net, a.clone());
                groups.entry(a).or_default().push(net);
            }
        }
        for (attrs, nets) in groups {
            for chunk in nets.chunks(400) {
                let msg = if afi == AFI_IPV4 {
                    encode_update(&[], Some((&attrs, None)), chunk, None, self.four_octet)
                } else {
                    let mp = MpReach {
                        afi,
                        safi,
                        next_hop: Some(local),
                        nlri: chunk.to_vec(),
                    };
                    encode_update(&[], Some((&attrs, Some(&mp))), &[], None, self.four_octet)
                };
                self.send(&msg).await?;
            }
        }
        Ok(())
    }
}
