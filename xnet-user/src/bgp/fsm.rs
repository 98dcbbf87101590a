//! One BGP session per neighbour, as a tokio task: Idle → Connect/Active → OpenSent →
//! OpenConfirm → Established (RFC 4271 §8), with connect-retry back-off, hold and keepalive
//! timers, connection-collision resolution (§6.8), graceful restart (RFC 4724) and
//! NOTIFICATIONs with the right codes. It reports to the agent through [`Event`]s, sends what
//! the agent puts in its advertisement channel and obeys its [`Control`]s.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Warn (once per crossing) when the peer announces more than this.
    pub warn_prefixes: Option<usize>,
    /// Check that an external path starts with the peer's AS (RFC 4271 §6.3).
    pub enforce_first_as: bool,
    /// The agent's own addresses: a NEXT_HOP among them is ignored.
    pub local_addrs: Arc<Vec<IpAddr>>,
    /// TCP-MD5 key for the session's segments (RFC 2385).
    pub password: Option<super::md5::Key>,
    /// Source address of the session (else the kernel picks).
    pub local_address: Option<IpAddr>,
    /// Announce graceful restart (RFC 4724), as helper and as restarting speaker.
    pub graceful_restart: Option<GrLocal>,
    /// Set while the agent is restarting (its routes not yet selected): the R bit, and
    /// our advertisements wait.
    pub restarting: Arc<AtomicBool>,
}

/// Our side of graceful restart.
#[derive(Debug, Clone, Copy)]
pub struct GrLocal {
    /// Seconds the peer should keep our routes when our session drops.
    pub restart_time: u16,
    /// The F bit of the first session: the agent took over a data plane that kept
    /// forwarding. Later sessions of the same agent always have it (XDP never stopped).
    pub forwarding: bool,
}

/// What the agent asks of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Close with a NOTIFICATION Cease of this subcode (RFC 4486: 2 Administrative
    /// Shutdown, 3 Peer De-configured, 6 Other Configuration Change), so the peer drops our
    /// routes at once instead of keeping them for a graceful restart.
    Shutdown(u8),
    /// Ask the peer to send its routes again (ROUTE-REFRESH, RFC 2918): the import policy
    /// changed. A peer without the capability gets its session reset instead.
    Refresh,
}

/// Connects to `target`, from `local` when given, signing with `key` (TCP-MD5).
async fn connect(
    target: SocketAddr,
    local: Option<IpAddr>,
    key: Option<&super::md5::Key>,
) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(k) = key {
        super::md5::set(&sock, target.ip(), Some(k))?;
    }
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
        /// The peer's graceful-restart capability, when both sides announced one.
        graceful_restart: Option<GracefulRestart>,
    },
    /// The peer sent End-of-RIB: its initial routes are all in.
    EndOfRib { peer: IpAddr },
    Update {
        peer: IpAddr,
        peer_id: Ipv4Addr,
        ebgp: bool,
        update: Box<Update>,
    },
    Down {
        peer: IpAddr,
        reason: String,
        /// Both sides announced graceful restart and the session ended without a
        /// NOTIFICATION: the peer is restarting, keep its routes (RFC 4724 §4.2).
        graceful: bool,
    },
}

/// Why a session ended.
struct Ended {
    reason: String,
    graceful: bool,
    /// Collision resolution kept the peer's connection: go on with it.
    switch_to: Option<TcpStream>,
}

impl From<String> for Ended {
    fn from(reason: String) -> Self {
        Ended {
            reason,
            graceful: false,
            switch_to: None,
        }
    }
}

impl From<&str> for Ended {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

/// Session state as `xnet bgp` shows it.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub state: &'static str,
    pub since: Option<Instant>,
    pub sent: usize,
    pub last_error: Option<String>,
    /// Prefixes received in families that were not negotiated (ignored).
    pub not_negotiated: u64,
    /// UPDATEs whose announcements were turned into withdrawals (RFC 7606, own next hop,
    /// first AS).
    pub treated_as_withdraw: u64,
}

pub type SharedState = Arc<std::sync::Mutex<State>>;

fn set(state: &SharedState, s: &'static str) {
    let mut st = state.lock().unwrap();
    if st.state != s {
        st.state = s;
        st.since = Some(Instant::now());
    }
}

