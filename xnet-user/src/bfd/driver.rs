//! Drives the BFD sessions on a thread of their own (with its own single-threaded tokio
//! runtime), so that nothing the agent's loop does — a full table arriving over BGP, a
//! kernel FIB sweep — delays a BFD packet or a detection. The agent adds and removes
//! sessions by command and hears state changes as events.
//!
//! Sockets: one listener per port and family (3784 single hop, where RFC 5881 §5 requires
//! a TTL of 255 on receipt: each datagram's TTL comes with it (IP_RECVTTL; UDP sockets
//! ignore IP_MINTTL); 4784 multihop, RFC 5883, no TTL check), and one sending
//! socket per session from a source port in 49152–65535 that no other session uses
//! (RFC 5881 §4), with TTL 255. Received packets find their session by Your
//! Discriminator, or while that is zero by the peer's address and the port they came to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{debug, info, warn};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::packet::{Control, Diag, State};
use super::session::{Output, Session, Timers};
use crate::nexthop_groups::SharedGroups;

pub const PORT_SINGLE_HOP: u16 = 3784;
pub const PORT_MULTIHOP: u16 = 4784;

/// A session is one peer address reached from one local address (or the one routing
/// picks), single hop or multihop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    pub peer: IpAddr,
    pub local: Option<IpAddr>,
    pub multihop: bool,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}", self.peer)?;
        if let Some(l) = self.local {
            write!(f, " from {l}")?;
        }
        if self.multihop {
            f.write_str(" (multihop)")?;
        }
        Ok(())
    }
}

enum Command {
    /// A session, and the next-hop addresses its failure takes out of the data plane's
    /// next-hop groups.
    Add(Key, Timers, Vec<IpAddr>),
    Remove(Key),
    /// AdminDown to every peer, then the thread ends.
    Stop(std::sync::mpsc::Sender<()>),
}

/// A session changed state.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Key,
    pub from: State,
    pub to: State,
    pub diag: Diag,
    /// Up → Down for a reason other than the peer's AdminDown (RFC 5882 §3.2): the
    /// clients take the path as dead.
    pub failure: bool,
    pub at: Instant,
    /// On a failure: the next-hop groups this thread rewrote at once, and how long after
    /// detection that was done.
    pub groups: usize,
    pub switched_after: Duration,
}

/// What `xnet bfd` shows of a session.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub peer: IpAddr,
    pub local: Option<IpAddr>,
    pub multihop: bool,
    pub state: String,
    pub remote_state: String,
    pub local_discr: u32,
    pub remote_discr: u32,
    /// The configured interval and multiplier.
    pub interval_ms: u32,
    pub multiplier: u8,
    /// Negotiated: our transmit interval and the detection time.
    pub tx_ms: f64,
    pub detect_ms: f64,
    pub last_diag: String,
    pub remote_diag: String,
    pub flaps: u32,
    /// Seconds in the current state.
    pub since_s: u64,
    /// How late a periodic packet left at worst, against its timer (milliseconds).
    pub tx_late_max_ms: f64,
}

struct Entry {
    session: Session,
    timers: Timers,
    /// Bound to the session's source port; not connected, so a peer that has no route
    /// yet (a tunnel not up) does not stop the session from starting.
    socket: UdpSocket,
    to: SocketAddr,
    since: Instant,
    /// The worst delay of a periodic packet against its timer.
    late_max: Duration,
    send_errors: u64,
    vias: Vec<IpAddr>,
    /// Its next hops are marked dead in the groups (after a failure, until Up).
    marked_dead: bool,
}

/// The agent's handle: commands in, events out, status to read.
pub struct Bfd {
    commands: mpsc::UnboundedSender<Command>,
    pub events: mpsc::UnboundedReceiver<Event>,
    status: Arc<Mutex<HashMap<Key, Status>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bfd {
    /// Binds the listeners and starts the thread.
    /// `groups`: the data plane's next-hop groups, which a failure rewrites from this
    /// thread, before the agent hears of it.
    pub fn start(groups: SharedGroups) -> Result<Bfd> {
        let (commands, rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let st = status.clone();
        let thread = std::thread::Builder::new()
            .name("xnet-bfd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ignored = ready_tx.send(Err(anyhow::anyhow!(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Listeners::bind() {
                        Ok(l) => {
                            let _ignored = ready_tx.send(Ok(()));
                            Driver {
                                listeners: l,
                                sessions: HashMap::new(),
                                by_discr: HashMap::new(),
                                events: events_tx,
                                status: st,
                                next_port: 49152,
                                groups,
                            }
                            .run(rx)
                            .await
                        }
                        Err(e) => {
                            let _ignored = ready_tx.send(Err(e));
                        }
                    }
                })
            })
            .context("BFD thread")?;
        ready_rx
            .recv()
            .context("BFD thread ended before binding its sockets")??;
        Ok(Bfd {
            commands,
            events,
            status,
            thread: Some(thread),
        })
    }

    pub fn add(&self, key: Key, timers: Timers, vias: Vec<IpAddr>) {
        if self.commands.send(Command::Add(key, timers, vias)).is_err() {
            warn!("bfd: the BFD thread has ended; session to {key} not started");
        }
    }

    pub fn remove(&self, key: Key) {
        if self.commands.send(Command::Remove(key)).is_err() {
            debug!("bfd: the BFD thread has ended ({key})");
        }
    }

    pub fn status(&self) -> Vec<Status> {
        let mut v: Vec<Status> = self
            .status
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| (s.peer, s.local, s.multihop));
        v
    }

    /// Tells every peer AdminDown (so our going is not a failure to them) and ends the
    /// thread. Blocks for as long as that takes (a few milliseconds).
    pub fn stop(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::Stop(tx)).is_ok()
            && rx.recv_timeout(Duration::from_secs(1)).is_err()
        {
            warn!("bfd: AdminDown not confirmed sent within 1 s");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("bfd: the BFD thread panicked");
            }
        }
    }
}

