//! The IKE daemon: one UDP socket on port 500 per local tunnel address, the IKE SAs of
//! the configured connectors (initiating those marked `initiate`, answering the others),
//! and the CHILD SAs they negotiate installed into kernel XFRM.
//!
//! Data-plane contract: ESP (IP protocol 50) and IKE (UDP 500/4500) reaching XDP go to the
//! kernel (`XDP_PASS`, counted as `esp` / `ike`), so XFRM decrypts them; traffic for a
//! tunnel's remote selectors has no XDP route and reaches the kernel too, whose XFRM
//! policies encrypt it. XDP never touches tunnel traffic itself.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::config::Ipsec;
use super::crypto::Secret;
use super::packet::{
    decode_payloads, encode_payloads, id_of, Header, Payload, Payloads, TrafficSelector,
    FLAG_RESPONSE, HEADER_LEN, ID_DER_ASN1_DN, ID_FQDN, IKE_SA_INIT, N_COOKIE,
};
use super::proposal::Suite;
use super::sa::{Auth, ChildSa, Conn, IkeSa, Output, State};
use super::status::{IpsecChildStatus, IpsecStatus, IpsecTotals};
use super::xfrm::{self, Xfrm};

pub const IKE_PORT: u16 = 500;
/// NAT-T: IKE behind a 4-octet non-ESP marker, and ESP in UDP (RFC 3948).
pub const NATT_PORT: u16 = 4500;

/// Makes a UDP 4500 socket take ESP-in-UDP for the kernel (UDP_ENCAP_ESPINUDP); IKE
/// messages (marker 0) still reach the socket.
fn set_espinudp(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = 2;
    // SAFETY: a valid int option on our own socket (UDP_ENCAP = 100).
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_UDP,
            100,
            &v as *const _ as *const libc::c_void,
            4,
        )
    };
    if r != 0 {
        warn!(
            "ipsec: UDP_ENCAP on port {NATT_PORT}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Shared with the agent's status.
pub type SharedStatus = Arc<Mutex<Vec<IpsecStatus>>>;

/// A connector's tunnel came up (its first CHILD SA) or went down (its last): the agent
/// routes its prefixes into it or takes them out. By the connector's index: its position
/// in `config.ipsec` at start, then in the order a reload added it (`IkeHandle::add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEvent {
    Up(usize),
    Down(usize),
}

/// The daemon as the agent holds it.
pub struct IkeHandle {
    pub status: SharedStatus,
    pub events: mpsc::UnboundedReceiver<TunnelEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    commands: mpsc::UnboundedSender<Command>,
}

/// A reload's changes to the connectors.
enum Command {
    /// A new connector, index `index` (the next one); `if_id`: its xfrm interface.
    Add {
        ipsec: Box<Ipsec>,
        conn: Arc<Conn>,
        index: usize,
        if_id: Option<u32>,
        done: oneshot::Sender<Result<()>>,
    },
    /// Connector `index` goes: its SAs are deleted (the peer told) and leave XFRM; the
    /// index is not used again.
    Remove {
        index: usize,
        done: oneshot::Sender<()>,
    },
}

impl IkeHandle {
    /// Adds connector `ipsec` as index `index`; it initiates (or waits) at once. Fails if
    /// its local address cannot take IKE's ports.
    pub async fn add(
        &self,
        ipsec: &Ipsec,
        conn: Arc<Conn>,
        index: usize,
        if_id: Option<u32>,
    ) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.commands
            .send(Command::Add {
                ipsec: Box::new(ipsec.clone()),
                conn,
                index,
                if_id,
                done,
            })
            .map_err(|_| anyhow::anyhow!("the IKE daemon stopped"))?;
        wait.await
            .map_err(|_| anyhow::anyhow!("the IKE daemon stopped"))?
    }

    /// Removes connector `index`, deleting its SAs.
    pub async fn remove(&self, index: usize) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Remove { index, done }).is_ok() {
            let _ = wait.await;
        }
    }

    /// Deletes every SA (telling the peers) and removes what was installed in XFRM.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.task).await;
    }
}

/// An ID from the config: an address, a DN ("CN=…, O=…") or an FQDN.
fn id_from(s: &Option<String>, addr: IpAddr) -> (u8, Vec<u8>) {
    match s {
        None => id_of(addr),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(a) => id_of(a),
            Err(_) => match s.contains('=').then(|| super::cert::dn_der(s)).flatten() {
                Some(dn) => (ID_DER_ASN1_DN, dn),
                None => (ID_FQDN, s.as_bytes().to_vec()),
            },
        },
    }
}

/// The connector's authentication: its PSK, or its certificate credentials.
fn load_auth(c: &Ipsec, i: usize, file: &str) -> Result<Auth> {
    match (&c.cert_file, &c.key_file, &c.ca_file) {
        (Some(cert), Some(key), Some(ca)) => super::cert::Credentials::load(cert, key, ca)
            .map(|k| Auth::Cert(Arc::new(k)))
            .map_err(|e| anyhow::anyhow!("{file}: ipsec[{i}].{e}")),
        _ => Ok(Auth::Psk(load_psk(c, i, file)?)),
    }
}

fn load_psk(c: &Ipsec, i: usize, file: &str) -> Result<Secret> {
    let raw = match (&c.psk_file, &c.psk_env) {
        (Some(p), _) => std::fs::read_to_string(p)
            .with_context(|| format!("{file}: ipsec[{i}].psk_file: cannot read {}", p.display()))?,
        (_, Some(v)) => std::env::var(v)
            .with_context(|| format!("{file}: ipsec[{i}].psk_env: {v} is not set"))?,
        _ => unreachable!("validated"),
    };
    let key = raw.lines().next().unwrap_or("").trim().as_bytes().to_vec();
    if key.len() < 8 {
        anyhow::bail!("{file}: ipsec[{i}]: the pre-shared key is shorter than 8 characters");
    }
    Ok(Secret::new(key))
}