/// Runs the session until the agent drops its channels or shuts it down.
pub async fn run(
    cfg: SessionConfig,
    events: mpsc::Sender<(u64, Event)>,
    mut incoming: mpsc::Receiver<TcpStream>,
    adverts: watch::Receiver<Option<Arc<Vec<Advert>>>>,
    mut control: mpsc::UnboundedReceiver<Control>,
    state: SharedState,
) {
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    let mut next: Option<TcpStream> = None;
    loop {
        set(&state, if cfg.passive { "Active" } else { "Connect" });
        let target = SocketAddr::new(cfg.peer, cfg.port);
        let (stream, initiated) = match next.take() {
            Some(s) => (s, false),
            None => tokio::select! {
                s = incoming.recv() => match s { Some(s) => (s, false), None => return },
                // The kernel drops connections whose TCP-MD5 signature does not match
                // without a word to us: its counters are the only sign.
                _ = md5_watch(&state, cfg.password.is_some()), if cfg.passive => continue,
                c = control.recv() => match c { Some(Control::Refresh) => continue, _ => return },
                r = async {
                    let before = super::md5::Counters::read();
                    let r = tokio::time::timeout(Duration::from_secs(5), connect(target, cfg.local_address, cfg.password.as_ref())).await;
                    (r, before)
                }, if !cfg.passive => {
                    match r {
                        (Ok(Ok(s)), _) => (s, true),
                        (Ok(Err(e)), _) => { retry(&state, &mut backoff, format!("connect to {target}: {e}")).await; continue; }
                        (Err(_), before) => {
                            // The kernel drops segments whose signature does not match
                            // without a word: its counters tell this from an absent peer.
                            let md5 = super::md5::Counters::read().explain_since(&before);
                            let why = match md5 {
                                Some(m) => format!("connect to {target}: timed out: {m}"),
                                None => format!("connect to {target}: timed out"),
                            };
                            retry(&state, &mut backoff, why).await;
                            continue;
                        }
                    }
                }
            },
        };
        let mut s = Session {
            cfg: &cfg,
            stream,
            initiated,
            forwarding: !first || cfg.graceful_restart.is_some_and(|g| g.forwarding),
            four_octet: false,
            max_len: MAX_LEN,
            peer_id: Ipv4Addr::UNSPECIFIED,
            gr: false,
            established: false,
            rbuf: Vec::new(),
            rpos: 0,
        };
        first = false;
        let result = s
            .run(
                &events,
                &mut incoming,
                adverts.clone(),
                &mut control,
                &state,
            )
            .await;
        let established = s.established;
        let ended = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let switch_to = ended.switch_to;
        if !established {
            if let Some(other) = switch_to {
                // Collision resolution: not a session that went down, a connection
                // replaced before it came up.
                info!("bgp {} ({}): {}", cfg.name, cfg.peer, ended.reason);
                next = Some(other);
                continue;
            }
        }
        let reason = ended.reason;
        warn!("bgp {} ({}): session down: {reason}", cfg.name, cfg.peer);
        state.lock().unwrap().last_error = Some(reason.clone());
        if established {
            backoff = Duration::from_secs(1);
        }
        if events
            .send((
                cfg.id,
                Event::Down {
                    peer: cfg.peer,
                    reason,
                    graceful: ended.graceful,
                },
            ))
            .await
            .is_err()
        {
            return;
        }
        if let Some(other) = switch_to {
            next = Some(other);
            continue;
        }
        retry(&state, &mut backoff, String::new()).await;
    }
}

/// What the peer currently announces, for `max_prefixes` and `warn_prefixes` (kept only
/// when one is set).
#[derive(Default)]
struct PrefixLimits {
    received: std::collections::HashSet<IpNet>,
    /// Above the warning threshold already (warn once per crossing).
    warned: bool,
}

impl PrefixLimits {
    /// Counts `u` in; the NOTIFICATION to send when the peer went over `max_prefixes`.
    fn count(&mut self, cfg: &SessionConfig, family: (u16, u8), u: &Update) -> Option<BgpError> {
        if cfg.max_prefixes.is_none() && cfg.warn_prefixes.is_none() {
            return None;
        }
        for n in u
            .withdrawn
            .iter()
            .chain(u.mp_unreach.iter().flat_map(|m| m.withdrawn.iter()))
        {
            self.received.remove(n);
        }
        self.received.extend(
            u.nlri
                .iter()
                .chain(u.mp_reach.iter().flat_map(|m| m.nlri.iter())),
        );
        let n = self.received.len();
        let over_warn = cfg.warn_prefixes.is_some_and(|w| n > w);
        if over_warn && !self.warned {
            warn!(
                "bgp {} ({}): {n} prefixes received, above the warning threshold {}",
                cfg.name,
                cfg.peer,
                cfg.warn_prefixes.unwrap_or(0)
            );
        }
        self.warned = over_warn;
        let max = cfg.max_prefixes.filter(|m| n > *m)?;
        // RFC 4486 §4: AFI, SAFI and the upper bound in the Data field.
        let mut data = family.0.to_be_bytes().to_vec();
        data.push(family.1);
        data.extend_from_slice(&(max as u32).to_be_bytes());
        Some(
            err(
                ERR_CEASE,
                CEASE_MAX_PREFIXES,
                format!("maximum number of prefixes reached ({n} > {max})"),
            )
            .with_data(&data),
        )
    }
}