impl Drop for Bfd {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// The four listening sockets; a family the host lacks is left out.
struct Listeners {
    single4: Option<UdpSocket>,
    single6: Option<UdpSocket>,
    multi4: Option<UdpSocket>,
    multi6: Option<UdpSocket>,
}

fn set_int(fd: &impl AsRawFd, level: i32, name: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &v as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn listener(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Every datagram's TTL / hop limit comes with it (a control message).
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        set_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
    } else {
        set_int(&s, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    Ok(UdpSocket::from_std(s.into())?)
}

impl Listeners {
    fn bind() -> Result<Listeners> {
        let v4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let v6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let single4 = listener(SocketAddr::new(v4, PORT_SINGLE_HOP))
            .context("BFD single-hop listener (UDP 3784)")?;
        let multi4 = listener(SocketAddr::new(v4, PORT_MULTIHOP))
            .context("BFD multihop listener (UDP 4784)")?;
        let v6_ok = |r: Result<UdpSocket>| match r {
            Ok(s) => Some(s),
            Err(e) => {
                info!("bfd: no IPv6 listener: {e:#}");
                None
            }
        };
        Ok(Listeners {
            single4: Some(single4),
            single6: v6_ok(listener(SocketAddr::new(v6, PORT_SINGLE_HOP))),
            multi4: Some(multi4),
            multi6: v6_ok(listener(SocketAddr::new(v6, PORT_MULTIHOP))),
        })
    }
}

/// A datagram, where it came from, and the TTL (hop limit) it arrived with.
type Received = (usize, SocketAddr, Option<u8>);

async fn recv_on(s: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<Received> {
    match s {
        Some(s) => {
            s.async_io(tokio::io::Interest::READABLE, || recv_with_ttl(s, buf))
                .await
        }
        None => std::future::pending().await,
    }
}

/// recvmsg(2) with the IP_TTL / IPV6_HOPLIMIT control message.
fn recv_with_ttl(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    // SAFETY: plain C structs, zero is a valid start for each.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT)
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match from.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a = unsafe { &*(&from as *const _ as *const libc::sockaddr_in) };
            SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe { &*(&from as *const _ as *const libc::sockaddr_in6) };
            SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }
        f => return Err(std::io::Error::other(format!("address family {f}"))),
    };
    Ok((n as usize, from, ttl))
}

struct Driver {
    listeners: Listeners,
    sessions: HashMap<Key, Entry>,
    by_discr: HashMap<u32, Key>,
    events: mpsc::UnboundedSender<Event>,
    status: Arc<Mutex<HashMap<Key, Status>>>,
    next_port: u16,
    groups: SharedGroups,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut b1 = [0u8; 128];
        let mut b2 = [0u8; 128];
        let mut b3 = [0u8; 128];
        let mut b4 = [0u8; 128];
        loop {
            let deadline = self
                .sessions
                .values()
                .map(|e| e.session.deadline())
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline.into()) => self.timers(),
                r = recv_on(&self.listeners.single4, &mut b1) => self.received(r, &b1, false),
                r = recv_on(&self.listeners.single6, &mut b2) => self.received(r, &b2, false),
                r = recv_on(&self.listeners.multi4, &mut b3) => self.received(r, &b3, true),
                r = recv_on(&self.listeners.multi6, &mut b4) => self.received(r, &b4, true),
                c = commands.recv() => match c {
                    Some(Command::Add(k, t, vias)) => self.add(k, t, vias),
                    Some(Command::Remove(k)) => self.remove(k),
                    Some(Command::Stop(done)) => {
                        self.admin_down_all();
                        let _ignored = done.send(());
                        return;
                    }
                    None => {
                        self.admin_down_all();
                        return;
                    }
                },
            }
        }
    }

    fn add(&mut self, key: Key, timers: Timers, vias: Vec<IpAddr>) {
        if let Some(e) = self.sessions.get_mut(&key) {
            e.vias = vias;
            if e.timers != timers {
                // New intervals: the session stays Up, the peer learns them by Poll.
                info!(
                    "bfd {key}: now {} ms × {}",
                    timers.interval.as_millis(),
                    timers.multiplier
                );
                e.timers = timers;
                e.session.set_timers(timers, Instant::now());
                self.publish(key);
                self.timers();
            }
            return;
        }
        let to = SocketAddr::new(
            key.peer,
            if key.multihop {
                PORT_MULTIHOP
            } else {
                PORT_SINGLE_HOP
            },
        );
        let socket = match self.sender(&key) {
            Ok(s) => s,
            Err(e) => {
                warn!("bfd {key}: cannot open a socket: {e:#}");
                return;
            }
        };
        let discr = loop {
            // Without randomness (never seen), still unique.
            let d = getrandom::u32().unwrap_or(self.by_discr.len() as u32 + 1);
            if d != 0 && !self.by_discr.contains_key(&d) {
                break d;
            }
        };
        let now = Instant::now();
        info!(
            "bfd {key}: session started ({} ms × {})",
            timers.interval.as_millis(),
            timers.multiplier
        );
        self.by_discr.insert(discr, key);
        self.sessions.insert(
            key,
            Entry {
                session: Session::new(timers, discr, now),
                timers,
                socket,
                to,
                since: now,
                late_max: Duration::ZERO,
                send_errors: 0,
                vias,
                marked_dead: false,
            },
        );
        self.publish(key);
        self.timers();
    }

    fn remove(&mut self, key: Key) {
        if let Some(mut e) = self.sessions.remove(&key) {
            if e.marked_dead {
                self.mark(&e.vias, true);
            }
            let now = Instant::now();
            for o in e.session.admin_down(now) {
                if let Output::Send(c) = o {
                    send(&mut e, &c, &key);
                }
            }
            self.by_discr.remove(&e.session.discriminators().0);
            self.status.lock().expect("not poisoned").remove(&key);
            info!("bfd {key}: session removed (AdminDown sent)");
        }
    }

    fn admin_down_all(&mut self) {
        let keys: Vec<Key> = self.sessions.keys().copied().collect();
        // Three times: one lost packet should not make our restart look like a failure.
        let now = Instant::now();
        let mut packets = Vec::new();
        for k in &keys {
            let e = self.sessions.get_mut(k).expect("listed");
            for o in e.session.admin_down(now) {
                if let Output::Send(c) = o {
                    packets.push((*k, c));
                }
            }
        }
        for round in 0..3 {
            for (k, c) in &packets {
                if let Some(e) = self.sessions.get_mut(k) {
                    send(e, c, k);
                }
            }
            if round < 2 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !keys.is_empty() {
            info!("bfd: AdminDown sent to {} peers", keys.len());
        }
    }

    /// A socket for one session's packets: TTL 255, a source port of its own.
    fn sender(&mut self, key: &Key) -> Result<UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let dport = if key.multihop {
            PORT_MULTIHOP
        } else {
            PORT_SINGLE_HOP
        };
        let peer = SocketAddr::new(key.peer, dport);
        let local = key.local.unwrap_or(match key.peer {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        });
        let s = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
        if peer.is_ipv6() {
            s.set_unicast_hops_v6(255)?;
        } else {
            s.set_ttl_v4(255)?;
        }
        s.set_nonblocking(true)?;
        // The next free port of the range, wrapping; the kernel says which are taken.
        let mut tried = 0u32;
        loop {
            let port = self.next_port;
            self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
            match s.bind(&SocketAddr::new(local, port).into()) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tried < 16384 => tried += 1,
                Err(e) => return Err(e).with_context(|| format!("bind {local} port {port}")),
            }
        }
        Ok(UdpSocket::from_std(s.into())?)
    }

    fn received(&mut self, r: std::io::Result<Received>, buf: &[u8], multihop: bool) {
        let (n, from, ttl) = match r {
            Ok(x) => x,
            Err(e) => {
                debug!("bfd: receive: {e}");
                return;
            }
        };
        // RFC 5881 §5: single hop means TTL 255 on arrival (GTSM); else it crossed a router.
        if !multihop && ttl != Some(255) {
            debug!("bfd: from {from}: discarded: TTL {ttl:?}, not 255");
            return;
        }
        let c = match Control::decode(&buf[..n]) {
            Ok(c) => c,
            Err(e) => {
                debug!("bfd: from {from}: discarded: {e}");
                return;
            }
        };
        let peer = canonical(from.ip());
        // §6.8.6: by Your Discriminator when it is set; else by where it came from.
        let key = if c.your_discr != 0 {
            match self.by_discr.get(&c.your_discr) {
                Some(k) if k.peer == peer && k.multihop == multihop => *k,
                _ => {
                    debug!(
                        "bfd: from {from}: no session with discriminator {}",
                        c.your_discr
                    );
                    return;
                }
            }
        } else {
            match self
                .sessions
                .keys()
                .find(|k| k.peer == peer && k.multihop == multihop)
            {
                Some(k) => *k,
                None => {
                    debug!("bfd: from {from}: no session for this peer");
                    return;
                }
            }
        };
        let now = Instant::now();
        let e = self.sessions.get_mut(&key).expect("indexed");
        let out = e.session.receive(&c, now);
        self.outputs(key, out, now);
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, e)| e.session.deadline() <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let e = self.sessions.get_mut(&k).expect("listed");
            let scheduled = e.session.next_transmit();
            let was_up = e.session.state() == State::Up;
            let out = e.session.timer(now);
            if was_up && out.iter().any(|o| matches!(o, Output::Send(_))) {
                // Up's periodic packets: how late the thread got to them.
                e.late_max = e.late_max.max(now.saturating_duration_since(scheduled));
            }
            self.outputs(k, out, now);
        }
    }

    /// Marks next hops dead or alive in the data plane's groups; how many groups changed.
    fn mark(&self, vias: &[IpAddr], alive: bool) -> usize {
        let mut g = self.groups.lock();
        vias.iter()
            .map(|v| match g.set_alive(*v, alive) {
                Ok(n) => n,
                Err(e) => {
                    warn!("bfd: next-hop groups via {v}: {e:#}");
                    0
                }
            })
            .sum()
    }

    fn outputs(&mut self, key: Key, out: Vec<Output>, now: Instant) {
        for o in out {
            let e = self.sessions.get_mut(&key).expect("present");
            match o {
                Output::Send(c) => send(e, &c, &key),
                Output::State { from, to, diag } => {
                    e.since = now;
                    let remote = e.session.remote_state();
                    let failure = Session::is_failure(from, to, remote);
                    // Packets stop going to a dead next hop before anyone else hears.
                    let (mut groups, vias) = (0, e.vias.clone());
                    if failure && !e.marked_dead {
                        e.marked_dead = true;
                        groups = self.mark(&vias, false);
                    } else if to == State::Up && e.marked_dead {
                        e.marked_dead = false;
                        self.mark(&vias, true);
                    }
                    let switched_after = now.elapsed();
                    let why = if to == State::Down {
                        format!(" ({})", diag.name())
                    } else {
                        String::new()
                    };
                    info!("bfd {key}: {} → {}{why}", from.name(), to.name());
                    if self
                        .events
                        .send(Event {
                            key,
                            from,
                            to,
                            diag,
                            failure,
                            at: now,
                            groups,
                            switched_after,
                        })
                        .is_err()
                    {
                        debug!("bfd {key}: the agent is gone");
                    }
                }
            }
        }
        self.publish(key);
    }

    fn publish(&self, key: Key) {
        let Some(e) = self.sessions.get(&key) else {
            return;
        };
        let s = &e.session;
        let (tx, detect) = s.intervals();
        let (l, r) = s.discriminators();
        let status = Status {
            peer: key.peer,
            local: key.local,
            multihop: key.multihop,
            state: s.state().name().into(),
            remote_state: s.remote_state().name().into(),
            local_discr: l,
            remote_discr: r,
            interval_ms: e.timers.interval.as_millis() as u32,
            multiplier: e.timers.multiplier,
            tx_ms: tx.as_secs_f64() * 1e3,
            detect_ms: detect.as_secs_f64() * 1e3,
            last_diag: s.last_diag.name().into(),
            remote_diag: s.remote_diag.name().into(),
            flaps: s.flaps,
            since_s: e.since.elapsed().as_secs(),
            tx_late_max_ms: e.late_max.as_secs_f64() * 1e3,
        };
        self.status
            .lock()
            .expect("not poisoned")
            .insert(key, status);
    }
}

fn send(e: &mut Entry, c: &Control, key: &Key) {
    // A datagram socket that is writable in practice: try_send does not wait. A failure
    // (no route, ICMP unreachable) is the peer being away: BFD's own timers deal with it.
    if let Err(err) = e.socket.try_send_to(&c.encode(), e.to) {
        e.send_errors += 1;
        if e.send_errors.is_power_of_two() {
            debug!("bfd {key}: send: {err} ({} so far)", e.send_errors);
        }
    }
}

/// An IPv4 peer seen on an IPv6 socket is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