/// The state machine's view of the configured connectors; the PSKs are read here, so a
/// missing key fails the start with the field that names it.
pub fn conns(ipsec: &[Ipsec], file: &str) -> Result<Vec<Arc<Conn>>> {
    ipsec
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (ike, esp) = c.proposals();
            let auth = load_auth(c, i, file)?;
            // With a certificate: by default its subject is our ID, and the CA (with any
            // remote_id) decides who the peer may be.
            let (local_id, remote_id) = match &auth {
                Auth::Cert(k) if c.local_id.is_none() => (
                    (ID_DER_ASN1_DN, k.subject.clone()),
                    c.remote_id
                        .as_ref()
                        .map(|_| id_from(&c.remote_id, c.remote_address)),
                ),
                Auth::Cert(_) => (
                    id_from(&c.local_id, c.local_address),
                    c.remote_id
                        .as_ref()
                        .map(|_| id_from(&c.remote_id, c.remote_address)),
                ),
                Auth::Psk(_) => (
                    id_from(&c.local_id, c.local_address),
                    Some(id_from(&c.remote_id, c.remote_address)),
                ),
            };
            Ok(Arc::new(Conn {
                name: c.name.clone(),
                local: c.local_address,
                remote: c.remote_address,
                auth,
                local_id,
                remote_id,
                ike: ike
                    .iter()
                    .map(|n| Suite::parse(n, true).expect("validated"))
                    .collect(),
                esp: esp
                    .iter()
                    .map(|n| Suite::parse(n, false).expect("validated"))
                    .collect(),
                local_ts: c
                    .local_ts
                    .iter()
                    .map(|n| TrafficSelector::from_net(*n))
                    .collect(),
                remote_ts: c
                    .remote_ts
                    .iter()
                    .map(|n| TrafficSelector::from_net(*n))
                    .collect(),
                dpd: c.dpd(),
                force_encap: c.force_encap,
                child_lifetime: Duration::from_secs(c.lifetimes().0),
                ike_lifetime: Duration::from_secs(c.lifetimes().1),
                initiate: c.initiate,
            }))
        })
        .collect()
}

/// A CHILD SA's (local, remote) traffic selectors.
type SelectorSet = (Vec<TrafficSelector>, Vec<TrafficSelector>);

struct Connector {
    conn: Arc<Conn>,
    initiate: bool,
    segment: String,
    /// XFRM request ids, one per set of traffic selectors (the first is the connector's
    /// own, 0x100 + its index): they tie each CHILD SA's policies to its SAs, so with
    /// several CHILD SAs the kernel never sends a packet on another's SA (which the peer
    /// would drop for its selectors).
    reqids: Vec<(SelectorSet, u32)>,
    /// Its index (for the reqids of further selector sets).
    index: usize,
    /// Route-based: the if_id of its xfrm interface.
    if_id: Option<u32>,
    /// Our SPI of its current IKE SA.
    sa: Option<u64>,
    /// When to try again after a failure (initiators).
    retry_at: Instant,
    backoff: Duration,
    last_error: Option<String>,
    /// CHILD SAs in XFRM: (child, installed).
    children: Vec<(ChildSa, bool)>,
    /// The IKE SA a reauthentication replaces: deleted when the new one has a CHILD SA.
    reauth_old: Option<u64>,
    /// That old IKE SA and when it goes: a second after the new CHILD SA is in, so what
    /// the peer sent on the old SAs just before still finds them.
    retire: Option<(u64, Instant)>,
    /// CHILD SAs the peer rekeyed whose outbound SA waits (inbound SPI, since): until the
    /// peer deletes the old SA it may not have installed the new inbound one yet.
    out_pending: Vec<(u32, Instant)>,
    /// A reload removed it: no SA, never initiates or answers again.
    retired: bool,
    /// Counters over the connector's life (for metrics: they never go back).
    totals: Totals,
}

impl Connector {
    /// Connector `index` of config `c`, with no SA yet (an initiator tries at once).
    fn new(conn: Arc<Conn>, c: &Ipsec, index: usize, if_id: Option<u32>, now: Instant) -> Self {
        Connector {
            conn,
            initiate: c.initiate,
            segment: c.segment.clone(),
            reqids: Vec::new(),
            index,
            if_id,
            sa: None,
            retry_at: now,
            backoff: Duration::from_secs(1),
            last_error: None,
            children: Vec::new(),
            reauth_old: None,
            retire: None,
            out_pending: Vec::new(),
            totals: Totals::default(),
            retired: false,
        }
    }
}

/// A connector's counters since the agent started: rekeys, DPD failures, and the traffic of
/// CHILD SAs that are gone (the current ones' is added when reported).
#[derive(Default, Clone, Copy)]
struct Totals {
    ike_rekeys: u64,
    child_rekeys: u64,
    dpd_failures: u64,
    bytes_in: u64,
    bytes_out: u64,
    packets_in: u64,
    packets_out: u64,
}

struct Datagram {
    local: IpAddr,
    /// Our port it arrived on.
    port: u16,
    from: SocketAddr,
    msg: Vec<u8>,
}

struct Daemon {
    connectors: Vec<Connector>,
    sas: HashMap<u64, IkeSa>,
    /// (local address, port 500 or 4500) → socket.
    sockets: HashMap<(IpAddr, u16), Arc<UdpSocket>>,
    xfrm: Option<Xfrm>,
    status: SharedStatus,
    keylog: Option<std::fs::File>,
    dropped: u64,
    esp_missing_logged: bool,
    cookies: super::cookie::Cookies,
    cookie_threshold: usize,
    cookies_sent: u64,
    events: mpsc::UnboundedSender<TunnelEvent>,
    /// Kernel counters of installed SAs by SPI: (bytes, packets), read on each tick.
    counters: HashMap<u32, (u64, u64)>,
    /// Inbound SAs of replaced CHILD SAs (destination, SPI, when): deleted a few seconds
    /// late, so what the peer sent on them just before it switched still decrypts (what
    /// strongSwan's delete_rekeyed_delay does).
    late_deletes: Vec<(IpAddr, u32, Instant)>,
    /// Inbound SAs installed before IKE_AUTH went out: inbound SPI → (IKE SA, the SA).
    inbound_first: HashMap<u32, (u64, xfrm::Sa)>,
    /// For the sockets of connectors a reload adds.
    datagrams: mpsc::Sender<Datagram>,
    file: String,
}

/// How long an inbound SA outlives its CHILD SA.
const INBOUND_GRACE: Duration = Duration::from_secs(5);