/// For a passive session: returns once the netns's TCP-MD5 drop counters grow, with the
/// session's error saying so (the counters do not say which peer).
async fn md5_watch(state: &SharedState, signed: bool) {
    let before = super::md5::Counters::read();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = super::md5::Counters::read();
        if let Some(m) = now.explain_since(&before) {
            let whose = if signed {
                "this or another signed session"
            } else {
                "some session"
            };
            state.lock().unwrap().last_error = Some(format!("{m} ({whose})"));
            return;
        }
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
    /// We opened this connection (collision resolution keeps the one the side with the
    /// higher BGP identifier opened).
    initiated: bool,
    /// The F bit we announce.
    forwarding: bool,
    four_octet: bool,
    max_len: usize,
    peer_id: Ipv4Addr,
    /// Both sides announced graceful restart.
    gr: bool,
    established: bool,
    /// Bytes read and not yet taken as messages, from `rpos` on.
    rbuf: Vec<u8>,
    rpos: usize,
}

impl Session<'_> {
    async fn send(&mut self, msg: &[u8]) -> Result<(), Ended> {
        if let Err(e) = self.stream.write_all(msg).await {
            return Err(self.lost(format!("write: {e}")));
        }
        Ok(())
    }

    async fn notify(&mut self, e: &BgpError) -> Ended {
        let _ = self
            .send(&encode_notification(e.code, e.subcode, &e.data))
            .await;
        format!("sent NOTIFICATION: {e}").into()
    }

    /// An I/O failure: the connection is gone without a NOTIFICATION, which is how a
    /// peer's graceful restart looks.
    fn lost(&self, what: String) -> Ended {
        Ended {
            reason: what,
            graceful: self.gr && self.established,
            switch_to: None,
        }
    }

    /// The next message. Cancel-safe, as it must be inside `select!` beside timers: what
    /// was read stays in `rbuf` until a whole message is there.
    async fn read(&mut self) -> Result<Message, Ended> {
        loop {
            let avail = &self.rbuf[self.rpos..];
            if avail.len() >= HEADER_LEN {
                let len = match frame_len(avail, self.max_len) {
                    Ok(l) => l,
                    Err(e) => return Err(self.notify(&e).await),
                };
                if avail.len() >= len {
                    let decoded = decode(&avail[..len], self.four_octet, self.max_len);
                    self.rpos += len;
                    return match decoded {
                        Ok(Message::Notification { code, subcode, .. }) => {
                            Err(format!("received NOTIFICATION {code}/{subcode}").into())
                        }
                        Ok(m) => Ok(m),
                        Err(e) => Err(self.notify(&e).await),
                    };
                }
            }
            // Only the start of the next message is left: move it to the front.
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
            self.rbuf.reserve(64 * 1024);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(self.lost("read: early eof".into())),
                Ok(_) => {}
                Err(e) => return Err(self.lost(format!("read: {e}"))),
            }
        }
    }

    /// `read`, or the hold timer's expiry (zero: no hold timer).
    async fn read_within(&mut self, hold: Duration) -> Result<Message, Ended> {
        if hold.is_zero() {
            return self.read().await;
        }
        match tokio::time::timeout(hold, self.read()).await {
            Ok(r) => r,
            Err(_) => Err(self.hold_expired().await),
        }
    }

    async fn hold_expired(&mut self) -> Ended {
        self.notify(&err(ERR_HOLD_TIMER, 0, "hold timer expired"))
            .await
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
        mut adverts: watch::Receiver<Option<Arc<Vec<Advert>>>>,
        control: &mut mpsc::UnboundedReceiver<Control>,
        state: &SharedState,
    ) -> Result<(), Ended> {
        let _ = self.stream.set_nodelay(true);
        let family = self.family();
        let open = Open {
            asn: self.cfg.local_asn,
            hold_time: self.cfg.hold_time,
            router_id: self.cfg.router_id,
            families: vec![family],
            four_octet: true,
            route_refresh: true,
            extended_message: true,
            graceful_restart: self.cfg.graceful_restart.map(|g| GracefulRestart {
                restarting: self.cfg.restarting.load(Ordering::Relaxed),
                restart_time: g.restart_time,
                families: vec![(family.0, family.1, self.forwarding)],
            }),
        };
        self.send(&encode_open(&open)).await?;
        set(state, "OpenSent");
        // RFC 4271 suggests a large hold time until the OPEN arrives.
        let peer_open = match self.read_within(Duration::from_secs(240)).await? {
            Message::Open(o) => o,
            other => {
                return Err(self
                    .notify(&err(ERR_FSM, 1, format!("expected OPEN, got {other:?}")))
                    .await)
            }
        };
        if peer_open.asn != self.cfg.remote_asn {
            let e = err(
                ERR_OPEN,
                2,
                format!(
                    "peer AS {} (configured {})",
                    peer_open.asn, self.cfg.remote_asn
                ),
            );
            return Err(self.notify(&e).await);
        }
        if peer_open.router_id == self.cfg.router_id && self.cfg.remote_asn == self.cfg.local_asn {
            return Err(self.notify(&err(ERR_OPEN, 3, "same BGP identifier")).await);
        }
        if !peer_open.families.contains(&family) {
            warn!(
                "bgp {}: peer does not announce {:?}; routes may not flow",
                self.cfg.name, family
            );
        }
        self.four_octet = peer_open.four_octet;
        // RFC 8654: larger messages once both sides announced them.
        if peer_open.extended_message {
            self.max_len = MAX_LEN_EXTENDED;
        }
        self.peer_id = peer_open.router_id;
        let peer_gr = peer_open
            .graceful_restart
            .clone()
            .filter(|_| self.cfg.graceful_restart.is_some());
        self.gr = peer_gr.is_some();
        let hold = Duration::from_secs(self.cfg.hold_time.min(peer_open.hold_time) as u64);
        self.send(&encode_keepalive()).await?;
        set(state, "OpenConfirm");
        // The hold timer runs from the last message, whatever else happens meanwhile.
        let confirm_by = tokio::time::Instant::now() + hold.max(Duration::from_secs(3));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(confirm_by) => return Err(self.hold_expired().await),
                m = self.read() => {
                    match m? {
                        Message::Keepalive => break,
                        other => return Err(self.notify(&err(ERR_FSM, 2, format!("expected KEEPALIVE, got {other:?}"))).await),
                    }
                }
                Some(other) = incoming.recv() => {
                    if let Some(e) = self.collision(other).await {
                        return Err(e);
                    }
                }
                c = control.recv() => if c != Some(Control::Refresh) {
                    return self.shutdown(c).await;
                }
            }
        }
        set(state, "Established");
        self.established = true;
        info!(
            "bgp {} ({}): established, AS {}, id {}, hold {}s{}",
            self.cfg.name,
            self.cfg.peer,
            peer_open.asn,
            peer_open.router_id,
            hold.as_secs(),
            match &peer_gr {
                Some(g) => format!(
                    ", graceful restart (peer restart time {}s{})",
                    g.restart_time,
                    if g.restarting {
                        ", peer restarting"
                    } else {
                        ""
                    }
                ),
                None => String::new(),
            }
        );
        let ebgp = self.cfg.remote_asn != self.cfg.local_asn;
        events
            .send((
                self.cfg.id,
                Event::Established {
                    peer: self.cfg.peer,
                    peer_id: self.peer_id,
                    graceful_restart: peer_gr,
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
        let mut families: Vec<(u16, u8)> = peer_open.families.clone();
        families.retain(|f| *f == family);
        let mut own = self.cfg.local_addrs.to_vec();
        own.push(local);
        let screen = super::inbound::Screen {
            ebgp,
            peer_asn: self.cfg.remote_asn,
            enforce_first_as: self.cfg.enforce_first_as,
            families,
            local: own,
            router_id: self.cfg.router_id,
        };
        let mut sent: HashMap<IpNet, Attrs> = HashMap::new();
        let mut limits = PrefixLimits::default();
        // Our first full table ends with End-of-RIB. While the agent is restarting there
        // is no table yet (None): it comes once the agent has selected its routes.
        let mut initial_sent = false;
        let current = adverts.borrow_and_update().clone();
        if let Some(current) = current {
            self.advertise(&current, &mut sent, local, ebgp).await?;
            self.end_of_rib().await?;
            initial_sent = true;
        }
        state.lock().unwrap().sent = sent.len();
        let keepalive = if hold.is_zero() {
            Duration::from_secs(3600)
        } else {
            hold / 3
        };
        let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let mut hold_until = tokio::time::Instant::now() + hold;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(hold_until), if !hold.is_zero() => {
                    return Err(self.hold_expired().await);
                }
                m = self.read() => {
                    hold_until = tokio::time::Instant::now() + hold;
                    match m? {
                    Message::Update(mut u) => {
                        if let Some(why) = &u.treat_as_withdraw {
                            warn!("bgp {} ({}): malformed UPDATE treated as withdraw (RFC 7606): {why}", self.cfg.name, self.cfg.peer);
                            state.lock().unwrap().treated_as_withdraw += 1;
                        }
                        let sc = screen.apply(&mut u);
                        self.log_screened(&sc, state);
                        if u.end_of_rib.is_some() {
                            info!("bgp {} ({}): End-of-RIB received", self.cfg.name, self.cfg.peer);
                            events.send((self.cfg.id, Event::EndOfRib { peer: self.cfg.peer })).await.map_err(|_| "agent gone")?;
                        } else if !u.is_empty() {
                            if let Some(e) = limits.count(self.cfg, self.family(), &u) {
                                return Err(self.notify(&e).await);
                            }
                            events.send((self.cfg.id, Event::Update { peer: self.cfg.peer, peer_id: self.peer_id, ebgp, update: Box::new(u) })).await.map_err(|_| "agent gone")?;
                        }
                    }
                    Message::Keepalive => {}
                    Message::RouteRefresh { .. } => {
                        let all = adverts.borrow().clone();
                        if let Some(all) = all {
                            sent.clear();
                            self.advertise(&all, &mut sent, local, ebgp).await?;
                        }
                    }
                    Message::Open(_) => return Err(self.notify(&err(ERR_FSM, 3, "OPEN while established")).await),
                    Message::Notification { .. } => unreachable!("read() returns NOTIFICATIONs as errors"),
                }},
                _ = ka.tick() => self.send(&encode_keepalive()).await?,
                changed = adverts.changed() => {
                    if changed.is_err() {
                        return self.shutdown(None).await;
                    }
                    let all = adverts.borrow_and_update().clone();
                    if let Some(all) = all {
                        self.advertise(&all, &mut sent, local, ebgp).await?;
                        if !initial_sent {
                            self.end_of_rib().await?;
                            initial_sent = true;
                        }
                        state.lock().unwrap().sent = sent.len();
                    }
                }
                c = control.recv() => match c {
                    Some(Control::Refresh) if peer_open.route_refresh => {
                        info!("bgp {} ({}): import policy changed: ROUTE-REFRESH sent", self.cfg.name, self.cfg.peer);
                        self.send(&encode_route_refresh(family.0, family.1)).await?;
                    }
                    Some(Control::Refresh) => {
                        // Without route refresh the only way to see the routes again.
                        return Err(self.notify(&err(ERR_CEASE, 6, "import policy changed and the peer has no route refresh: session reset")).await);
                    }
                    c => return self.shutdown(c).await,
                },
                Some(other) = incoming.recv() => {
                    if self.gr {
                        // RFC 4724 §4.2: a new connection from a graceful-restart peer while
                        // established means it restarted: the old session is gone.
                        return Err(Ended {
                            reason: "peer reconnected (graceful restart)".into(),
                            graceful: true,
                            switch_to: Some(other),
                        });
                    }
                    // §6.8: a connection collision with an established session: the new
                    // connection is closed.
                    let mut other = other;
                    let _ = other.write_all(&encode_notification(ERR_CEASE, 7, &[])).await;
                }
            }
        }
    }

    /// Logs and counts what the inbound rules took out of an UPDATE.
    fn log_screened(&self, sc: &super::inbound::Screened, state: &SharedState) {
        let (name, peer) = (&self.cfg.name, self.cfg.peer);
        if sc.not_negotiated > 0 || sc.foreign_end_of_rib {
            log::debug!(
                "bgp {name} ({peer}): {} prefixes of families not negotiated ignored{}",
                sc.not_negotiated,
                if sc.foreign_end_of_rib {
                    " (and their End-of-RIB)"
                } else {
                    ""
                }
            );
        }
        if sc.local_pref_discarded {
            log::debug!("bgp {name} ({peer}): LOCAL_PREF from an external peer discarded");
        }
        if let Some(why) = &sc.withdrawn {
            warn!("bgp {name} ({peer}): routes ignored: {why}");
        }
        if sc.own_reflected {
            log::debug!("bgp {name} ({peer}): our own routes reflected back: ignored");
        }
        let mut st = state.lock().unwrap();
        st.not_negotiated += sc.not_negotiated as u64;
        st.treated_as_withdraw += sc.withdrawn.is_some() as u64;
    }

    /// Cease (Administrative Shutdown unless the agent said otherwise): the peer drops
    /// our routes now.
    async fn shutdown(&mut self, why: Option<Control>) -> Result<(), Ended> {
        let subcode = match why {
            Some(Control::Shutdown(s)) => s,
            _ => CEASE_ADMIN_SHUTDOWN,
        };
        let _ = self
            .send(&encode_notification(ERR_CEASE, subcode, &[]))
            .await;
        info!(
            "bgp {} ({}): shut down (Cease {subcode})",
            self.cfg.name, self.cfg.peer
        );
        // Close our side and give the peer a moment to read the NOTIFICATION and close
        // its own: a replacement session that connects before that would look to a
        // graceful-restart peer like our restart, and the NOTIFICATION would go unread.
        let _ = self.stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        Ok(())
    }

    async fn end_of_rib(&mut self) -> Result<(), Ended> {
        if self.gr {
            let (afi, safi) = self.family();
            self.send(&encode_end_of_rib(afi, safi)).await?;
        }
        Ok(())
    }

    /// Connection collision in OpenConfirm (RFC 4271 §6.8): the connection opened by the
    /// side with the higher BGP identifier survives; the other gets Cease 7. Returns the
    /// end of this connection when the peer's one wins.
    async fn collision(&mut self, mut other: TcpStream) -> Option<Ended> {
        let peer_wins = u32::from(self.cfg.router_id) < u32::from(self.peer_id);
        if self.initiated && peer_wins {
            let _ = self.send(&encode_notification(ERR_CEASE, 7, &[])).await;
            return Some(Ended {
                reason: format!(
                    "connection collision: peer id {} is higher, its connection is kept",
                    self.peer_id
                ),
                graceful: false,
                switch_to: Some(other),
            });
        }
        let _ = other
            .write_all(&encode_notification(ERR_CEASE, 7, &[]))
            .await;
        None
    }

    /// Sends what changed between `sent` and `want`: withdrawals, then announcements with
    /// next-hop-self (and our AS prepended for eBGP).
    async fn advertise(
        &mut self,
        want: &[Advert],
        sent: &mut HashMap<IpNet, Attrs>,
        local: IpAddr,
        ebgp: bool,
    ) -> Result<(), Ended> {
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

#[cfg(test)]
mod tests {
    //! Collision resolution needs two simultaneous connections, which a real peer makes
    //! only by chance: here a scripted peer on loopback plays both.
    use super::*;
    use tokio::net::TcpListener;

    async fn read_msg(s: &mut TcpStream) -> Message {
        let mut hdr = [0u8; HEADER_LEN];
        s.read_exact(&mut hdr).await.unwrap();
        let len = frame_len(&hdr, MAX_LEN).unwrap();
        let mut buf = hdr.to_vec();
        buf.resize(len, 0);
        s.read_exact(&mut buf[HEADER_LEN..]).await.unwrap();
        decode(&buf, true, MAX_LEN).unwrap()
    }

    fn open(id: &str) -> Vec<u8> {
        open_with_hold(id, 90)
    }

    fn open_with_hold(id: &str, hold_time: u16) -> Vec<u8> {
        encode_open(&Open {
            asn: 65010,
            hold_time,
            router_id: id.parse().unwrap(),
            families: vec![(AFI_IPV4, SAFI_UNICAST)],
            four_octet: true,
            route_refresh: true,
            extended_message: false,
            graceful_restart: None,
        })
    }

    /// A session to a scripted peer on loopback `port`.
    fn test_config(port: u16, hold_time: u16) -> SessionConfig {
        SessionConfig {
            id: 1,
            name: "t".into(),
            segment: 1,
            local_asn: 65000,
            router_id: "10.0.0.5".parse().unwrap(),
            peer: "127.0.0.1".parse().unwrap(),
            port,
            remote_asn: 65010,
            hold_time,
            passive: false,
            max_prefixes: None,
            warn_prefixes: None,
            enforce_first_as: true,
            local_addrs: Default::default(),
            password: None,
            local_address: None,
            graceful_restart: None,
            restarting: Default::default(),
        }
    }

    /// A session to a scripted peer on loopback, brought to OpenConfirm: it connected,
    /// the peer (BGP identifier `peer_id`, hold time `hold`) answered its OPEN, and it
    /// sent its KEEPALIVE.
    struct Scripted {
        listener: TcpListener,
        port: u16,
        /// The peer's end of the session's connection.
        peer: TcpStream,
        /// Hands the session further connections, as its listener would.
        incoming: mpsc::Sender<TcpStream>,
        events: mpsc::Receiver<(u64, Event)>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn open_confirm(peer_id: &str, hold: u16) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = test_config(port, hold);
        let (ev_tx, events) = mpsc::channel(16);
        let (incoming, in_rx) = mpsc::channel(4);
        let (_adv_tx, adv_rx) = watch::channel(Some(Arc::new(Vec::new())));
        let (_ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _keep = (_adv_tx, _ctl_tx);
            run(cfg, ev_tx, in_rx, adv_rx, ctl_rx, Default::default()).await
        });
        let (mut peer, _) = listener.accept().await.unwrap();
        assert!(matches!(read_msg(&mut peer).await, Message::Open(_)));
        peer.write_all(&open_with_hold(peer_id, hold))
            .await
            .unwrap();
        assert_eq!(read_msg(&mut peer).await, Message::Keepalive);
        Scripted {
            listener,
            port,
            peer,
            incoming,
            events,
            task,
        }
    }

    /// A session established with a scripted peer (hold time 3 s: keepalives every
    /// second). Returns the peer's end, the events, the session.
    async fn established() -> (
        TcpStream,
        mpsc::Receiver<(u64, Event)>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut s = open_confirm("10.0.0.9", 3).await;
        // Kept open for the session's whole life (no further connections come).
        std::mem::forget(s.incoming);
        s.peer.write_all(&encode_keepalive()).await.unwrap();
        let (_, ev) = s.events.recv().await.unwrap();
        assert!(matches!(ev, Event::Established { .. }), "{ev:?}");
        (s.peer, s.events, s.task)
    }

    /// Our keepalives go out every second; a peer that sends nothing is dropped after
    /// the hold time all the same (sending must not restart the hold timer).
    #[tokio::test]
    async fn a_silent_peer_is_dropped_at_the_hold_time() {
        let (mut peer, mut events, task) = established().await;
        let t = Instant::now();
        let mut keepalives = 0;
        let until_notification = async {
            loop {
                match read_msg(&mut peer).await {
                    Message::Keepalive => keepalives += 1,
                    Message::Notification { code, .. } => return code,
                    other => panic!("{other:?}"),
                }
            }
        };
        let code = tokio::time::timeout(Duration::from_secs(10), until_notification)
            .await
            .expect("no NOTIFICATION in 10 s: the hold timer never expired");
        assert_eq!(code, ERR_HOLD_TIMER);
        let waited = t.elapsed();
        assert!(keepalives >= 2, "keepalives sent meanwhile: {keepalives}");
        assert!(
            waited >= Duration::from_millis(2900) && waited < Duration::from_secs(5),
            "dropped after {waited:?}"
        );
        let (_, ev) = events.recv().await.unwrap();
        assert!(matches!(ev, Event::Down { .. }), "{ev:?}");
        task.abort();
    }

    /// A message that arrives in two parts with a keepalive sent in between is read
    /// whole (reading is cancel-safe: the keepalive timer does not lose the first part).
    #[tokio::test]
    async fn a_message_split_across_a_keepalive_is_read_whole() {
        let (mut peer, mut events, task) = established().await;
        let net: IpNet = "10.9.0.0/16".parse().unwrap();
        let update = encode_update(&[net], None, &[], None, true);
        peer.write_all(&update[..HEADER_LEN + 2]).await.unwrap();
        assert_eq!(read_msg(&mut peer).await, Message::Keepalive);
        peer.write_all(&update[HEADER_LEN + 2..]).await.unwrap();
        let (_, ev) = events.recv().await.unwrap();
        match ev {
            Event::Update { update, .. } => assert_eq!(update.withdrawn, vec![net]),
            other => panic!("{other:?}"),
        }
        task.abort();
    }

    /// Withdrawals count down; going over `max_prefixes` gives Cease 1 with AFI, SAFI and
    /// the limit as data (RFC 4486 §4).
    #[test]
    fn the_prefix_limit_counts_what_the_peer_announces_now() {
        let cfg = SessionConfig {
            max_prefixes: Some(2),
            ..test_config(179, 90)
        };
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let announce = |nets: &[&str]| Update {
            nlri: nets.iter().map(|x| n(x)).collect(),
            ..Default::default()
        };
        let mut l = PrefixLimits::default();
        let fam = (AFI_IPV4, SAFI_UNICAST);
        assert!(l
            .count(&cfg, fam, &announce(&["10.1.0.0/16", "10.2.0.0/16"]))
            .is_none());
        let withdraw = Update {
            withdrawn: vec![n("10.1.0.0/16")],
            ..Default::default()
        };
        assert!(l.count(&cfg, fam, &withdraw).is_none());
        assert!(l.count(&cfg, fam, &announce(&["10.3.0.0/16"])).is_none());
        let e = l.count(&cfg, fam, &announce(&["10.4.0.0/16"])).unwrap();
        assert_eq!((e.code, e.subcode), (ERR_CEASE, CEASE_MAX_PREFIXES));
        assert_eq!(e.data, [0, 1, 1, 0, 0, 0, 2]);
    }

    /// RFC 4271 §6.1: a message of unknown type is answered with 1/3 and the Type field
    /// as data; the peer's side reads exactly those bytes.
    #[tokio::test]
    async fn a_bad_message_type_gets_its_type_back_in_the_notification() {
        let (mut peer, mut events, task) = established().await;
        let mut bad = encode_keepalive();
        bad[18] = 9;
        peer.write_all(&bad).await.unwrap();
        loop {
            match read_msg(&mut peer).await {
                Message::Keepalive => continue,
                m => {
                    assert_eq!(
                        m,
                        Message::Notification {
                            code: ERR_HEADER,
                            subcode: 3,
                            data: vec![9]
                        }
                    );
                    break;
                }
            }
        }
        let (_, ev) = events.recv().await.unwrap();
        assert!(matches!(ev, Event::Down { .. }), "{ev:?}");
        task.abort();
    }

    /// Our session connects to the peer and reaches OpenConfirm; then the peer's own
    /// connection arrives. Returns (our connection, the peer's, events).
    async fn collide(
        peer_id: &str,
    ) -> (
        TcpStream,
        TcpStream,
        mpsc::Receiver<(u64, Event)>,
        tokio::task::JoinHandle<()>,
    ) {
        let Scripted {
            listener,
            port,
            peer: ours,
            incoming: in_tx,
            events: ev_rx,
            task,
        } = open_confirm(peer_id, 90).await;
        // OpenConfirm now. The peer's connection: one end is handed to the session as
        // the listener would, the other is the peer's.
        let (theirs, session_end) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), async {
            listener.accept().await.unwrap().0
        });
        in_tx.send(session_end).await.unwrap();
        std::mem::forget(in_tx);
        (ours, theirs.unwrap(), ev_rx, task)
    }

    #[tokio::test]
    async fn collision_higher_peer_id_keeps_the_peers_connection() {
        let (mut ours, mut theirs, mut events, task) = collide("10.0.0.9").await;
        assert_eq!(
            read_msg(&mut ours).await,
            Message::Notification {
                code: ERR_CEASE,
                subcode: 7,
                data: vec![]
            }
        );
        // The session goes on over the peer's connection.
        assert!(matches!(read_msg(&mut theirs).await, Message::Open(_)));
        theirs.write_all(&open("10.0.0.9")).await.unwrap();
        assert_eq!(read_msg(&mut theirs).await, Message::Keepalive);
        theirs.write_all(&encode_keepalive()).await.unwrap();
        let (_, ev) = events.recv().await.unwrap();
        assert!(matches!(ev, Event::Established { .. }), "{ev:?}");
        task.abort();
    }

    #[tokio::test]
    async fn collision_lower_peer_id_keeps_our_connection() {
        let (mut ours, mut theirs, mut events, task) = collide("10.0.0.1").await;
        assert_eq!(
            read_msg(&mut theirs).await,
            Message::Notification {
                code: ERR_CEASE,
                subcode: 7,
                data: vec![]
            }
        );
        ours.write_all(&encode_keepalive()).await.unwrap();
        let (_, ev) = events.recv().await.unwrap();
        assert!(matches!(ev, Event::Established { .. }), "{ev:?}");
        task.abort();
    }
}
