//! One BGP session as a sans-IO state machine (RFC 4271 §8): Idle → Connect/Active →
//! OpenSent → OpenConfirm → Established, with connect-retry back-off, hold and keepalive
//! timers, connection-collision resolution (§6.8), graceful restart (RFC 4724) and
//! NOTIFICATIONs with the right codes. [`Session::step`] takes an [`Input`] and the time
//! and returns [`Output`]s; [`Session::deadline`] says when it next needs the time. The
//! tokio task in `driver` owns the socket and the timers; the tests here drive the
//! machine by hand, without either.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use log::{info, warn};

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
    /// Close with a NOTIFICATION Cease of this subcode and connect again after the usual
    /// back-off: the path to the peer failed (BFD, RFC 5882 §4.3), the routes go at once.
    Reset(u8),
    /// Ask the peer to send its routes again (ROUTE-REFRESH, RFC 2918): the import policy
    /// changed. A peer without the capability gets its session reset instead.
    Refresh,
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
    /// Times the session left Established.
    pub flaps: u64,
}

/// What happens to the session.
#[derive(Debug)]
pub enum Input<'a> {
    /// The connection is up: we opened it, or the peer did (`initiated` false). `local`:
    /// our address on it.
    Connected {
        initiated: bool,
        local: IpAddr,
    },
    /// Our connection attempt failed.
    ConnectFailed(String),
    /// Bytes from the peer.
    Received(&'a [u8]),
    /// The connection broke (read or write failed, or the peer closed it).
    Closed(String),
    /// The peer opened a second connection while we have one.
    Incoming,
    /// What the agent wants advertised now (None: not yet, the agent is restarting).
    Adverts(Option<Arc<Vec<Advert>>>),
    Control(Control),
    /// Connections dropped for a bad TCP-MD5 signature (passive sessions watch for them).
    Md5Drops(String),
    /// The time passed `deadline()`.
    Timer,
}

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Output {
    Send(Vec<u8>),
    Event(Event),
    /// Open a connection to the peer.
    Connect,
    /// Close the connection; with `drain`, after giving the peer a moment to read our
    /// NOTIFICATION and close its side (a graceful-restart peer that saw a new connection
    /// first would take it for our restart).
    Close {
        drain: bool,
    },
    /// Close the peer's second connection with Cease 7 (collision: ours stays).
    RejectIncoming,
    /// Close the current connection and go on with the peer's second one.
    SwitchToIncoming,
    /// The session is over (the agent shut it down).
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting out the connect-retry back-off.
    Idle {
        retry_at: Instant,
    },
    /// Connecting (or, passive, waiting for the peer).
    Connect,
    OpenSent {
        open_by: Instant,
    },
    OpenConfirm {
        confirm_by: Instant,
    },
    Established {
        hold_until: Instant,
        keepalive_at: Instant,
    },
    Stopped,
}

/// What lives and dies with one connection.
struct Conn {
    /// We opened it (collision resolution keeps the one the side with the higher BGP
    /// identifier opened).
    initiated: bool,
    local: IpAddr,
    four_octet: bool,
    max_len: usize,
    peer_id: Ipv4Addr,
    peer_asn: u32,
    route_refresh: bool,
    /// Both sides announced graceful restart.
    gr: bool,
    peer_gr: Option<GracefulRestart>,
    hold: Duration,
    keepalive: Duration,
    ebgp: bool,
    screen: Option<super::inbound::Screen>,
    sent: HashMap<IpNet, Attrs>,
    limits: PrefixLimits,
    /// Our first full table went out (it ends with End-of-RIB).
    initial_sent: bool,
    /// The peer opened a second connection before we knew its identifier (OpenSent):
    /// resolved once its OPEN is in.
    incoming_pending: bool,
    /// Bytes read and not yet taken as messages.
    rbuf: Vec<u8>,
}

/// Why a connection ended.
struct Ended {
    reason: String,
    graceful: bool,
    /// Collision resolution kept the peer's connection: go on with it.
    switch: bool,
}

impl From<String> for Ended {
    fn from(reason: String) -> Self {
        Ended {
            reason,
            graceful: false,
            switch: false,
        }
    }
}

pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    conn: Option<Conn>,
    backoff: Duration,
    /// No connection has been up yet (the F bit of the first one is the config's).
    first: bool,
    adverts: Option<Arc<Vec<Advert>>>,
    status: State,
}