/// Binds IKE's ports (500, 4500 with ESP-in-UDP) on connector `c`'s local address, once
/// per address; a task per socket hands its datagrams to the daemon.
async fn bind_ike(
    sockets: &mut HashMap<(IpAddr, u16), Arc<UdpSocket>>,
    tx: &mpsc::Sender<Datagram>,
    c: &Conn,
    file: &str,
) -> Result<()> {
    for port in [IKE_PORT, NATT_PORT] {
        if sockets.contains_key(&(c.local, port)) {
            continue;
        }
        let s = Arc::new(
            UdpSocket::bind(SocketAddr::new(c.local, port))
                .await
                .with_context(|| format!("{file}: ipsec {}: IKE on {}:{port}", c.name, c.local))?,
        );
        if port == NATT_PORT {
            set_espinudp(&s);
        }
        let (reader, tx, local) = (s.clone(), tx.clone(), c.local);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = reader.recv_from(&mut buf).await {
                let msg = if port == NATT_PORT {
                    // IKE carries a zero non-ESP marker; a one-octet 0xff is a NAT
                    // keepalive; anything else was ESP for the kernel.
                    match buf.get(..4) {
                        Some([0, 0, 0, 0]) if n > 4 => buf[4..n].to_vec(),
                        _ => continue,
                    }
                } else {
                    buf[..n].to_vec()
                };
                if tx
                    .send(Datagram {
                        local,
                        port,
                        from,
                        msg,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        sockets.insert((c.local, port), s);
    }
    Ok(())
}

/// XFRM request id of connector `i` (also the if_id of its xfrm interface, if any).
pub fn reqid(i: usize) -> u32 {
    xnet_common::ipsec::reqid(i as u32, 0)
}

/// Starts the daemon for the config's connectors (None without any). `if_ids`: the
/// route-based connectors (by index) whose xfrm interface exists.
pub async fn start(
    ipsec: &[Ipsec],
    cookie_threshold: usize,
    file: &str,
    if_ids: &HashMap<usize, u32>,
) -> Result<Option<IkeHandle>> {
    if ipsec.is_empty() {
        return Ok(None);
    }
    let conns = conns(ipsec, file)?;
    let mut sockets = HashMap::new();
    let (tx, rx) = mpsc::channel::<Datagram>(1024);
    for c in &conns {
        bind_ike(&mut sockets, &tx, c, file).await?;
    }
    let xfrm = match Xfrm::open() {
        Ok(x) => Some(x),
        Err(e) => {
            warn!("ipsec: no XFRM netlink ({e}): SAs are negotiated but not installed");
            None
        }
    };
    // A debugging aid like SSLKEYLOGFILE: the ESP keys, for decrypting captures. Off
    // unless the variable is set, and loud about it.
    let keylog = std::env::var_os("XNET_IKE_KEYLOG").and_then(|p| {
        warn!(
            "ipsec: XNET_IKE_KEYLOG is set: ESP keys are written to {}",
            p.to_string_lossy()
        );
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let now = Instant::now();
    let connectors = conns
        .into_iter()
        .zip(ipsec)
        .enumerate()
        .map(|(i, (conn, c))| Connector::new(conn, c, i, if_ids.get(&i).copied(), now))
        .collect();
    let status: SharedStatus = Default::default();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mut d = Daemon {
        connectors,
        sas: HashMap::new(),
        sockets,
        xfrm,
        status: status.clone(),
        keylog,
        dropped: 0,
        esp_missing_logged: false,
        cookies: Default::default(),
        cookie_threshold,
        cookies_sent: 0,
        events: ev_tx,
        counters: HashMap::new(),
        late_deletes: Vec::new(),
        inbound_first: HashMap::new(),
        datagrams: tx,
        file: file.to_string(),
    };
    d.publish();
    info!(
        "ipsec: {} connectors, IKE on UDP {IKE_PORT}",
        d.connectors.len()
    );
    for c in &d.connectors {
        let dpd = c.conn.dpd;
        if !dpd.interval.is_zero() {
            info!(
                "ipsec {}: DPD after {} s idle, {} retries {} s apart: a silent peer is declared dead within {} s",
                c.conn.name,
                dpd.interval.as_secs(),
                dpd.retries,
                dpd.retransmit.as_secs(),
                dpd.bound().as_secs()
            );
        }
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move { d.run(rx, cmd_rx, stop_rx).await });
    Ok(Some(IkeHandle {
        status,
        events: ev_rx,
        stop: Some(stop_tx),
        task,
        commands: cmd_tx,
    }))
}

impl Daemon {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Datagram>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(d) = rx.recv() => self.on_datagram(d).await,
                Some(c) = commands.recv() => self.on_command(c).await,
                _ = tick.tick() => self.on_tick().await,
            }
            self.publish();
        }
        // Tell every peer, then clean XFRM.
        let now = Instant::now();
        self.each_sa(|sa| sa.delete(now)).await;
        for i in 0..self.connectors.len() {
            let children: Vec<ChildSa> = self.connectors[i]
                .children
                .drain(..)
                .map(|(c, _)| c)
                .collect();
            for c in children {
                self.uninstall(i, &c);
            }
        }
        self.late_deletes(now, true);
        info!("ipsec: stopped, SAs deleted");
    }

    async fn on_command(&mut self, c: Command) {
        match c {
            Command::Add {
                ipsec,
                conn,
                index,
                if_id,
                done,
            } => {
                let r = bind_ike(&mut self.sockets, &self.datagrams, &conn, &self.file).await;
                if r.is_ok() {
                    debug_assert_eq!(index, self.connectors.len());
                    info!("ipsec {}: connector added (reload)", conn.name);
                    self.connectors.push(Connector::new(
                        conn,
                        &ipsec,
                        index,
                        if_id,
                        Instant::now(),
                    ));
                }
                let _ = done.send(r);
            }
            Command::Remove { index, done } => {
                if let Some(k) = self.connectors.get_mut(index) {
                    k.retired = true;
                    k.initiate = false;
                    let conn = k.conn.clone();
                    info!(
                        "ipsec {}: connector removed (reload): its SAs go",
                        conn.name
                    );
                    let now = Instant::now();
                    let spis: Vec<u64> = self
                        .sas
                        .iter()
                        .filter(|(_, s)| Arc::ptr_eq(&s.conn, &conn))
                        .map(|(spi, _)| *spi)
                        .collect();
                    for spi in spis {
                        let out = self
                            .sas
                            .get_mut(&spi)
                            .map(|s| s.delete(now))
                            .unwrap_or_default();
                        self.apply(spi, out).await;
                        // Not waiting for the peer's answer: the SA and its keys go now.
                        self.sas.remove(&spi);
                    }
                    let children: Vec<ChildSa> = self.connectors[index]
                        .children
                        .iter()
                        .map(|(c, _)| c.clone())
                        .collect();
                    for c in children {
                        self.remove_child(index, c.spi_in);
                    }
                    self.connectors[index].sa = None;
                }
                let _ = done.send(());
            }
        }
    }

    /// Runs `f` on every SA and carries out what each asks for.
    async fn each_sa(&mut self, f: impl Fn(&mut IkeSa) -> Vec<Output>) {
        let spis: Vec<u64> = self.sas.keys().copied().collect();
        for spi in spis {
            let out = self.sas.get_mut(&spi).map(&f).unwrap_or_default();
            self.apply(spi, out).await;
        }
    }

    async fn on_datagram(&mut self, d: Datagram) {
        let (local, from, msg) = (d.local, d.from, d.msg.as_slice());
        let from_ip = from.ip().to_canonical();
        let Ok(h) = Header::decode(msg) else {
            self.dropped += 1;
            return;
        };
        let now = Instant::now();
        // Our SPI is the responder's if we answer, the initiator's if we asked.
        let ours = if h.from_initiator() { h.spi_r } else { h.spi_i };
        if let Some(sa) = self.sas.get_mut(&ours) {
            if sa.conn.remote != from_ip {
                self.dropped += 1;
                return;
            }
            // The peer's port may change (a NAT, or the move to 4500): answer where it is.
            sa.remote_port = from.port();
            if d.port == NATT_PORT {
                sa.natt = true;
            }
            let out = sa.on_message(msg, now);
            self.apply(ours, out).await;
            return;
        }
        if h.exchange != IKE_SA_INIT || h.is_response() || h.spi_r != 0 {
            self.dropped += 1;
            return;
        }
        let Some(ci) = self
            .connectors
            .iter()
            .position(|c| !c.retired && c.conn.local == local && c.conn.remote == from_ip)
        else {
            warn!(
                "ipsec: IKE_SA_INIT from {from_ip} to {local}: no connector for this pair, dropped"
            );
            self.dropped += 1;
            return;
        };
        // A retransmitted IKE_SA_INIT for an SA we already answered.
        if let Some(existing) = self
            .sas
            .values_mut()
            .find(|s| !s.initiator && s.spi_i == h.spi_i && s.conn.remote == from_ip)
        {
            let spi = existing.local_spi();
            let out = existing.on_message(msg, now);
            self.apply(spi, out).await;
            return;
        }
        if !self.cookie_ok(local, &h, msg, from, now).await {
            return;
        }
        let conn = self.connectors[ci].conn.clone();
        match IkeSa::respond(conn.clone(), msg, from.port(), now) {
            Ok((sa, out)) => {
                let spi = sa.local_spi();
                // A new IKE SA from the peer replaces the one we had (it restarted, or
                // both sides initiated at once): the old one's CHILD SAs go.
                if let Some(old) = self.connectors[ci].sa.replace(spi) {
                    info!(
                        "ipsec {}: the peer started a new IKE SA; the old one is dropped",
                        conn.name
                    );
                    self.sas.remove(&old);
                    let children: Vec<ChildSa> = self.connectors[ci]
                        .children
                        .drain(..)
                        .map(|(c, _)| c)
                        .collect();
                    if !children.is_empty() {
                        let _ = self.events.send(TunnelEvent::Down(ci));
                    }
                    for c in children {
                        self.uninstall(ci, &c);
                    }
                }
                self.sas.insert(spi, sa);
                self.apply(spi, out).await;
            }
            Err((answer, why)) => {
                info!(
                    "ipsec {}: IKE_SA_INIT from {from_ip} refused: {why}",
                    conn.name
                );
                if let Some(a) = answer {
                    self.send(local, SocketAddr::new(conn.remote, from.port()), false, &a)
                        .await;
                }
            }
        }
    }

    /// Under load (too many half-open SAs), an IKE_SA_INIT must carry our cookie; one
    /// without gets a COOKIE answer and no state (RFC 7296 §2.6). False: not to go on.
    async fn cookie_ok(
        &mut self,
        local: IpAddr,
        h: &Header,
        msg: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> bool {
        let half_open = self
            .sas
            .values()
            .filter(|s| s.state == State::InitDone)
            .count();
        if half_open < self.cookie_threshold {
            return true;
        }
        let Ok((payloads, _)) = decode_payloads(h.next, &msg[HEADER_LEN..], HEADER_LEN) else {
            self.dropped += 1;
            return false;
        };
        let Some(ni) = payloads.nonce() else {
            self.dropped += 1;
            return false;
        };
        let ip = from.ip().to_canonical();
        // The cookie must be the first payload.
        if let Some(Payload::Notify {
            kind: N_COOKIE,
            data,
            ..
        }) = payloads.first()
        {
            if self.cookies.check(data, ni, ip, h.spi_i, now) {
                return true;
            }
        }
        let cookie = self.cookies.make(ni, ip, h.spi_i, now);
        let (first, body) = encode_payloads(&[Payload::notify(N_COOKIE, cookie)]);
        let hdr = Header {
            spi_i: h.spi_i,
            spi_r: 0,
            next: first,
            exchange: IKE_SA_INIT,
            flags: FLAG_RESPONSE,
            message_id: 0,
            length: (HEADER_LEN + body.len()) as u32,
        };
        self.cookies_sent += 1;
        if self.cookies_sent == 1 || self.cookies_sent.is_multiple_of(1000) {
            info!(
                "ipsec: {half_open} half-open IKE SAs: asking initiators for cookies ({} sent)",
                self.cookies_sent
            );
        }
        self.send(local, from, false, &[hdr.encode().to_vec(), body].concat())
            .await;
        false
    }

    async fn send(&self, local: IpAddr, to: SocketAddr, natt: bool, msg: &[u8]) {
        let port = if natt { NATT_PORT } else { IKE_PORT };
        let Some(s) = self.sockets.get(&(local, port)) else {
            return;
        };
        let r = if natt {
            s.send_to(&[&[0u8, 0, 0, 0][..], msg].concat(), to).await
        } else {
            s.send_to(msg, to).await
        };
        if let Err(e) = r {
            warn!("ipsec: sending to {to}: {e}");
        }
    }

    /// Carries out what an SA asked for.
    async fn apply(&mut self, spi: u64, out: Vec<Output>) {
        let Some((local, remote, name)) = self
            .sas
            .get(&spi)
            .map(|s| (s.conn.local, s.conn.remote, s.conn.name.clone()))
        else {
            return;
        };
        // Where to send: the peer's current port, over 4500 once NAT-T is on.
        let path = |d: &Daemon| {
            d.sas
                .get(&spi)
                .map(|s| (s.remote_port, s.natt))
                .unwrap_or((IKE_PORT, false))
        };
        // The connector this SA belongs to (an SA being replaced by a rekey included).
        let ci = self.sas.get(&spi).and_then(|s| {
            self.connectors
                .iter()
                .position(|c| Arc::ptr_eq(&c.conn, &s.conn))
        });
        let mut started = Vec::new();
        for o in out {
            match o {
                Output::NewIkeSa(new) => {
                    let nspi = new.local_spi();
                    // After a collision the survivor is known later (Adopt), or the new
                    // SA is the loser, which deletes itself.
                    let current = !new.provisional && !new.redundant;
                    if current {
                        info!(
                            "ipsec {name}: IKE SA rekeyed ({:016x} -> {:016x})",
                            spi, nspi
                        );
                    }
                    self.sas.insert(nspi, *new);
                    if let Some(ci) = ci.filter(|_| current) {
                        self.connectors[ci].sa = Some(nspi);
                        self.connectors[ci].totals.ike_rekeys += 1;
                    }
                }
                Output::Adopt { spi: to, children } => {
                    info!("ipsec {name}: IKE SA rekeyed ({spi:016x} -> {to:016x}, the peer's)");
                    if let Some(new) = self.sas.get_mut(&to) {
                        new.children.extend(children);
                        new.provisional = false;
                        if let Some(ci) = ci {
                            self.connectors[ci].sa = Some(to);
                            self.connectors[ci].totals.ike_rekeys += 1;
                        }
                    }
                }
                Output::InboundFirst(c) => {
                    if let Some(ci) = ci {
                        let encap = self.sas.get(&spi).and_then(encap);
                        let [_, inbound] = self.sas_of(ci, &c, encap);
                        if let Some(x) = &mut self.xfrm {
                            if x.add_sa(&inbound).is_ok() {
                                self.inbound_first.insert(c.spi_in, (spi, inbound));
                            }
                        }
                    }
                }
                Output::Problem(why) => {
                    if let Some(ci) = ci {
                        let c = &mut self.connectors[ci];
                        if c.last_error.as_deref() != Some(why.as_str()) {
                            warn!("ipsec {name}: {why}");
                            c.last_error = Some(why);
                        }
                    }
                }
                Output::Reauth => {
                    if let Some(ci) = ci {
                        let conn = self.connectors[ci].conn.clone();
                        let (sa, out) = IkeSa::initiate_with(conn, false, Instant::now());
                        let nspi = sa.local_spi();
                        info!("ipsec {name}: reauthenticating: a new IKE SA beside {spi:016x}");
                        self.connectors[ci].reauth_old = Some(spi);
                        self.connectors[ci].sa = Some(nspi);
                        self.sas.insert(nspi, sa);
                        started.push((nspi, out));
                    }
                }
                Output::Send(m) => {
                    let (port, natt) = path(self);
                    // Moving to NAT-T: the peer's IKE port becomes 4500 (RFC 3948 §2.2).
                    let port = if natt && port == IKE_PORT {
                        NATT_PORT
                    } else {
                        port
                    };
                    self.send(local, SocketAddr::new(remote, port), natt, &m)
                        .await
                }
                Output::Established => {
                    let suite = self.sas.get(&spi).and_then(|s| s.suite());
                    info!(
                        "ipsec {name}: IKE SA established with {remote} ({})",
                        suite
                            .map(|s| format!("{:?}/{:?}/{:?}", s.encr, s.prf, s.dh))
                            .unwrap_or_default()
                    );
                    if let Some(ci) = ci {
                        self.connectors[ci].backoff = Duration::from_secs(1);
                        self.connectors[ci].last_error = None;
                    }
                }
                Output::ChildUp(c) => {
                    info!(
                        "ipsec {name}: CHILD SA {} in 0x{:08x} out 0x{:08x}, {} <-> {}",
                        c.suite.name(),
                        c.spi_in,
                        c.spi_out,
                        ts_list(&c.local_ts),
                        ts_list(&c.remote_ts)
                    );
                    if let Some(ci) = ci {
                        let encap = self.sas.get(&spi).and_then(encap);
                        // The peer rekeyed (we answered): our new outbound SA waits
                        // for the old one's DELETE, as strongSwan's does, so nothing is
                        // sent on keys the peer has not installed yet.
                        let rekey = self.connectors[ci]
                            .children
                            .iter()
                            .any(|(o, _)| o.local_ts == c.local_ts && o.remote_ts == c.remote_ts);
                        let defer = !c.initiator && rekey;
                        let ok = self.install(ci, &c, encap, !defer);
                        let k = &mut self.connectors[ci];
                        if defer {
                            k.out_pending.push((c.spi_in, Instant::now()));
                        }
                        if rekey {
                            k.totals.child_rekeys += 1;
                        }
                        k.children.push((c, ok));
                        if ok {
                            k.last_error = None;
                        }
                        if k.sa == Some(spi) {
                            if let Some(old) = k.reauth_old.take() {
                                k.retire = Some((old, Instant::now() + Duration::from_secs(1)));
                            }
                        }
                        if k.children.len() == 1 {
                            let _ = self.events.send(TunnelEvent::Up(ci));
                        }
                    }
                }
                Output::ChildDown { spi_in, .. } => {
                    if let Some(c) = ci.and_then(|ci| self.remove_child(ci, spi_in)) {
                        info!(
                            "ipsec {name}: CHILD SA in 0x{:08x} out 0x{:08x} deleted",
                            c.spi_in, c.spi_out
                        );
                    }
                }
                Output::Closed(why) => {
                    info!("ipsec {name}: IKE SA closed: {why}");
                    // An inbound SA installed for a CHILD SA that never came.
                    drop_inbound_first(&mut self.xfrm, &mut self.inbound_first, |_, ike| {
                        ike == spi
                    });
                    // An SA a rekey replaced closes without taking the connector down.
                    if let Some(ci) = ci.filter(|&ci| self.connectors[ci].sa == Some(spi)) {
                        let c = &mut self.connectors[ci];
                        c.sa = None;
                        if why.contains("DPD") {
                            c.totals.dpd_failures += 1;
                        }
                        if !why.contains("deleted by us") {
                            c.last_error = Some(why);
                        }
                        c.retry_at = Instant::now() + c.backoff;
                        c.backoff = (c.backoff * 2).min(Duration::from_secs(60));
                    }
                }
                Output::Note(what) => info!("ipsec {name}: {what}"),
                Output::Dropped(why) => {
                    self.dropped += 1;
                    log::debug!("ipsec {name}: dropped: {why}");
                    if why.starts_with("IKE SA up, but no CHILD SA") {
                        warn!("ipsec {name}: {why}");
                    }
                }
            }
        }
        if self.sas.get(&spi).is_some_and(|s| s.state == State::Closed) {
            self.sas.remove(&spi);
        }
        for (new, out) in started {
            Box::pin(self.apply(new, out)).await;
        }
    }

    /// The reqid of a CHILD SA's selector set.
    fn reqid_of(&mut self, ci: usize, c: &ChildSa) -> u32 {
        let k = &mut self.connectors[ci];
        let key = (c.local_ts.clone(), c.remote_ts.clone());
        if let Some((_, r)) = k.reqids.iter().find(|(t, _)| *t == key) {
            return *r;
        }
        let r = xnet_common::ipsec::reqid(k.index as u32, k.reqids.len() as u32);
        k.reqids.push((key, r));
        r
    }

    fn policies(&mut self, ci: usize, c: &ChildSa) -> Vec<xfrm::Policy> {
        let reqid = self.reqid_of(ci, c);
        let k = &self.connectors[ci];
        let (l, r) = (k.conn.local, k.conn.remote);
        let mut v = Vec::new();
        for lt in &c.local_ts {
            for rt in &c.remote_ts {
                if lt.start.is_ipv4() != rt.start.is_ipv4() {
                    continue;
                }
                v.push(xfrm::Policy {
                    src: *lt,
                    dst: *rt,
                    dir: xfrm::DIR_OUT,
                    tun_src: l,
                    tun_dst: r,
                    reqid,
                    priority: 1000,
                    if_id: k.if_id,
                });
                for dir in [xfrm::DIR_IN, xfrm::DIR_FWD] {
                    v.push(xfrm::Policy {
                        src: *rt,
                        dst: *lt,
                        dir,
                        tun_src: r,
                        tun_dst: l,
                        reqid,
                        priority: 1000,
                        if_id: k.if_id,
                    });
                }
            }
        }
        v
    }

    fn sas_of(&mut self, ci: usize, c: &ChildSa, encap: Option<(u16, u16)>) -> [xfrm::Sa; 2] {
        let reqid = self.reqid_of(ci, c);
        let k = &self.connectors[ci];
        let (l, r) = (k.conn.local, k.conn.remote);
        let (oe, oa) = c.out_keys();
        let (ie, ia) = c.in_keys();
        let sa = |src, dst, spi, e: &Secret, a: &Secret| xfrm::Sa {
            src,
            dst,
            spi,
            reqid,
            encr: c.suite.encr,
            integ: c.suite.integ,
            enc_key: e.clone(),
            auth_key: a.clone(),
            // The kernel expires an SA IKE failed to rekey or delete (agent gone).
            lifetime: k.conn.child_lifetime.as_secs() + k.conn.child_lifetime.as_secs() / 10 + 60,
            replay_window: 32,
            encap,
            if_id: k.if_id,
        };
        [sa(l, r, c.spi_out, oe, oa), sa(r, l, c.spi_in, ie, ia)]
    }

    /// Installs the deferred outbound SAs that `ready` picks (inbound SPI, since).
    fn release_outbound(&mut self, ci: usize, ready: impl Fn(u32, Instant) -> bool) {
        let k = &mut self.connectors[ci];
        let (go, wait): (Vec<_>, Vec<_>) =
            k.out_pending.drain(..).partition(|(s, t)| ready(*s, *t));
        k.out_pending = wait;
        for (spi, _) in go {
            let Some((c, _)) = self.connectors[ci]
                .children
                .iter()
                .find(|(c, _)| c.spi_in == spi)
                .cloned()
            else {
                continue;
            };
            let encap = self.encap_of(ci);
            let [out, _] = self.sas_of(ci, &c, encap);
            if let Some(x) = &mut self.xfrm {
                if let Err(e) = x.add_sa(&out) {
                    warn!(
                        "ipsec {}: the kernel refused the ESP SA 0x{:08x} ({e})",
                        self.connectors[ci].conn.name, out.spi
                    );
                }
            }
        }
    }

    /// UDP encapsulation of the connector's ESP (see `encap`).
    fn encap_of(&self, ci: usize) -> Option<(u16, u16)> {
        encap(self.connectors[ci].sa.and_then(|s| self.sas.get(&s))?)
    }

    /// Installs a CHILD SA's SAs (the outbound one only if `outbound`) and its policies;
    /// false if the kernel refused.
    fn install(
        &mut self,
        ci: usize,
        c: &ChildSa,
        encap: Option<(u16, u16)>,
        outbound: bool,
    ) -> bool {
        let mut sas = self.sas_of(ci, c, encap).to_vec();
        if let Some(f) = &mut self.keylog {
            for s in &sas {
                let _ = writeln!(
                    f,
                    "esp {} {} 0x{:08x} {} {} {}",
                    s.src,
                    s.dst,
                    s.spi,
                    c.suite.name(),
                    hex(s.enc_key.bytes()),
                    hex(s.auth_key.bytes())
                );
            }
        }
        if !outbound {
            sas.remove(0);
        }
        // Installed before IKE_AUTH: kept if it is this one (same reqid, keys, encap).
        if let Some((_, pre)) = self.inbound_first.remove(&c.spi_in) {
            let same = sas.last().is_some_and(|s| {
                (s.reqid, s.encap, s.encr, s.integ) == (pre.reqid, pre.encap, pre.encr, pre.integ)
                    && s.enc_key.bytes() == pre.enc_key.bytes()
            });
            if let Some(x) = &mut self.xfrm {
                if same {
                    sas.pop();
                } else {
                    let _ = x.del_sa(&pre.dst, pre.spi);
                }
            }
        }
        let policies = self.policies(ci, c);
        let name = self.connectors[ci].conn.name.clone();
        let Some(x) = &mut self.xfrm else {
            return false;
        };
        let mut ok = true;
        for s in &sas {
            if let Err(e) = x.add_sa(s) {
                ok = false;
                if !self.esp_missing_logged {
                    warn!("ipsec {name}: the kernel refused the ESP SA 0x{:08x} ({e}); without ESP in the kernel (esp4/esp6, the cipher modules) tunnels are negotiated but carry no traffic", s.spi);
                    self.esp_missing_logged = true;
                }
            }
        }
        for p in &policies {
            if let Err(e) = x.add_policy(p) {
                warn!(
                    "ipsec {name}: XFRM policy {} -> {}: {e}",
                    ts_list(&[p.src]),
                    ts_list(&[p.dst])
                );
            }
        }
        ok
    }

    fn uninstall(&mut self, ci: usize, c: &ChildSa) {
        let sas = self.sas_of(ci, c, None);
        let policies = self.policies(ci, c);
        let Some(x) = &mut self.xfrm else { return };
        let [out, inb] = &sas;
        let _ = x.del_sa(&out.dst, out.spi);
        self.late_deletes
            .push((inb.dst, inb.spi, Instant::now() + INBOUND_GRACE));
        // Another CHILD SA of the connector may still use the same policies.
        let still = self.connectors[ci]
            .children
            .iter()
            .any(|(o, _)| o.local_ts == c.local_ts && o.remote_ts == c.remote_ts);
        if !still {
            for p in &policies {
                let _ = x.del_policy(p);
            }
        }
    }

    /// Deletes the inbound SAs whose grace is over (all of them when `all`).
    fn late_deletes(&mut self, now: Instant, all: bool) {
        let Some(x) = &mut self.xfrm else { return };
        self.late_deletes.retain(|(dst, spi, t)| {
            let due = all || now >= *t;
            if due {
                let _ = x.del_sa(dst, *spi);
            }
            !due
        });
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        self.late_deletes(now, false);
        self.each_sa(|sa| sa.on_tick(now)).await;
        // Inbound SAs installed before IKE_AUTH whose CHILD SA did not come (refused).
        drop_inbound_first(&mut self.xfrm, &mut self.inbound_first, |spi_in, ike| {
            self.sas.get(&ike).is_none_or(|s| {
                s.state == State::Established && !s.children.iter().any(|c| c.spi_in == spi_in)
            })
        });
        // A peer that never deletes the old SA after its rekey (or lost the DELETE): the
        // new outbound SA goes in after a while all the same.
        for ci in 0..self.connectors.len() {
            self.release_outbound(ci, |_, t| now.duration_since(t) > Duration::from_secs(5));
        }
        for ci in 0..self.connectors.len() {
            let k = &mut self.connectors[ci];
            let Some((old, _)) = k.retire.filter(|(_, t)| now >= *t) else {
                continue;
            };
            k.retire = None;
            if let Some(sa) = self.sas.get_mut(&old) {
                info!(
                    "ipsec {}: reauthenticated: the old IKE SA {old:016x} goes",
                    k.conn.name
                );
                let out = sa.delete(now);
                self.apply(old, out).await;
            }
        }
        for spi_in in self.read_counters() {
            let owner = self
                .sas
                .iter()
                .find(|(_, sa)| sa.children.iter().any(|c| c.spi_in == spi_in))
                .map(|(k, _)| *k);
            match owner {
                Some(k) => {
                    let out = self.sas.get_mut(&k).unwrap().child_expired(spi_in, now);
                    self.apply(k, out).await;
                }
                // No IKE SA has it any more: only the kernel's view is left to clean.
                None => self.forget_child(spi_in),
            }
        }
        for ci in 0..self.connectors.len() {
            let c = &self.connectors[ci];
            if c.retired || !c.initiate || c.sa.is_some() || now < c.retry_at {
                continue;
            }
            // Beside an SA a reauthentication replaces, INITIAL_CONTACT would make the
            // peer drop that one before the new one is up.
            let alone = c.reauth_old.is_none_or(|o| !self.sas.contains_key(&o));
            let (sa, out) = IkeSa::initiate_with(c.conn.clone(), alone, now);
            let spi = sa.local_spi();
            info!("ipsec {}: initiating to {}", c.conn.name, c.conn.remote);
            self.connectors[ci].sa = Some(spi);
            // Until it is up, a failure retries with back-off.
            let c = &mut self.connectors[ci];
            c.retry_at = now + c.backoff;
            self.sas.insert(spi, sa);
            self.apply(spi, out).await;
        }
    }

    /// Takes a CHILD SA out of connector `ci` and XFRM (its successor's deferred outbound
    /// SA goes in first); the tunnel is down when it was the last.
    fn remove_child(&mut self, ci: usize, spi_in: u32) -> Option<ChildSa> {
        let k = &mut self.connectors[ci];
        let pos = k.children.iter().position(|(c, _)| c.spi_in == spi_in)?;
        let (c, _) = k.children.remove(pos);
        // Its traffic stays in the connector's totals.
        let t = &mut k.totals;
        for (spi, bytes, packets) in [
            (c.spi_in, &mut t.bytes_in, &mut t.packets_in),
            (c.spi_out, &mut t.bytes_out, &mut t.packets_out),
        ] {
            if let Some((b, p)) = self.counters.remove(&spi) {
                *bytes += b;
                *packets += p;
            }
        }
        if k.children.is_empty() {
            let _ = self.events.send(TunnelEvent::Down(ci));
        }
        k.out_pending.retain(|(s, _)| *s != c.spi_in);
        let ready: Vec<u32> = k
            .children
            .iter()
            .filter(|(o, _)| o.local_ts == c.local_ts && o.remote_ts == c.remote_ts)
            .map(|(o, _)| o.spi_in)
            .collect();
        self.release_outbound(ci, |spi, _| ready.contains(&spi));
        self.uninstall(ci, &c);
        Some(c)
    }

    /// A CHILD SA no IKE SA knows any more leaves XFRM and its connector.
    fn forget_child(&mut self, spi_in: u32) {
        for ci in 0..self.connectors.len() {
            self.remove_child(ci, spi_in);
        }
    }

    /// Reads the kernel's counters of every installed SA; returns the CHILD SAs (by
    /// inbound SPI) of which the kernel no longer has an SA: it expired them (their hard
    /// lifetime passed) or someone deleted them.
    fn read_counters(&mut self) -> Vec<u32> {
        self.counters.clear();
        let mut gone = Vec::new();
        let Some(x) = &mut self.xfrm else {
            return gone;
        };
        for c in &self.connectors {
            for (ch, installed) in &c.children {
                if !installed {
                    continue;
                }
                let waiting = c.out_pending.iter().any(|(s, _)| *s == ch.spi_in);
                for (dst, spi) in [(c.conn.local, ch.spi_in), (c.conn.remote, ch.spi_out)] {
                    if waiting && spi == ch.spi_out {
                        continue;
                    }
                    match x.sa_counters(&dst, spi) {
                        Ok(v) => {
                            self.counters.insert(spi, v);
                        }
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {
                            if !gone.contains(&ch.spi_in) {
                                gone.push(ch.spi_in);
                            }
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        gone
    }

    fn publish(&self) {
        let mut v = Vec::new();
        for c in self.connectors.iter().filter(|c| !c.retired) {
            let sa = c.sa.and_then(|s| self.sas.get(&s));
            v.push(IpsecStatus {
                name: c.conn.name.clone(),
                segment: c.segment.clone(),
                local: c.conn.local.to_string(),
                remote: c.conn.remote.to_string(),
                dpd_bound_secs: if c.conn.dpd.interval.is_zero() {
                    0
                } else {
                    c.conn.dpd.bound().as_secs()
                },
                state: match sa.map(|s| s.state) {
                    None => "down".into(),
                    // Up means carrying traffic: an IKE SA alone does not.
                    Some(State::Established) if c.children.is_empty() => "no-child-sa".into(),
                    Some(State::Established) => "established".into(),
                    Some(State::Deleting) => "deleting".into(),
                    Some(_) => "connecting".into(),
                },
                ike_proposal: sa.and_then(|s| s.suite()).map(|s| {
                    Suite {
                        encr: s.encr,
                        prf: Some(s.prf),
                        integ: s.integ,
                        dh: Some(s.dh),
                    }
                    .name()
                }),
                natt: sa.is_some_and(|s| s.natt),
                uptime_secs: sa
                    .and_then(|s| s.established_at)
                    .map(|t| t.elapsed().as_secs())
                    .unwrap_or(0),
                children: c
                    .children
                    .iter()
                    .map(|(ch, installed)| IpsecChildStatus {
                        spi_in: format!("0x{:08x}", ch.spi_in),
                        spi_out: format!("0x{:08x}", ch.spi_out),
                        proposal: ch.suite.name(),
                        local_ts: ts_list(&ch.local_ts),
                        remote_ts: ts_list(&ch.remote_ts),
                        installed: *installed,
                        bytes_in: self.counters.get(&ch.spi_in).map(|c| c.0).unwrap_or(0),
                        packets_in: self.counters.get(&ch.spi_in).map(|c| c.1).unwrap_or(0),
                        bytes_out: self.counters.get(&ch.spi_out).map(|c| c.0).unwrap_or(0),
                        packets_out: self.counters.get(&ch.spi_out).map(|c| c.1).unwrap_or(0),
                    })
                    .collect(),
                last_error: c.last_error.clone(),
                dropped: self.dropped,
                totals: {
                    let t = c.totals;
                    let current = |spi: fn(&ChildSa) -> u32| {
                        c.children.iter().fold((0, 0), |(b, p), (ch, _)| {
                            let (cb, cp) = self.counters.get(&spi(ch)).copied().unwrap_or((0, 0));
                            (b + cb, p + cp)
                        })
                    };
                    let (bi, pi) = current(|c| c.spi_in);
                    let (bo, po) = current(|c| c.spi_out);
                    IpsecTotals {
                        ike_rekeys: t.ike_rekeys,
                        child_rekeys: t.child_rekeys,
                        dpd_failures: t.dpd_failures,
                        bytes_in: t.bytes_in + bi,
                        bytes_out: t.bytes_out + bo,
                        packets_in: t.packets_in + pi,
                        packets_out: t.packets_out + po,
                    }
                },
            });
        }
        *self.status.lock().unwrap() = v;
    }
}

/// Deletes the inbound SAs installed before IKE_AUTH (`Daemon::inbound_first`) that
/// `gone(inbound SPI, IKE SA)` picks.
fn drop_inbound_first(
    xfrm: &mut Option<Xfrm>,
    early: &mut HashMap<u32, (u64, xfrm::Sa)>,
    gone: impl Fn(u32, u64) -> bool,
) {
    let Some(x) = xfrm else { return };
    early.retain(|spi_in, (ike, sa)| {
        let drop = gone(*spi_in, *ike);
        if drop {
            let _ = x.del_sa(&sa.dst, sa.spi);
        }
        !drop
    });
}

/// UDP encapsulation of an IKE SA's ESP: (our port, the peer's), only across a NAT (or
/// forced): a peer on 4500 without one (strongSwan moves there for MOBIKE) sends plain ESP.
fn encap(sa: &IkeSa) -> Option<(u16, u16)> {
    let peer = if sa.remote_port == IKE_PORT {
        NATT_PORT
    } else {
        sa.remote_port
    };
    sa.nat_detected.then_some((NATT_PORT, peer))
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn ts_list(ts: &[TrafficSelector]) -> String {
    ts.iter()
        .map(|t| match t.to_net() {
            Some(n) => n.to_string(),
            None => format!("{}-{}", t.start, t.end),
        })
        .collect::<Vec<_>>()
        .join(",")
}