/// The suggested hold time until the OPEN arrives (RFC 4271 §8.2.2: "large").
const OPEN_HOLD: Duration = Duration::from_secs(240);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Session {
    /// A session in Connect (Active when passive); with `Output::Connect` to begin.
    pub fn new(cfg: SessionConfig, now: Instant) -> (Session, Vec<Output>) {
        let mut s = Session {
            cfg,
            phase: Phase::Connect,
            conn: None,
            backoff: BACKOFF_FIRST,
            first: true,
            adverts: None,
            status: State::default(),
        };
        let mut out = Vec::new();
        s.connect(now, &mut out);
        (s, out)
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// What `xnet bgp` shows.
    pub fn status(&self) -> &State {
        &self.status
    }

    /// Whether a connection is up (or being set up past Connect).
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// When the machine next needs `Input::Timer`.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle { retry_at } => Some(retry_at),
            Phase::Connect | Phase::Stopped => None,
            Phase::OpenSent { open_by } => Some(open_by),
            Phase::OpenConfirm { confirm_by } => Some(confirm_by),
            Phase::Established {
                hold_until,
                keepalive_at,
            } => Some(if self.conn.as_ref().is_some_and(|c| c.hold.is_zero()) {
                keepalive_at
            } else {
                hold_until.min(keepalive_at)
            }),
        }
    }

    /// The one step: what `input` at `now` does.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.phase == Phase::Stopped {
            return out;
        }
        match input {
            Input::Connected { initiated, local } => {
                self.connected_(initiated, local, now, &mut out)
            }
            Input::ConnectFailed(why) => self.retry(now, why),
            Input::Received(bytes) => self.received(bytes, now, &mut out),
            Input::Closed(why) => {
                let e = self.lost(why);
                self.end(e, now, &mut out);
            }
            Input::Incoming => self.incoming(now, &mut out),
            Input::Adverts(a) => self.adverts(a, &mut out),
            Input::Control(c) => self.control(c, now, &mut out),
            Input::Md5Drops(why) => self.status.last_error = Some(why),
            Input::Timer => self.timer(now, &mut out),
        }
        out
    }

    fn set(&mut self, s: &'static str, now: Instant) {
        if self.status.state != s {
            if self.status.state == "Established" {
                self.status.flaps += 1;
            }
            self.status.state = s;
            self.status.since = Some(now);
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

    /// Connect (or, passive, wait).
    fn connect(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.phase = Phase::Connect;
        self.set(
            if self.cfg.passive {
                "Active"
            } else {
                "Connect"
            },
            now,
        );
        if !self.cfg.passive {
            out.push(Output::Connect);
        }
    }

    /// Idle for the back-off, which doubles up to 30 s.
    fn retry(&mut self, now: Instant, why: String) {
        self.set("Idle", now);
        if !why.is_empty() {
            self.status.last_error = Some(why);
        }
        self.phase = Phase::Idle {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn connected_(&mut self, initiated: bool, local: IpAddr, now: Instant, out: &mut Vec<Output>) {
        let forwarding = !self.first || self.cfg.graceful_restart.is_some_and(|g| g.forwarding);
        self.first = false;
        self.conn = Some(Conn {
            initiated,
            local,
            four_octet: false,
            max_len: MAX_LEN,
            peer_id: Ipv4Addr::UNSPECIFIED,
            peer_asn: 0,
            route_refresh: false,
            gr: false,
            peer_gr: None,
            hold: Duration::ZERO,
            keepalive: Duration::ZERO,
            ebgp: self.cfg.remote_asn != self.cfg.local_asn,
            screen: None,
            sent: HashMap::new(),
            limits: PrefixLimits::default(),
            initial_sent: false,
            incoming_pending: false,
            rbuf: Vec::new(),
        });
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
                families: vec![(family.0, family.1, forwarding)],
            }),
        };
        out.push(Output::Send(encode_open(&open)));
        self.set("OpenSent", now);
        self.phase = Phase::OpenSent {
            open_by: now + OPEN_HOLD,
        };
    }

    /// An I/O failure: the connection is gone without a NOTIFICATION, which is how a
    /// peer's graceful restart looks.
    fn lost(&self, what: String) -> Ended {
        Ended {
            reason: what,
            graceful: self.established() && self.conn.as_ref().is_some_and(|c| c.gr),
            switch: false,
        }
    }

    fn established(&self) -> bool {
        matches!(self.phase, Phase::Established { .. })
    }

    /// Sends NOTIFICATION `e`; the connection ends for that reason.
    fn notify(&mut self, e: &BgpError, out: &mut Vec<Output>) -> Ended {
        out.push(Output::Send(encode_notification(
            e.code, e.subcode, &e.data,
        )));
        format!("sent NOTIFICATION: {e}").into()
    }

    /// The connection ended: the agent hears of it (unless it was replaced before it came
    /// up), and the next attempt waits for the back-off.
    fn end(&mut self, e: Ended, now: Instant, out: &mut Vec<Output>) {
        let established = self.established();
        self.conn = None;
        out.push(Output::Close { drain: false });
        if !established && e.switch {
            // Collision resolution: not a session that went down, a connection replaced
            // before it came up.
            info!("bgp {} ({}): {}", self.cfg.name, self.cfg.peer, e.reason);
            self.phase = Phase::Connect;
            out.push(Output::SwitchToIncoming);
            return;
        }
        warn!(
            "bgp {} ({}): session down: {}",
            self.cfg.name, self.cfg.peer, e.reason
        );
        self.status.last_error = Some(e.reason.clone());
        if established {
            self.backoff = BACKOFF_FIRST;
        }
        out.push(Output::Event(Event::Down {
            peer: self.cfg.peer,
            reason: e.reason,
            graceful: e.graceful,
        }));
        if e.switch {
            self.phase = Phase::Connect;
            out.push(Output::SwitchToIncoming);
            return;
        }
        self.retry(now, String::new());
    }

    /// Cease (Administrative Shutdown unless the agent said otherwise): the peer drops
    /// our routes now; the session is over.
    fn shutdown(&mut self, why: Control, out: &mut Vec<Output>) {
        let subcode = match why {
            Control::Shutdown(s) | Control::Reset(s) => s,
            Control::Refresh => CEASE_ADMIN_SHUTDOWN,
        };
        if self.conn.take().is_some() {
            out.push(Output::Send(encode_notification(ERR_CEASE, subcode, &[])));
            out.push(Output::Close { drain: true });
            info!(
                "bgp {} ({}): shut down (Cease {subcode})",
                self.cfg.name, self.cfg.peer
            );
        }
        self.phase = Phase::Stopped;
        out.push(Output::Stop);
    }

    fn control(&mut self, c: Control, now: Instant, out: &mut Vec<Output>) {
        match (c, self.phase) {
            (Control::Refresh, Phase::Established { .. }) => {
                let conn = self.conn.as_ref().expect("established");
                if conn.route_refresh {
                    info!(
                        "bgp {} ({}): import policy changed: ROUTE-REFRESH sent",
                        self.cfg.name, self.cfg.peer
                    );
                    let (afi, safi) = self.family();
                    out.push(Output::Send(encode_route_refresh(afi, safi)));
                } else {
                    // Without route refresh the only way to see the routes again.
                    let e = err(
                        ERR_CEASE,
                        CEASE_OTHER_CONFIG_CHANGE,
                        "import policy changed and the peer has no route refresh: session reset",
                    );
                    let e = self.notify(&e, out);
                    self.end(e, now, out);
                }
            }
            // Not established: the routes come anyway.
            (Control::Refresh, _) => {}
            (Control::Reset(subcode), _) if self.conn.is_some() => {
                let e = err(ERR_CEASE, subcode, "the path to the peer failed (BFD)");
                let e = self.notify(&e, out);
                self.end(e, now, out);
            }
            // No connection: nothing to reset.
            (Control::Reset(_), _) => {}
            (c @ Control::Shutdown(_), _) => self.shutdown(c, out),
        }
    }

    fn adverts(&mut self, a: Option<Arc<Vec<Advert>>>, out: &mut Vec<Output>) {
        self.adverts = a.clone();
        if !self.established() {
            return;
        }
        if let Some(all) = a {
            self.advertise(&all, out);
            self.initial_end_of_rib(out);
        }
    }

    /// Our first full table ends with End-of-RIB (graceful restart only).
    fn initial_end_of_rib(&mut self, out: &mut Vec<Output>) {
        let (afi, safi) = self.family();
        let conn = self.conn.as_mut().expect("established");
        if !conn.initial_sent {
            conn.initial_sent = true;
            if conn.gr {
                out.push(Output::Send(encode_end_of_rib(afi, safi)));
            }
        }
    }

    fn timer(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.phase {
            Phase::Idle { retry_at } if now >= retry_at => self.connect(now, out),
            Phase::OpenSent { open_by: t } | Phase::OpenConfirm { confirm_by: t } if now >= t => {
                self.hold_expired(now, out)
            }
            Phase::Established {
                hold_until,
                keepalive_at,
            } => {
                let hold = self.conn.as_ref().expect("established").hold;
                if !hold.is_zero() && now >= hold_until {
                    return self.hold_expired(now, out);
                }
                if now >= keepalive_at {
                    out.push(Output::Send(encode_keepalive()));
                    let ka = self.conn.as_ref().expect("established").keepalive;
                    // The next one a period later; after a long stall, from now.
                    let mut next = keepalive_at + ka;
                    if next <= now {
                        next = now + ka;
                    }
                    self.phase = Phase::Established {
                        hold_until,
                        keepalive_at: next,
                    };
                }
            }
            _ => {}
        }
    }

    fn hold_expired(&mut self, now: Instant, out: &mut Vec<Output>) {
        let e = self.notify(&err(ERR_HOLD_TIMER, 0, "hold timer expired"), out);
        self.end(e, now, out);
    }

    /// The peer opened a second connection (§6.8).
    fn incoming(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(conn) = self.conn.as_mut() else {
            // Nothing to collide with: the driver takes it as the connection.
            return;
        };
        match self.phase {
            // Its identifier is not known yet: decided once its OPEN is in.
            Phase::OpenSent { .. } => conn.incoming_pending = true,
            Phase::OpenConfirm { .. } => self.collision(now, out),
            Phase::Established { .. } if conn.gr => {
                // RFC 4724 §4.2: a new connection from a graceful-restart peer while
                // established means it restarted: the old session is gone.
                let e = Ended {
                    reason: "peer reconnected (graceful restart)".into(),
                    graceful: true,
                    switch: true,
                };
                self.end(e, now, out);
            }
            // A collision with an established session: the new connection is closed.
            _ => out.push(Output::RejectIncoming),
        }
    }

    /// Connection collision in OpenConfirm (RFC 4271 §6.8): the connection opened by the
    /// side with the higher BGP identifier survives; the other gets Cease 7.
    fn collision(&mut self, now: Instant, out: &mut Vec<Output>) {
        let conn = self.conn.as_ref().expect("connected");
        let peer_wins = u32::from(self.cfg.router_id) < u32::from(conn.peer_id);
        if conn.initiated && peer_wins {
            out.push(Output::Send(encode_notification(ERR_CEASE, 7, &[])));
            let e = Ended {
                reason: format!(
                    "connection collision: peer id {} is higher, its connection is kept",
                    conn.peer_id
                ),
                graceful: false,
                switch: true,
            };
            self.end(e, now, out);
        } else {
            out.push(Output::RejectIncoming);
        }
    }

    fn received(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Output>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.rbuf.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let avail = &conn.rbuf[pos..];
            if avail.len() < HEADER_LEN {
                break;
            }
            let len = match frame_len(avail, conn.max_len) {
                Ok(l) => l,
                Err(e) => {
                    let e = self.notify(&e, out);
                    return self.end(e, now, out);
                }
            };
            if avail.len() < len {
                break;
            }
            let decoded = decode(&avail[..len], conn.four_octet, conn.max_len);
            pos += len;
            let m = match decoded {
                Ok(Message::Notification { code, subcode, .. }) => {
                    let e = format!("received NOTIFICATION {code}/{subcode}").into();
                    return self.end(e, now, out);
                }
                Ok(m) => m,
                Err(e) => {
                    let e = self.notify(&e, out);
                    return self.end(e, now, out);
                }
            };
            if let Err(e) = self.message(m, now, out) {
                return self.end(e, now, out);
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.rbuf.drain(..pos);
        }
    }

    /// One message from the peer, in the current phase.
    fn message(&mut self, m: Message, now: Instant, out: &mut Vec<Output>) -> Result<(), Ended> {
        match self.phase {
            Phase::OpenSent { .. } => match m {
                Message::Open(o) => self.open_received(o, now, out),
                other => Err(self.notify(
                    &err(ERR_FSM, 1, format!("expected OPEN, got {other:?}")),
                    out,
                )),
            },
            Phase::OpenConfirm { .. } => match m {
                Message::Keepalive => {
                    self.establish(now, out);
                    Ok(())
                }
                other => Err(self.notify(
                    &err(ERR_FSM, 2, format!("expected KEEPALIVE, got {other:?}")),
                    out,
                )),
            },
            Phase::Established { keepalive_at, .. } => {
                let hold = self.conn.as_ref().expect("established").hold;
                // The hold timer runs from the last message.
                self.phase = Phase::Established {
                    hold_until: now + hold,
                    keepalive_at,
                };
                self.established_message(m, out)
            }
            Phase::Idle { .. } | Phase::Connect | Phase::Stopped => Ok(()),
        }
    }

    fn open_received(&mut self, o: Open, now: Instant, out: &mut Vec<Output>) -> Result<(), Ended> {
        if o.asn != self.cfg.remote_asn {
            let e = err(
                ERR_OPEN,
                2,
                format!("peer AS {} (configured {})", o.asn, self.cfg.remote_asn),
            );
            return Err(self.notify(&e, out));
        }
        if o.router_id == self.cfg.router_id && self.cfg.remote_asn == self.cfg.local_asn {
            return Err(self.notify(&err(ERR_OPEN, 3, "same BGP identifier"), out));
        }
        let family = self.family();
        if !o.families.contains(&family) {
            warn!(
                "bgp {}: peer does not announce {:?}; routes may not flow",
                self.cfg.name, family
            );
        }
        let gr_local = self.cfg.graceful_restart.is_some();
        let hold = Duration::from_secs(self.cfg.hold_time.min(o.hold_time) as u64);
        let conn = self.conn.as_mut().expect("connected");
        conn.four_octet = o.four_octet;
        // RFC 8654: larger messages once both sides announced them.
        if o.extended_message {
            conn.max_len = MAX_LEN_EXTENDED;
        }
        conn.peer_id = o.router_id;
        conn.peer_asn = o.asn;
        conn.route_refresh = o.route_refresh;
        conn.peer_gr = o.graceful_restart.clone().filter(|_| gr_local);
        conn.gr = conn.peer_gr.is_some();
        conn.hold = hold;
        conn.keepalive = if hold.is_zero() {
            Duration::from_secs(3600)
        } else {
            hold / 3
        };
        let mut families = o.families.clone();
        families.retain(|f| *f == family);
        let mut own = self.cfg.local_addrs.to_vec();
        own.push(conn.local);
        conn.screen = Some(super::inbound::Screen {
            ebgp: conn.ebgp,
            peer_asn: self.cfg.remote_asn,
            enforce_first_as: self.cfg.enforce_first_as,
            families,
            local: own,
            router_id: self.cfg.router_id,
        });
        let pending = conn.incoming_pending;
        out.push(Output::Send(encode_keepalive()));
        self.set("OpenConfirm", now);
        self.phase = Phase::OpenConfirm {
            confirm_by: now + hold.max(Duration::from_secs(3)),
        };
        if pending {
            self.collision(now, out);
        }
        Ok(())
    }

    fn establish(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.set("Established", now);
        let conn = self.conn.as_ref().expect("connected");
        let (hold, keepalive) = (conn.hold, conn.keepalive);
        info!(
            "bgp {} ({}): established, AS {}, id {}, hold {}s{}",
            self.cfg.name,
            self.cfg.peer,
            conn.peer_asn,
            conn.peer_id,
            hold.as_secs(),
            match &conn.peer_gr {
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
        out.push(Output::Event(Event::Established {
            peer: self.cfg.peer,
            peer_id: conn.peer_id,
            graceful_restart: conn.peer_gr.clone(),
        }));
        self.phase = Phase::Established {
            hold_until: now + hold,
            keepalive_at: now + keepalive,
        };
        // While the agent is restarting there is no table yet: it comes once the agent
        // has selected its routes.
        if let Some(all) = self.adverts.clone() {
            self.advertise(&all, out);
            self.initial_end_of_rib(out);
        }
        self.status.sent = self.conn.as_ref().map_or(0, |c| c.sent.len());
    }

    fn established_message(&mut self, m: Message, out: &mut Vec<Output>) -> Result<(), Ended> {
        let family = self.family();
        match m {
            Message::Update(mut u) => {
                if let Some(why) = &u.treat_as_withdraw {
                    warn!(
                        "bgp {} ({}): malformed UPDATE treated as withdraw (RFC 7606): {why}",
                        self.cfg.name, self.cfg.peer
                    );
                    self.status.treated_as_withdraw += 1;
                }
                let conn = self.conn.as_mut().expect("established");
                let sc = conn.screen.as_ref().expect("established").apply(&mut u);
                self.log_screened(&sc);
                let conn = self.conn.as_mut().expect("established");
                if u.end_of_rib.is_some() {
                    info!(
                        "bgp {} ({}): End-of-RIB received",
                        self.cfg.name, self.cfg.peer
                    );
                    out.push(Output::Event(Event::EndOfRib {
                        peer: self.cfg.peer,
                    }));
                } else if !u.is_empty() {
                    if let Some(e) = conn.limits.count(&self.cfg, family, &u) {
                        return Err(self.notify(&e, out));
                    }
                    out.push(Output::Event(Event::Update {
                        peer: self.cfg.peer,
                        peer_id: conn.peer_id,
                        ebgp: conn.ebgp,
                        update: Box::new(u),
                    }));
                }
            }
            Message::Keepalive => {}
            Message::RouteRefresh { .. } => {
                if let Some(all) = self.adverts.clone() {
                    self.conn.as_mut().expect("established").sent.clear();
                    self.advertise(&all, out);
                }
            }
            Message::Open(_) => {
                return Err(self.notify(&err(ERR_FSM, 3, "OPEN while established"), out))
            }
            Message::Notification { .. } => unreachable!("taken before"),
        }
        Ok(())
    }

    /// Logs and counts what the inbound rules took out of an UPDATE.
    fn log_screened(&mut self, sc: &super::inbound::Screened) {
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
        let st = &mut self.status;
        st.not_negotiated += sc.not_negotiated as u64;
        st.treated_as_withdraw += sc.withdrawn.is_some() as u64;
    }

    /// Says what changed between `sent` and `want`: withdrawals, then announcements with
    /// next-hop-self (and our AS prepended for eBGP).
    fn advertise(&mut self, want: &[Advert], out: &mut Vec<Output>) {
        let (afi, safi) = self.family();
        let conn = self.conn.as_mut().expect("established");
        let (local, ebgp, four_octet) = (conn.local, conn.ebgp, conn.four_octet);
        let sent = &mut conn.sent;
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
                encode_update(chunk, None, &[], None, four_octet)
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
                    four_octet,
                )
            };
            out.push(Output::Send(msg));
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
                    encode_update(&[], Some((&attrs, None)), chunk, None, four_octet)
                } else {
                    let mp = MpReach {
                        afi,
                        safi,
                        next_hop: Some(local),
                        nlri: chunk.to_vec(),
                    };
                    encode_update(&[], Some((&attrs, Some(&mp))), &[], None, four_octet)
                };
                out.push(Output::Send(msg));
            }
        }
        self.status.sent = sent.len();
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

#[cfg(test)]
pub(crate) mod tests {
    //! RFC 4271 §8 as tables: each test feeds the machine events at chosen times and checks
    //! what it sends, reports and waits for. No sockets, no sleeps.
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }
    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    pub(crate) fn config(hold_time: u16) -> SessionConfig {
        SessionConfig {
            id: 1,
            name: "t".into(),
            segment: 1,
            local_asn: 65000,
            router_id: "10.0.0.5".parse().unwrap(),
            peer: "192.0.2.1".parse().unwrap(),
            port: 179,
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

    fn gr_config(hold_time: u16) -> SessionConfig {
        SessionConfig {
            graceful_restart: Some(GrLocal {
                restart_time: 120,
                forwarding: false,
            }),
            ..config(hold_time)
        }
    }

    pub(crate) fn open(asn: u32, id: &str, hold_time: u16, gr: bool) -> Vec<u8> {
        encode_open(&Open {
            asn,
            hold_time,
            router_id: id.parse().unwrap(),
            families: vec![(AFI_IPV4, SAFI_UNICAST)],
            four_octet: true,
            route_refresh: true,
            extended_message: false,
            graceful_restart: gr.then(|| GracefulRestart {
                restarting: false,
                restart_time: 90,
                families: vec![(AFI_IPV4, SAFI_UNICAST, true)],
            }),
        })
    }

    /// The messages among `out`, decoded.
    fn sent(out: &[Output]) -> Vec<Message> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(b) => Some(decode(b, true, MAX_LEN_EXTENDED).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn notification(out: &[Output]) -> Option<(u8, u8)> {
        sent(out).into_iter().find_map(|m| match m {
            Message::Notification { code, subcode, .. } => Some((code, subcode)),
            _ => None,
        })
    }

    fn down(out: &[Output]) -> Option<(String, bool)> {
        out.iter().find_map(|o| match o {
            Output::Event(Event::Down {
                reason, graceful, ..
            }) => Some((reason.clone(), *graceful)),
            _ => None,
        })
    }

    fn local() -> IpAddr {
        "192.0.2.2".parse().unwrap()
    }

    /// A session in OpenSent at `t`: it connected (we initiated) and sent its OPEN.
    fn open_sent(cfg: SessionConfig, t: Instant) -> Session {
        let (mut s, out) = Session::new(cfg, t);
        assert!(matches!(out[..], [Output::Connect]));
        let out = s.step(
            Input::Connected {
                initiated: true,
                local: local(),
            },
            t,
        );
        match &sent(&out)[..] {
            [Message::Open(o)] => {
                assert_eq!((o.asn, o.hold_time), (65000, s.cfg.hold_time));
                assert_eq!(o.router_id, s.cfg.router_id);
            }
            other => panic!("expected our OPEN, got {other:?}"),
        }
        assert_eq!(s.status().state, "OpenSent");
        s
    }

    /// A session in OpenConfirm at `t` with a peer of id `peer_id` and hold time `hold`.
    fn open_confirm(cfg: SessionConfig, peer_id: &str, hold: u16, gr: bool, t: Instant) -> Session {
        let mut s = open_sent(cfg, t);
        let out = s.step(Input::Received(&open(65010, peer_id, hold, gr)), t);
        assert!(matches!(&sent(&out)[..], [Message::Keepalive]), "{out:?}");
        assert_eq!(s.status().state, "OpenConfirm");
        s
    }

    fn established(cfg: SessionConfig, hold: u16, gr: bool, t: Instant) -> Session {
        let mut s = open_confirm(cfg, "10.0.0.9", hold, gr, t);
        let out = s.step(Input::Received(&encode_keepalive()), t);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Event(Event::Established { .. }))));
        assert_eq!(s.status().state, "Established");
        s
    }

    #[test]
    fn connect_retry_backs_off_doubling_up_to_30_s() {
        let t = t0();
        let (mut s, _) = Session::new(config(90), t);
        let mut now = t;
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert!(s
                .step(Input::ConnectFailed("refused".into()), now)
                .is_empty());
            assert_eq!(s.status().state, "Idle");
            assert_eq!(s.status().last_error.as_deref(), Some("refused"));
            let at = s.deadline().unwrap();
            waits.push((at - now).as_secs());
            assert!(s
                .step(Input::Timer, at - Duration::from_millis(1))
                .is_empty());
            assert!(matches!(s.step(Input::Timer, at)[..], [Output::Connect]));
            now = at;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn a_passive_session_waits_in_active_and_does_not_connect() {
        let (s, out) = Session::new(
            SessionConfig {
                passive: true,
                ..config(90)
            },
            t0(),
        );
        assert!(out.is_empty());
        assert_eq!(s.status().state, "Active");
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn open_sent_takes_only_a_valid_open() {
        let t = t0();
        // (what the peer sends, the NOTIFICATION we answer with)
        let cases: [(Vec<u8>, (u8, u8)); 4] = [
            (encode_keepalive(), (ERR_FSM, 1)),
            (open(65099, "10.0.0.9", 90, false), (ERR_OPEN, 2)),
            (encode_route_refresh(AFI_IPV4, SAFI_UNICAST), (ERR_FSM, 1)),
            // A message of unknown type: header error, Bad Message Type.
            ([&[0xffu8; 16][..], &[0, 19, 9]].concat(), (ERR_HEADER, 3)),
        ];
        for (msg, want) in cases {
            let mut s = open_sent(config(90), t);
            let out = s.step(Input::Received(&msg), t);
            assert_eq!(notification(&out), Some(want), "{out:?}");
            assert!(out
                .iter()
                .any(|o| matches!(o, Output::Close { drain: false })));
            assert!(down(&out).is_some_and(|(_, graceful)| !graceful));
            assert_eq!(s.status().state, "Idle");
        }
        // iBGP with our own identifier.
        let mut s = open_sent(
            SessionConfig {
                remote_asn: 65000,
                ..config(90)
            },
            t,
        );
        let out = s.step(Input::Received(&open(65000, "10.0.0.5", 90, false)), t);
        assert_eq!(notification(&out), Some((ERR_OPEN, 3)));
        // No OPEN within the large initial hold time (§8.2.2: 4 minutes).
        let mut s = open_sent(config(90), t);
        assert_eq!(s.deadline(), Some(t + secs(240)));
        let out = s.step(Input::Timer, t + secs(240));
        assert_eq!(notification(&out), Some((ERR_HOLD_TIMER, 0)));
    }

    #[test]
    fn a_message_split_anywhere_is_read_whole() {
        let t = t0();
        let mut s = open_sent(config(90), t);
        let o = open(65010, "10.0.0.9", 90, false);
        for b in o.chunks(7) {
            let out = s.step(Input::Received(b), t);
            assert!(notification(&out).is_none());
        }
        assert_eq!(s.status().state, "OpenConfirm");
    }

    #[test]
    fn open_confirm_waits_for_a_keepalive_within_the_hold_time() {
        let t = t0();
        let s = open_confirm(config(90), "10.0.0.9", 30, false, t);
        // The negotiated hold time is the smaller one.
        assert_eq!(s.deadline(), Some(t + secs(30)));
        let mut late = s;
        let out = late.step(Input::Timer, t + secs(30));
        assert_eq!(notification(&out), Some((ERR_HOLD_TIMER, 0)));
        let mut s = open_confirm(config(90), "10.0.0.9", 30, false, t);
        let upd = encode_update(&[], None, &[], None, true);
        let out = s.step(Input::Received(&upd), t);
        assert_eq!(notification(&out), Some((ERR_FSM, 2)));
        // Hold time 0 on one side: no hold timer, yet OpenConfirm ends within 3 s.
        let s = open_confirm(config(90), "10.0.0.9", 0, false, t);
        assert_eq!(s.deadline(), Some(t + secs(3)));
    }

    #[test]
    fn established_sends_keepalives_at_a_third_and_drops_a_silent_peer() {
        let t = t0();
        let mut s = established(config(9), 9, false, t);
        assert_eq!(s.deadline(), Some(t + secs(3)));
        assert!(matches!(
            &sent(&s.step(Input::Timer, t + secs(3)))[..],
            [Message::Keepalive]
        ));
        assert!(matches!(
            &sent(&s.step(Input::Timer, t + secs(6)))[..],
            [Message::Keepalive]
        ));
        // A message restarts the hold timer.
        s.step(Input::Received(&encode_keepalive()), t + secs(5));
        assert_eq!(s.deadline(), Some(t + secs(9)));
        assert!(matches!(
            &sent(&s.step(Input::Timer, t + secs(9)))[..],
            [Message::Keepalive]
        ));
        assert_eq!(
            s.deadline(),
            Some(t + secs(12)),
            "hold runs from the last message at 5 s + 9 s = 14 s, the next keepalive at 12 s"
        );
        s.step(Input::Timer, t + secs(12));
        let out = s.step(Input::Timer, t + secs(14));
        assert_eq!(notification(&out), Some((ERR_HOLD_TIMER, 0)));
        assert_eq!(
            down(&out).map(|(r, g)| (r.contains("hold timer"), g)),
            Some((true, false))
        );
        // After an established session the back-off starts over.
        assert_eq!(s.deadline(), Some(t + secs(15)));
    }

    #[test]
    fn established_refuses_a_second_open_and_reports_a_notification() {
        let t = t0();
        let mut s = established(config(90), 90, false, t);
        let out = s.step(Input::Received(&open(65010, "10.0.0.9", 90, false)), t);
        assert_eq!(notification(&out), Some((ERR_FSM, 3)));
        let mut s = established(config(90), 90, false, t);
        let out = s.step(Input::Received(&encode_notification(ERR_CEASE, 2, &[])), t);
        assert_eq!(notification(&out), None, "a NOTIFICATION is not answered");
        assert_eq!(down(&out).unwrap().0, "received NOTIFICATION 6/2");
    }

    #[test]
    fn collision_keeps_the_connection_of_the_higher_identifier() {
        let t = t0();
        // Peer's id higher, we opened ours: ours goes (Cease 7), the peer's stays, and no
        // session went down.
        let mut s = open_confirm(config(90), "10.0.0.9", 90, false, t);
        let out = s.step(Input::Incoming, t);
        assert_eq!(notification(&out), Some((ERR_CEASE, 7)));
        assert!(matches!(out.last(), Some(Output::SwitchToIncoming)));
        assert!(down(&out).is_none());
        // Peer's id lower: its new connection is refused.
        let mut s = open_confirm(config(90), "10.0.0.1", 90, false, t);
        let out = s.step(Input::Incoming, t);
        assert!(matches!(out[..], [Output::RejectIncoming]));
        // In OpenSent the peer's id is not known: decided when its OPEN comes.
        let mut s = open_sent(config(90), t);
        assert!(s.step(Input::Incoming, t).is_empty());
        let out = s.step(Input::Received(&open(65010, "10.0.0.9", 90, false)), t);
        assert_eq!(notification(&out), Some((ERR_CEASE, 7)));
        assert!(matches!(out.last(), Some(Output::SwitchToIncoming)));
        // Established without graceful restart: the new connection is closed.
        let mut s = established(config(90), 90, false, t);
        assert!(matches!(
            s.step(Input::Incoming, t)[..],
            [Output::RejectIncoming]
        ));
    }

    #[test]
    fn graceful_restart_a_lost_connection_or_a_reconnect_keeps_the_routes() {
        let t = t0();
        // RFC 4724 §4.2: the connection ends without a NOTIFICATION: the peer restarts.
        let mut s = established(gr_config(90), 90, true, t);
        let out = s.step(Input::Closed("read: early eof".into()), t);
        assert_eq!(down(&out).map(|(_, g)| g), Some(true));
        // A new connection from it while established: the old session is gone.
        let mut s = established(gr_config(90), 90, true, t);
        let out = s.step(Input::Incoming, t);
        assert_eq!(down(&out).map(|(_, g)| g), Some(true));
        assert!(matches!(out.last(), Some(Output::SwitchToIncoming)));
        // A NOTIFICATION is no restart, nor is an I/O error before Established.
        let mut s = established(gr_config(90), 90, true, t);
        let out = s.step(Input::Received(&encode_notification(ERR_CEASE, 2, &[])), t);
        assert_eq!(down(&out).map(|(_, g)| g), Some(false));
        let mut s = open_confirm(gr_config(90), "10.0.0.9", 90, true, t);
        let out = s.step(Input::Closed("read: early eof".into()), t);
        assert_eq!(down(&out).map(|(_, g)| g), Some(false));
        // Only one side announced it: no graceful restart.
        let mut s = established(gr_config(90), 90, false, t);
        let out = s.step(Input::Closed("read: early eof".into()), t);
        assert_eq!(down(&out).map(|(_, g)| g), Some(false));
    }

    #[test]
    fn the_first_table_ends_with_end_of_rib_and_changes_follow() {
        let t = t0();
        let net: IpNet = "10.9.0.0/16".parse().unwrap();
        let adv = |nets: &[IpNet]| {
            Some(Arc::new(
                nets.iter()
                    .map(|n| Advert {
                        net: *n,
                        attrs: Attrs::default(),
                    })
                    .collect(),
            ))
        };
        // The agent is restarting: nothing yet, not even End-of-RIB.
        let mut s = open_confirm(gr_config(90), "10.0.0.9", 90, true, t);
        s.step(Input::Adverts(None), t);
        let out = s.step(Input::Received(&encode_keepalive()), t);
        assert!(sent(&out).is_empty());
        // Its table comes: the UPDATE, then End-of-RIB (an empty UPDATE).
        let out = s.step(Input::Adverts(adv(&[net])), t);
        let msgs = sent(&out);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(matches!(&msgs[0], Message::Update(u) if u.nlri == [net]));
        assert!(matches!(&msgs[1], Message::Update(u) if u.end_of_rib.is_some()));
        assert_eq!(s.status().sent, 1);
        // A withdrawal later: just that.
        let out = s.step(Input::Adverts(adv(&[])), t);
        assert!(matches!(&sent(&out)[..], [Message::Update(u)] if u.withdrawn == [net]));
        assert_eq!(s.status().sent, 0);
    }

    #[test]
    fn an_import_change_asks_for_the_routes_again_or_resets_the_session() {
        let t = t0();
        let mut s = established(config(90), 90, false, t);
        let out = s.step(Input::Control(Control::Refresh), t);
        assert!(matches!(&sent(&out)[..], [Message::RouteRefresh { .. }]));
        // A peer without the capability: Cease 6, session reset.
        let mut s = open_sent(config(90), t);
        let no_rr = encode_open(&Open {
            asn: 65010,
            hold_time: 90,
            router_id: "10.0.0.9".parse().unwrap(),
            families: vec![(AFI_IPV4, SAFI_UNICAST)],
            four_octet: true,
            route_refresh: false,
            extended_message: false,
            graceful_restart: None,
        });
        s.step(Input::Received(&no_rr), t);
        s.step(Input::Received(&encode_keepalive()), t);
        let out = s.step(Input::Control(Control::Refresh), t);
        assert_eq!(
            notification(&out),
            Some((ERR_CEASE, CEASE_OTHER_CONFIG_CHANGE))
        );
        assert!(down(&out).is_some());
    }

    #[test]
    fn a_bfd_reset_sends_cease_10_drops_routes_and_connects_again() {
        let t = t0();
        let mut s = established(config(90), 90, true, t);
        let out = s.step(Input::Control(Control::Reset(CEASE_BFD_DOWN)), t);
        // RFC 9384: NOTIFICATION Cease (6) subcode BFD Down (10), exactly.
        let sent: Vec<&Vec<u8>> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(b) => Some(b),
                _ => None,
            })
            .collect();
        let mut want = vec![0xff; 16];
        want.extend([0, 21, 3, 6, 10]);
        assert_eq!(sent, [&want]);
        // Not graceful: the agent drops the peer's routes now, even with GR.
        let (_, graceful) = down(&out).expect("a Down event");
        assert!(!graceful);
        assert!(!out.iter().any(|o| matches!(o, Output::Stop)), "it goes on");
        // It connects again after the back-off.
        let again = s.step(Input::Timer, t + secs(31));
        assert!(
            again.iter().any(|o| matches!(o, Output::Connect)),
            "{again:?}"
        );
        // Not connected: nothing to reset.
        let (mut s, _) = Session::new(config(90), t);
        assert!(s.step(Input::Control(Control::Reset(10)), t).is_empty());
    }

    #[test]
    fn a_shutdown_sends_its_cease_drains_and_stops() {
        let t = t0();
        let mut s = established(config(90), 90, false, t);
        let out = s.step(
            Input::Control(Control::Shutdown(CEASE_PEER_DECONFIGURED)),
            t,
        );
        assert_eq!(
            notification(&out),
            Some((ERR_CEASE, CEASE_PEER_DECONFIGURED))
        );
        assert!(matches!(
            out[1..],
            [Output::Close { drain: true }, Output::Stop]
        ));
        assert!(down(&out).is_none(), "the agent asked: no Down event");
        assert!(s.step(Input::Timer, t + secs(100)).is_empty());
        // Not connected: just stop.
        let (mut s, _) = Session::new(config(90), t);
        assert!(matches!(
            s.step(Input::Control(Control::Shutdown(2)), t)[..],
            [Output::Stop]
        ));
    }

    #[test]
    fn the_prefix_limit_counts_what_the_peer_announces_now() {
        let cfg = SessionConfig {
            max_prefixes: Some(2),
            ..config(90)
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
}
