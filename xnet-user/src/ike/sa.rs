//! One IKE SA as a state machine without I/O: it takes datagrams and clock ticks and
//! returns what to send and what happened (CHILD SAs up or down, the SA closed), so the
//! daemon owns sockets and XFRM and tests can run two of these against each other.
//!
//! Covered: IKE_SA_INIT (with INVALID_KE_PAYLOAD and COOKIE retries), IKE_AUTH with PSK
//! and the first CHILD SA (traffic selectors narrowed to the config), INFORMATIONAL
//! (DPD liveness checks, DELETE of CHILD and IKE SAs in both directions), a message-ID
//! window of one with retransmission of the last response, and retransmission of our
//! requests with back-off. Anything that does not decode, decrypt or authenticate is
//! dropped and counted; it never changes state.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::crypto::{self, ChildKeys, Dh, IkeKeys, IkeSuite, Secret, SkCipher};
use super::packet::*;
use super::proposal::{self, Suite};

mod rekey;
use rekey::Rekey;

/// How a connector authenticates (both ends the same way).
#[derive(Debug, Clone)]
pub enum Auth {
    Psk(Secret),
    Cert(Arc<super::cert::Credentials>),
}

/// A connector as the state machine needs it.
#[derive(Debug, Clone)]
pub struct Conn {
    pub name: String,
    pub local: IpAddr,
    pub remote: IpAddr,
    pub auth: Auth,
    /// Our ID (type, data) and the one the peer must show (None: any; the PSK decides).
    pub local_id: (u8, Vec<u8>),
    pub remote_id: Option<(u8, Vec<u8>)>,
    pub ike: Vec<Suite>,
    pub esp: Vec<Suite>,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    /// Liveness checks (DPD).
    pub dpd: Dpd,
    /// Use UDP encapsulation (port 4500) even without a NAT, by making our NAT detection
    /// hash not match (what strongSwan's `encap = yes` does): for paths that drop ESP.
    pub force_encap: bool,
    /// Age at which we rekey a CHILD SA, and the IKE SA.
    pub child_lifetime: Duration,
    pub ike_lifetime: Duration,
    /// We start this connector (and so re-create its CHILD SA when it has none).
    pub initiate: bool,
}

/// Dead-peer detection: after `interval` without a word from the peer we send an empty
/// INFORMATIONAL, resent every `retransmit` up to `retries` times; no answer to any of
/// them and the peer is dead (RFC 7296 §2.4). Azure's gateways have no BFD: this is how a
/// dead one is noticed, within `bound()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dpd {
    /// Zero: no liveness checks.
    pub interval: Duration,
    pub retransmit: Duration,
    pub retries: u32,
}

impl Dpd {
    pub const OFF: Dpd = Dpd {
        interval: Duration::ZERO,
        retransmit: Duration::from_secs(2),
        retries: 4,
    };

    /// The longest a silent peer can go before we declare it dead.
    pub fn bound(&self) -> Duration {
        self.interval + self.retransmit * (self.retries + 1)
    }
}

impl Conn {
    /// The kernel's hard lifetime of a CHILD SA's XFRM states: it expires an SA that IKE
    /// failed to rekey or delete (an agent gone), well after the rekey is due.
    pub fn child_hard_lifetime(&self) -> Duration {
        self.child_lifetime + self.child_lifetime / 10 + Duration::from_secs(60)
    }
}

/// NAT detection hash (RFC 7296 §2.23): SHA-1(SPIi | SPIr | IP | port).
fn nat_hash(spi_i: u64, spi_r: u64, ip: IpAddr, port: u16) -> Vec<u8> {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(spi_i.to_be_bytes());
    h.update(spi_r.to_be_bytes());
    match ip {
        IpAddr::V4(a) => h.update(a.octets()),
        IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update(port.to_be_bytes());
    h.finalize().to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Responder: IKE_SA_INIT answered, waiting for IKE_AUTH.
    InitDone,
    /// Initiator: IKE_AUTH sent.
    AuthSent,
    Established,
    /// Our DELETE of the IKE SA is out.
    Deleting,
    Closed,
}

/// Why an IKE_SA_INIT request made no SA: a stateless answer to send (or None to drop)
/// and the reason.
pub type Refused = (Option<Vec<u8>>, String);

/// A negotiated CHILD SA (ESP, tunnel mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSa {
    /// SPI of the SA that carries traffic to us (we chose it) and from us.
    pub spi_in: u32,
    pub spi_out: u32,
    pub suite: Suite,
    pub keys: ChildKeys,
    /// We were the initiator of the exchange that made it (decides which keys go out).
    pub initiator: bool,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    pub created: Instant,
}

impl ChildSa {
    /// (encryption key, integrity key) of the outbound SA.
    pub fn out_keys(&self) -> (&Secret, &Secret) {
        if self.initiator {
            (&self.keys.encr_i, &self.keys.integ_i)
        } else {
            (&self.keys.encr_r, &self.keys.integ_r)
        }
    }
    pub fn in_keys(&self) -> (&Secret, &Secret) {
        if self.initiator {
            (&self.keys.encr_r, &self.keys.integ_r)
        } else {
            (&self.keys.encr_i, &self.keys.integ_i)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Send(Vec<u8>),
    /// The inbound SA of the first CHILD SA we expect (its outbound SPI still unknown):
    /// to install before IKE_AUTH goes out; `ChildUp` follows with the same inbound SPI,
    /// or the IKE SA closes.
    InboundFirst(ChildSa),
    /// A rekey made this IKE SA's successor (it took the CHILD SAs); the old one closes.
    NewIkeSa(Box<IkeSa>),
    Established,
    ChildUp(ChildSa),
    ChildDown {
        spi_in: u32,
        spi_out: u32,
    },
    /// The IKE SA is gone; why.
    Closed(String),
    /// Something the operator must see (a tunnel that carries nothing, a refused rekey):
    /// logged at WARN once and shown as the connector's last error.
    Problem(String),
    /// CREATE_CHILD_SA keeps failing: start a new IKE SA (and CHILD SA) beside this one,
    /// which goes when the new one carries traffic.
    Reauth,
    /// A simultaneous IKE SA rekey (§2.8.2) left the peer's new IKE SA (our SPI `spi`)
    /// as the survivor: it takes these CHILD SAs.
    Adopt {
        spi: u64,
        children: Vec<ChildSa>,
    },
    /// A message was dropped (malformed, not authentic, unexpected); why.
    Dropped(String),
    /// Worth a line in the log; nothing else to do.
    Note(String),
}

struct Pending {
    id: u32,
    msg: Vec<u8>,
    sent: Instant,
    tries: u32,
    /// A liveness check: resent at the connector's DPD interval and count, not with the
    /// back-off of other requests.
    liveness: bool,
}

/// Sends of a request before the peer counts as dead: after 0.5, 1, 2, 4 and 8 s.
const TRIES: u32 = 5;

pub struct IkeSa {
    pub conn: Arc<Conn>,
    pub initiator: bool,
    pub spi_i: u64,
    pub spi_r: u64,
    pub state: State,
    suite: Option<IkeSuite>,
    dh: Option<Dh>,
    keys: Option<IkeKeys>,
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// The IKE_SA_INIT request and response, as they were on the wire (both AUTHs sign one).
    msg1: Vec<u8>,
    msg2: Vec<u8>,
    next_id: u32,
    expect_id: u32,
    pending: Option<Pending>,
    last_response: Option<(u32, Vec<u8>)>,
    /// SPI we offer for the first CHILD SA.
    child_spi: u32,
    pub children: Vec<ChildSa>,
    pub last_heard: Instant,
    pub established_at: Option<Instant>,
    /// NAT-T: from IKE_AUTH on, IKE and ESP go over UDP 4500 (ESP encapsulated).
    pub natt: bool,
    /// The peer's UDP port as we last saw it (500, 4500, or what a NAT made of it).
    pub remote_port: u16,
    /// The NAT detection notifies showed a NAT (or forced encapsulation).
    pub nat_detected: bool,
    rekey: Option<Rekey>,
    /// The peer rekeyed the CHILD SA we are rekeying (§2.8.1): the lower nonce of its
    /// exchange, to find the redundant new SA when ours completes.
    rekey_collision: Option<Vec<u8>>,
    /// The peer rekeyed this IKE SA while we were rekeying it (§2.8.2): its new SA (our
    /// SPI there) and the lower nonce of its exchange.
    ike_collision: Option<(u64, Vec<u8>)>,
    /// Our CREATE_CHILD_SA requests refused in a row, and when we may ask again.
    failures: u32,
    retry_at: Option<Instant>,
    /// `Output::Reauth` was given: no more CREATE_CHILD_SA from this SA.
    reauth_asked: bool,
    /// CHILD SAs (our inbound SPIs) removed while a request was in flight, whose DELETE
    /// goes out when the window of one is free.
    delete_queue: Vec<u32>,
    /// Whether IKE_AUTH carries INITIAL_CONTACT (not when we reauthenticate beside an SA
    /// that must live until the new one is up).
    pub initial_contact: bool,
    /// A new SA from a colliding IKE rekey, not yet known to survive (§2.8.2).
    pub provisional: bool,
    /// A new SA that lost an IKE rekey collision: we delete it.
    pub redundant: bool,
    /// A rekey made this SA's successor: it only waits to be deleted.
    superseded: bool,
}

impl std::fmt::Debug for IkeSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IkeSa({:016x}/{:016x} {:?})",
            self.spi_i, self.spi_r, self.state
        )
    }
}

impl PartialEq for IkeSa {
    fn eq(&self, o: &Self) -> bool {
        (self.spi_i, self.spi_r) == (o.spi_i, o.spi_r)
    }
}

impl Eq for IkeSa {}

fn nonzero_u64() -> u64 {
    loop {
        let v = u64::from_be_bytes(crypto::random(8).try_into().unwrap());
        if v != 0 {
            return v;
        }
    }
}

/// A random SPI outside 1–255 (reserved by IANA).
pub fn new_esp_spi() -> u32 {
    loop {
        let v = u32::from_be_bytes(crypto::random(4).try_into().unwrap());
        if v > 255 {
            return v;
        }
    }
}

fn notify_name(n: u16) -> String {
    match n {
        N_NO_PROPOSAL_CHOSEN => "NO_PROPOSAL_CHOSEN".into(),
        N_AUTHENTICATION_FAILED => "AUTHENTICATION_FAILED".into(),
        N_TS_UNACCEPTABLE => "TS_UNACCEPTABLE".into(),
        N_INVALID_SYNTAX => "INVALID_SYNTAX".into(),
        N_INVALID_KE_PAYLOAD => "INVALID_KE_PAYLOAD".into(),
        N_NO_ADDITIONAL_SAS => "NO_ADDITIONAL_SAS".into(),
        N_TEMPORARY_FAILURE => "TEMPORARY_FAILURE".into(),
        N_CHILD_SA_NOT_FOUND => "CHILD_SA_NOT_FOUND".into(),
        other => format!("notify {other}"),
    }
}

/// The part of `a` inside `b` (same family; ports and protocol intersected too).
fn intersect(a: &TrafficSelector, b: &TrafficSelector) -> Option<TrafficSelector> {
    if a.start.is_ipv4() != b.start.is_ipv4() {
        return None;
    }
    let protocol = match (a.protocol, b.protocol) {
        (0, p) | (p, 0) => p,
        (x, y) if x == y => x,
        _ => return None,
    };
    let start = a.start.max(b.start);
    let end = a.end.min(b.end);
    let start_port = a.start_port.max(b.start_port);
    let end_port = a.end_port.min(b.end_port);
    (start <= end && start_port <= end_port).then_some(TrafficSelector {
        protocol,
        start_port,
        end_port,
        start,
        end,
    })
}

/// Whether a peer's ID is the configured one (DNs by their text: encodings differ).
fn same_id(conf: &(u8, Vec<u8>), got: &(u8, Vec<u8>)) -> bool {
    if conf.0 == ID_DER_ASN1_DN && got.0 == ID_DER_ASN1_DN {
        return super::cert::same_dn(&conf.1, &got.1);
    }
    conf == got
}

/// Narrowing (§2.9): what of the peer's selectors our config allows.
pub fn narrow(theirs: &[TrafficSelector], ours: &[TrafficSelector]) -> Vec<TrafficSelector> {
    let mut out = Vec::new();
    for t in theirs {
        for o in ours {
            if let Some(x) = intersect(t, o) {
                if !out.contains(&x) {
                    out.push(x);
                }
            }
        }
    }
    out
}

impl IkeSa {
    fn new(conn: Arc<Conn>, initiator: bool) -> Self {
        IkeSa {
            conn,
            initiator,
            spi_i: 0,
            spi_r: 0,
            state: State::InitSent,
            suite: None,
            dh: None,
            keys: None,
            ni: Vec::new(),
            nr: Vec::new(),
            msg1: Vec::new(),
            msg2: Vec::new(),
            next_id: 0,
            expect_id: 0,
            pending: None,
            last_response: None,
            child_spi: new_esp_spi(),
            children: Vec::new(),
            last_heard: Instant::now(),
            established_at: None,
            natt: false,
            remote_port: 500,
            nat_detected: false,
            rekey: None,
            rekey_collision: None,
            ike_collision: None,
            failures: 0,
            retry_at: None,
            reauth_asked: false,
            delete_queue: Vec::new(),
            initial_contact: true,
            provisional: false,
            redundant: false,
            superseded: false,
        }
    }

    /// Our NAT detection notifies for an IKE_SA_INIT message with the current SPIs.
    fn nat_payloads(&self) -> [Payload; 2] {
        let src = if self.conn.force_encap {
            crypto::random(20)
        } else {
            nat_hash(self.spi_i, self.spi_r, self.conn.local, 500)
        };
        let dst = nat_hash(self.spi_i, self.spi_r, self.conn.remote, self.remote_port);
        [
            Payload::notify(N_NAT_DETECTION_SOURCE_IP, src),
            Payload::notify(N_NAT_DETECTION_DESTINATION_IP, dst),
        ]
    }

    /// Whether the peer's NAT detection notifies (if it sent any) show a NAT between us,
    /// for a message with these SPIs that came from `remote_port`.
    fn nat_between(&self, payloads: &[Payload], spi_i: u64, spi_r: u64) -> bool {
        let src = payloads.notify(N_NAT_DETECTION_SOURCE_IP);
        let dst = payloads.notify(N_NAT_DETECTION_DESTINATION_IP);
        let (Some(src), Some(dst)) = (src, dst) else {
            return false;
        };
        let peer_natted =
            src != nat_hash(spi_i, spi_r, self.conn.remote, self.remote_port).as_slice();
        let we_natted = dst != nat_hash(spi_i, spi_r, self.conn.local, 500).as_slice();
        peer_natted || we_natted || self.conn.force_encap
    }

    /// RFC 7427 §4: with a certificate, the hashes we take in signatures (SHA2-256, -384,
    /// -512), so the peer signs with method 14.
    fn signature_hashes(&self) -> Option<Payload> {
        matches!(self.conn.auth, Auth::Cert(_))
            .then(|| Payload::notify(N_SIGNATURE_HASH_ALGORITHMS, vec![0, 2, 0, 3, 0, 4]))
    }

    /// Our SPI: how the daemon finds this SA for an incoming message.
    pub fn local_spi(&self) -> u64 {
        if self.initiator {
            self.spi_i
        } else {
            self.spi_r
        }
    }

    pub fn suite(&self) -> Option<IkeSuite> {
        self.suite
    }

    /// Starts an SA as initiator: the IKE_SA_INIT request.
    pub fn initiate(conn: Arc<Conn>, now: Instant) -> (IkeSa, Vec<Output>) {
        Self::initiate_with(conn, true, now)
    }

    /// `initiate`; `initial_contact` false when another IKE SA with the peer must live on
    /// until this one is up (reauthentication, make-before-break).
    pub fn initiate_with(
        conn: Arc<Conn>,
        initial_contact: bool,
        now: Instant,
    ) -> (IkeSa, Vec<Output>) {
        let mut sa = IkeSa::new(conn, true);
        sa.initial_contact = initial_contact;
        sa.spi_i = nonzero_u64();
        let group = sa.conn.ike[0].dh.expect("IKE suites have a group");
        let out = sa.send_init(group, None, now);
        (sa, out)
    }

    fn send_init(
        &mut self,
        group: crypto::DhGroup,
        cookie: Option<Vec<u8>>,
        now: Instant,
    ) -> Vec<Output> {
        let dh = Dh::new(group);
        self.ni = crypto::random(32);
        let proposals = self
            .conn
            .ike
            .iter()
            .enumerate()
            .map(|(i, s)| s.proposal(i as u8 + 1, true, Vec::new()))
            .collect();
        let mut payloads = Vec::new();
        if let Some(c) = cookie {
            payloads.push(Payload::notify(N_COOKIE, c));
        }
        payloads.push(Payload::Sa(proposals));
        payloads.push(Payload::Ke {
            group: group.id(),
            data: dh.public.clone(),
        });
        payloads.push(Payload::Nonce(self.ni.clone()));
        payloads.extend(self.nat_payloads());
        payloads.extend(self.signature_hashes());
        self.dh = Some(dh);
        let msg = self.plain(IKE_SA_INIT, false, 0, &payloads);
        self.msg1 = msg.clone();
        self.state = State::InitSent;
        self.next_id = 1;
        self.request(0, msg, now)
    }

    fn request(&mut self, id: u32, msg: Vec<u8>, now: Instant) -> Vec<Output> {
        self.pending = Some(Pending {
            id,
            msg: msg.clone(),
            sent: now,
            tries: 0,
            liveness: false,
        });
        vec![Output::Send(msg)]
    }

    fn header(&self, exchange: u8, response: bool, id: u32, next: u8, length: usize) -> Header {
        let mut flags = 0;
        if self.initiator {
            flags |= FLAG_INITIATOR;
        }
        if response {
            flags |= FLAG_RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next,
            exchange,
            flags,
            message_id: id,
            length: length as u32,
        }
    }

    fn plain(&self, exchange: u8, response: bool, id: u32, payloads: &[Payload]) -> Vec<u8> {
        let (first, body) = encode_payloads(payloads);
        let h = self.header(exchange, response, id, first, HEADER_LEN + body.len());
        [h.encode().to_vec(), body].concat()
    }

    fn cipher(&self, from_initiator: bool) -> SkCipher<'_> {
        let s = self.suite.expect("keys exist");
        let k = self.keys.as_ref().expect("keys exist");
        let (ek, ak) = if from_initiator {
            (&k.ei, &k.ai)
        } else {
            (&k.er, &k.ar)
        };
        SkCipher {
            encr: s.encr,
            integ: s.integ,
            ek: ek.bytes(),
            ak: ak.bytes(),
        }
    }

    fn encrypted(&self, exchange: u8, response: bool, id: u32, payloads: &[Payload]) -> Vec<u8> {
        let (first, inner) = encode_payloads(payloads);
        let c = self.cipher(self.initiator);
        let body_len = c.sealed_len(inner.len());
        let h = self.header(exchange, response, id, PT_SK, HEADER_LEN + 4 + body_len);
        let mut aad = h.encode().to_vec();
        aad.extend_from_slice(&[first, 0]);
        aad.extend_from_slice(&((4 + body_len) as u16).to_be_bytes());
        let body = c.seal(&aad, &inner);
        debug_assert_eq!(body.len(), body_len);
        [aad, body].concat()
    }

    fn decrypt(&self, msg: &[u8], h: &Header) -> Result<Vec<Payload>, String> {
        let (_, enc) =
            decode_payloads(h.next, &msg[HEADER_LEN..], HEADER_LEN).map_err(|e| e.to_string())?;
        let enc = enc.ok_or("no Encrypted payload")?;
        let aad_end = enc.offset + 4;
        let c = self.cipher(h.from_initiator());
        let plain = c
            .open(&msg[..aad_end], &msg[aad_end..])
            .ok_or("Encrypted payload does not authenticate")?;
        let (payloads, inner) = decode_payloads(enc.first, &plain, 0).map_err(|e| e.to_string())?;
        if inner.is_some() {
            return Err("Encrypted payload inside an Encrypted payload".into());
        }
        Ok(payloads)
    }

    /// Responder: a new SA from an IKE_SA_INIT request. Err carries a stateless answer
    /// (INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN) or None to drop.
    pub fn respond(
        conn: Arc<Conn>,
        msg: &[u8],
        remote_port: u16,
        now: Instant,
    ) -> Result<(IkeSa, Vec<Output>), Refused> {
        let h = Header::decode(msg).map_err(|e| (None, e.to_string()))?;
        if h.exchange != IKE_SA_INIT || h.is_response() || h.message_id != 0 || h.spi_r != 0 {
            return Err((None, "not an IKE_SA_INIT request".into()));
        }
        let (payloads, _) = decode_payloads(h.next, &msg[HEADER_LEN..], HEADER_LEN)
            .map_err(|e| (None, e.to_string()))?;
        let mut sa = IkeSa::new(conn, false);
        sa.spi_i = h.spi_i;
        sa.remote_port = remote_port;
        // The initiator moves to 4500 if it sees the NAT too; we follow when it does
        // (the daemon sets `natt` on the first message over 4500).
        sa.nat_detected = sa.nat_between(&payloads, h.spi_i, 0);
        let answer = |sa: &IkeSa, kind: u16, data: Vec<u8>| {
            sa.plain(IKE_SA_INIT, true, 0, &[Payload::notify(kind, data)])
        };
        let offer = payloads
            .sa()
            .ok_or((None, "IKE_SA_INIT without SA".to_string()))?;
        let Some((chosen, suite)) = proposal::choose(offer, &sa.conn.ike, true) else {
            return Err((
                Some(answer(&sa, N_NO_PROPOSAL_CHOSEN, Vec::new())),
                "no acceptable IKE proposal".into(),
            ));
        };
        let group = suite.dh.unwrap();
        let (kg, kdata) = payloads
            .ke()
            .ok_or((None, "IKE_SA_INIT without KE".to_string()))?;
        if kg != group.id() {
            return Err((
                Some(answer(
                    &sa,
                    N_INVALID_KE_PAYLOAD,
                    group.id().to_be_bytes().to_vec(),
                )),
                format!("peer sent a KE of group {kg}, we chose {}", group.id()),
            ));
        }
        sa.ni = payloads
            .nonce()
            .ok_or((None, "IKE_SA_INIT without nonce".to_string()))?
            .to_vec();
        let dh = Dh::new(group);
        let shared = dh.shared(kdata).map_err(|e| (None, e.to_string()))?;
        sa.spi_r = nonzero_u64();
        sa.nr = crypto::random(32);
        let s = IkeSuite {
            encr: suite.encr,
            prf: suite.prf.unwrap(),
            integ: suite.integ,
            dh: group,
        };
        sa.suite = Some(s);
        let mut resp_prop = suite.proposal(chosen.num, true, Vec::new());
        resp_prop.num = chosen.num;
        let mut out = vec![
            Payload::Sa(vec![resp_prop]),
            Payload::Ke {
                group: group.id(),
                data: dh.public.clone(),
            },
            Payload::Nonce(sa.nr.clone()),
        ];
        if payloads.notify(N_NAT_DETECTION_SOURCE_IP).is_some() {
            out.extend(sa.nat_payloads());
        }
        out.extend(sa.certreq());
        out.extend(sa.signature_hashes());
        let resp = sa.plain(IKE_SA_INIT, true, 0, &out);
        sa.keys = Some(IkeKeys::derive(&s, &shared, &sa.ni, &sa.nr, &sa.spis()));
        sa.msg1 = msg.to_vec();
        sa.msg2 = resp.clone();
        sa.expect_id = 1;
        sa.next_id = 0;
        sa.state = State::InitDone;
        sa.last_response = Some((0, resp.clone()));
        sa.last_heard = now;
        Ok((sa, vec![Output::Send(resp)]))
    }

    fn spis(&self) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&self.spi_i.to_be_bytes());
        s[8..].copy_from_slice(&self.spi_r.to_be_bytes());
        s
    }

    /// The octets an AUTH covers (§2.15): the IKE_SA_INIT message, the other side's
    /// nonce, prf(SK_p, ID body).
    fn signed_octets(&self, of_initiator: bool, id: &(u8, Vec<u8>)) -> Vec<u8> {
        let s = self.suite.unwrap();
        let k = self.keys.as_ref().unwrap();
        let (msg, nonce, skp) = if of_initiator {
            (&self.msg1, &self.nr, &k.pi)
        } else {
            (&self.msg2, &self.ni, &k.pr)
        };
        let maced = s.prf.prf(skp.bytes(), &[&id_body(id.0, &id.1)]);
        [msg.as_slice(), nonce, &maced].concat()
    }

    /// Our AUTH payload, and our certificate before it when we use one.
    fn our_auth(&self, of_initiator: bool, id: &(u8, Vec<u8>)) -> Vec<Payload> {
        let octets = self.signed_octets(of_initiator, id);
        match &self.conn.auth {
            // prf(prf(PSK, "Key Pad for IKEv2"), octets)
            Auth::Psk(k) => vec![Payload::Auth {
                method: AUTH_PSK,
                data: crypto::psk_auth(self.suite.unwrap().prf, k.bytes(), &octets),
            }],
            // Our certificate first, then the intermediate CAs up to the peer's anchor.
            Auth::Cert(c) => std::iter::once(&c.cert)
                .chain(&c.chain)
                .map(|d| Payload::Cert {
                    request: false,
                    encoding: super::cert::CERT_X509,
                    data: d.clone(),
                })
                .chain(std::iter::once(Payload::Auth {
                    method: super::cert::AUTH_DIGITAL_SIGNATURE,
                    data: c.sign(&octets),
                }))
                .collect(),
        }
    }

    /// CERTREQ for our trust anchors (certificate authentication only): strongSwan and
    /// others send their certificate only when asked.
    fn certreq(&self) -> Option<Payload> {
        match &self.conn.auth {
            Auth::Cert(c) => Some(Payload::Cert {
                request: true,
                encoding: super::cert::CERT_X509,
                data: c.certreq(),
            }),
            Auth::Psk(_) => None,
        }
    }

    /// Checks the peer's AUTH (and certificate) for its ID `id`, and the ID against the
    /// configured one.
    fn check_peer(
        &self,
        of_initiator: bool,
        id: &(u8, Vec<u8>),
        payloads: &[Payload],
    ) -> Result<(), String> {
        let (method, data) = payloads.auth().ok_or("no AUTH payload")?;
        let octets = self.signed_octets(of_initiator, id);
        match &self.conn.auth {
            Auth::Psk(k) => {
                if method != AUTH_PSK {
                    return Err(format!(
                        "the peer authenticates with method {method}, we with a pre-shared key"
                    ));
                }
                let want = crypto::psk_auth(self.suite.unwrap().prf, k.bytes(), &octets);
                if !crypto::ct_eq(&want, data) {
                    return Err("the peer's AUTH does not verify (PSK mismatch?)".into());
                }
            }
            Auth::Cert(c) => c.verify_peer(
                &payloads.certs(),
                id,
                method,
                data,
                &octets,
                std::time::SystemTime::now(),
            )?,
        }
        match &self.conn.remote_id {
            Some(r) if !same_id(r, id) => Err("the peer's ID is not the configured one".into()),
            _ => Ok(()),
        }
    }

    /// Handles a datagram for this SA.
    pub fn on_message(&mut self, msg: &[u8], now: Instant) -> Vec<Output> {
        let h = match Header::decode(msg) {
            Ok(h) => h,
            Err(e) => return vec![Output::Dropped(e.to_string())],
        };
        if h.from_initiator() == self.initiator {
            return vec![Output::Dropped("message with our own I flag".into())];
        }
        if h.is_response() {
            self.on_response(msg, &h, now)
        } else {
            self.on_request(msg, &h, now)
        }
    }

    fn on_response(&mut self, msg: &[u8], h: &Header, now: Instant) -> Vec<Output> {
        let Some(p) = &self.pending else {
            return vec![Output::Dropped(
                "response with no request outstanding".into(),
            )];
        };
        if h.message_id != p.id {
            return vec![Output::Dropped(format!(
                "response id {} (waiting for {})",
                h.message_id, p.id
            ))];
        }
        match (h.exchange, self.state) {
            (IKE_SA_INIT, State::InitSent) => self.on_init_response(msg, h, now),
            (IKE_AUTH, State::AuthSent) => {
                let payloads = match self.decrypt(msg, h) {
                    Ok(p) => p,
                    Err(e) => return vec![Output::Dropped(e)],
                };
                self.pending = None;
                self.last_heard = now;
                self.on_auth_response(payloads, now)
            }
            (CREATE_CHILD_SA, State::Established) => {
                let payloads = match self.decrypt(msg, h) {
                    Ok(p) => p,
                    Err(e) => return vec![Output::Dropped(e)],
                };
                self.pending = None;
                self.last_heard = now;
                self.on_rekey_response(payloads, now)
            }
            (INFORMATIONAL, State::Established | State::Deleting) => {
                let payloads = match self.decrypt(msg, h) {
                    Ok(p) => p,
                    Err(e) => return vec![Output::Dropped(e)],
                };
                self.pending = None;
                self.last_heard = now;
                if self.state == State::Deleting {
                    self.state = State::Closed;
                    return vec![Output::Closed("deleted by us".into())];
                }
                let mut out = Vec::new();
                for p in payloads {
                    if let Payload::Delete {
                        protocol: PROTO_ESP,
                        spis,
                    } = p
                    {
                        out.extend(self.remove_children_by_out(&spis));
                    }
                }
                out
            }
            _ => vec![Output::Dropped(format!(
                "unexpected response to exchange {}",
                h.exchange
            ))],
        }
    }

    fn on_init_response(&mut self, msg: &[u8], h: &Header, now: Instant) -> Vec<Output> {
        let payloads = match decode_payloads(h.next, &msg[HEADER_LEN..], HEADER_LEN) {
            Ok((p, _)) => p,
            Err(e) => return vec![Output::Dropped(e.to_string())],
        };
        if let Some(c) = payloads.notify(N_COOKIE) {
            let group = self.dh.as_ref().unwrap().group;
            return self.send_init(group, Some(c.to_vec()), now);
        }
        if let Some(g) = payloads.notify(N_INVALID_KE_PAYLOAD) {
            let g = g.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            let ok = g
                .and_then(crypto::DhGroup::from_id)
                .filter(|g| self.conn.ike.iter().any(|s| s.dh == Some(*g)));
            return match ok {
                Some(group) if Some(group) != self.dh.as_ref().map(|d| d.group) => {
                    self.send_init(group, None, now)
                }
                _ => self.close(format!(
                    "peer wants DH group {g:?}, which we do not propose"
                )),
            };
        }
        if let Some(n) = payloads.error_notify() {
            return self.close(format!("peer refused IKE_SA_INIT: {}", notify_name(n)));
        }
        let Some(suite) = payloads
            .chosen()
            .and_then(|p| Suite::from_chosen(p, true))
            .filter(|s| self.conn.ike.contains(s))
        else {
            return self.close("peer chose a proposal we did not offer".into());
        };
        let dh = self.dh.as_ref().unwrap();
        let Some((kg, kdata)) = payloads.ke() else {
            return vec![Output::Dropped("IKE_SA_INIT response without KE".into())];
        };
        if kg != dh.group.id() || suite.dh != Some(dh.group) {
            return self.close("peer's KE group differs from the proposal".into());
        }
        let Some(nr) = payloads.nonce().map(<[u8]>::to_vec) else {
            return vec![Output::Dropped("IKE_SA_INIT response without nonce".into())];
        };
        let shared = match dh.shared(kdata) {
            Ok(s) => s,
            Err(e) => return vec![Output::Dropped(e.into())],
        };
        self.spi_r = h.spi_r;
        self.nr = nr;
        self.natt = self.nat_between(&payloads, h.spi_i, h.spi_r);
        self.nat_detected = self.natt;
        let s = IkeSuite {
            encr: suite.encr,
            prf: suite.prf.unwrap(),
            integ: suite.integ,
            dh: dh.group,
        };
        self.suite = Some(s);
        self.keys = Some(IkeKeys::derive(
            &s,
            &shared,
            &self.ni,
            &self.nr,
            &self.spis(),
        ));
        self.dh = None;
        self.msg2 = msg.to_vec();
        self.pending = None;
        self.last_heard = now;
        // IKE_AUTH with the first CHILD SA.
        let id = self.conn.local_id.clone();
        let esp = proposal::first_child_proposals(&self.conn.esp, self.child_spi);
        let mut payloads = vec![Payload::Id {
            initiator: true,
            kind: id.0,
            data: id.1.clone(),
        }];
        payloads.extend(self.our_auth(true, &id));
        payloads.extend(self.certreq());
        if let Some(r) = &self.conn.remote_id {
            payloads.push(Payload::Id {
                initiator: false,
                kind: r.0,
                data: r.1.clone(),
            });
        }
        if self.initial_contact {
            payloads.push(Payload::notify(N_INITIAL_CONTACT, Vec::new()));
        }
        payloads.push(Payload::Sa(esp.clone()));
        payloads.extend(ts_pair(&self.conn.local_ts, &self.conn.remote_ts));
        let msg = self.encrypted(IKE_AUTH, false, 1, &payloads);
        self.next_id = 2;
        self.state = State::AuthSent;
        // The responder sends on the first CHILD SA as soon as it has answered, before
        // its answer reaches us: with one proposal to choose from, its keys are known
        // now (SK_d and this exchange's nonces), so our inbound SA goes in first.
        let mut out = Vec::new();
        if esp.len() == 1 {
            let suite = self.conn.esp[0];
            out.push(Output::InboundFirst(ChildSa {
                spi_in: self.child_spi,
                spi_out: 0,
                suite,
                keys: self.child_keys(suite, None, &self.ni, &self.nr),
                initiator: true,
                local_ts: self.conn.local_ts.clone(),
                remote_ts: self.conn.remote_ts.clone(),
                created: now,
            }));
        }
        out.extend(self.request(1, msg, now));
        out
    }

    fn on_auth_response(&mut self, payloads: Vec<Payload>, now: Instant) -> Vec<Output> {
        let (Some(idr), Some(_)) = (payloads.id(false), payloads.auth()) else {
            let why = payloads
                .error_notify()
                .map(notify_name)
                .unwrap_or_else(|| "no IDr/AUTH".into());
            return self.close(format!("IKE_AUTH failed: {why}"));
        };
        if let Err(e) = self.check_peer(false, &idr, &payloads) {
            return self.close(format!("IKE_AUTH: {e}"));
        }
        self.state = State::Established;
        self.established_at = Some(now);
        let mut out = vec![Output::Established];
        match self.child_from(&payloads, true, self.child_spi) {
            Ok(c) => {
                self.children.push(c.clone());
                out.push(Output::ChildUp(c));
            }
            Err(e) => out.push(Output::Problem(format!("IKE SA up, but no CHILD SA: {e}"))),
        }
        out
    }

    /// A CHILD SA's keys from this IKE SA's SK_d and one exchange's nonces (§2.17).
    fn child_keys(&self, suite: Suite, pfs: Option<&Secret>, ni: &[u8], nr: &[u8]) -> ChildKeys {
        let prf = self.suite.expect("keys exist").prf;
        let d = &self.keys.as_ref().expect("keys exist").d;
        ChildKeys::derive(prf, d, suite.encr, suite.integ, pfs, ni, nr)
    }

    /// Reads the CHILD SA an IKE_AUTH response (or request, as responder) carries.
    fn child_from(
        &self,
        payloads: &[Payload],
        initiator: bool,
        spi_in: u32,
    ) -> Result<ChildSa, String> {
        if let Some(n) = payloads.error_notify() {
            return Err(notify_name(n));
        }
        let sa = payloads.chosen().ok_or("no SA payload")?;
        let suite = proposal::chosen_first_child(sa, &self.conn.esp)
            .ok_or("peer chose an ESP proposal we did not offer")?;
        let spi_out: [u8; 4] = sa
            .spi
            .as_slice()
            .try_into()
            .map_err(|_| "ESP SPI not 4 octets")?;
        let tsi = payloads.ts(true).ok_or("no TSi")?;
        let tsr = payloads.ts(false).ok_or("no TSr")?;
        // Ours must contain what the responder narrowed to.
        let (local_ts, remote_ts) = (
            narrow(tsi, &self.conn.local_ts),
            narrow(tsr, &self.conn.remote_ts),
        );
        if local_ts != tsi || remote_ts != tsr {
            return Err("peer's traffic selectors are wider than ours".into());
        }
        // The first CHILD SA: no PFS, the IKE SA's own nonces.
        let keys = self.child_keys(suite, None, &self.ni, &self.nr);
        Ok(ChildSa {
            spi_in,
            spi_out: u32::from_be_bytes(spi_out),
            suite,
            keys,
            initiator,
            local_ts,
            remote_ts,
            created: Instant::now(),
        })
    }

    fn on_request(&mut self, msg: &[u8], h: &Header, now: Instant) -> Vec<Output> {
        // Window of one: a retransmitted request gets the same response again.
        if let Some((id, resp)) = &self.last_response {
            if h.message_id == *id {
                return vec![Output::Send(resp.clone())];
            }
        }
        if h.message_id != self.expect_id || self.keys.is_none() {
            return vec![Output::Dropped(format!(
                "request id {} (expected {})",
                h.message_id, self.expect_id
            ))];
        }
        let payloads = match self.decrypt(msg, h) {
            Ok(p) => p,
            Err(e) => return vec![Output::Dropped(e)],
        };
        self.last_heard = now;
        match (h.exchange, self.state) {
            (IKE_AUTH, State::InitDone) => self.on_auth_request(payloads, h.message_id, now),
            (INFORMATIONAL, State::Established | State::Deleting) => {
                self.on_informational(payloads, h.message_id)
            }
            (CREATE_CHILD_SA, State::Established) => {
                self.on_rekey_request(payloads, h.message_id, now)
            }
            // §2.25.2: a rekey of an IKE SA being closed gets TEMPORARY_FAILURE.
            (CREATE_CHILD_SA, State::Deleting) => vec![self.respond_with(
                CREATE_CHILD_SA,
                h.message_id,
                &[Payload::notify(N_TEMPORARY_FAILURE, Vec::new())],
            )],
            _ => vec![Output::Dropped(format!(
                "exchange {} in state {:?}",
                h.exchange, self.state
            ))],
        }
    }

    fn respond_with(&mut self, exchange: u8, id: u32, payloads: &[Payload]) -> Output {
        let resp = self.encrypted(exchange, true, id, payloads);
        self.last_response = Some((id, resp.clone()));
        self.expect_id = id + 1;
        Output::Send(resp)
    }

    fn on_auth_request(&mut self, payloads: Vec<Payload>, id: u32, now: Instant) -> Vec<Output> {
        let fail = |sa: &mut IkeSa, why: String| {
            let out = sa.respond_with(
                IKE_AUTH,
                id,
                &[Payload::notify(N_AUTHENTICATION_FAILED, Vec::new())],
            );
            sa.state = State::Closed;
            vec![out, Output::Closed(why)]
        };
        let (Some(idi), Some(_)) = (payloads.id(true), payloads.auth()) else {
            return fail(self, "IKE_AUTH without IDi or AUTH".into());
        };
        if let Err(e) = self.check_peer(true, &idi, &payloads) {
            return fail(self, format!("IKE_AUTH: {e}"));
        }
        let my_id = self.conn.local_id.clone();
        let mut resp = vec![Payload::Id {
            initiator: false,
            kind: my_id.0,
            data: my_id.1.clone(),
        }];
        resp.extend(self.our_auth(false, &my_id));
        // The first CHILD SA: choose, narrow, answer with our SPI.
        let child = self.child_for_request(&payloads);
        let mut out = Vec::new();
        match child {
            Ok((c, prop)) => {
                resp.push(Payload::Sa(vec![prop]));
                resp.extend(ts_pair(&c.remote_ts, &c.local_ts));
                self.children.push(c.clone());
                out.push(Output::ChildUp(c));
            }
            Err((notify, why)) => {
                resp.push(Payload::notify(notify, Vec::new()));
                out.push(Output::Problem(format!(
                    "IKE SA up, but no CHILD SA: {why}"
                )));
            }
        }
        let send = self.respond_with(IKE_AUTH, id, &resp);
        self.state = State::Established;
        self.established_at = Some(now);
        let mut all = vec![send, Output::Established];
        all.extend(out);
        all
    }

    fn child_for_request(
        &self,
        payloads: &[Payload],
    ) -> Result<(ChildSa, Proposal), (u16, String)> {
        let offer = payloads
            .sa()
            .ok_or((N_INVALID_SYNTAX, "no SA payload".to_string()))?;
        let (chosen, suite) = proposal::choose_first_child(offer, &self.conn.esp).ok_or((
            N_NO_PROPOSAL_CHOSEN,
            "no acceptable ESP proposal".to_string(),
        ))?;
        let spi_out: [u8; 4] = chosen
            .spi
            .as_slice()
            .try_into()
            .map_err(|_| (N_INVALID_SYNTAX, "ESP SPI not 4 octets".to_string()))?;
        let remote_ts = narrow(payloads.ts(true).unwrap_or_default(), &self.conn.remote_ts);
        let local_ts = narrow(payloads.ts(false).unwrap_or_default(), &self.conn.local_ts);
        if remote_ts.is_empty() || local_ts.is_empty() {
            return Err((
                N_TS_UNACCEPTABLE,
                "traffic selectors outside the config".into(),
            ));
        }
        // The first CHILD SA: no PFS, the IKE SA's own nonces.
        let keys = self.child_keys(suite, None, &self.ni, &self.nr);
        let spi_in = self.child_spi;
        let prop = suite
            .without_dh()
            .proposal(chosen.num, false, spi_in.to_be_bytes().to_vec());
        Ok((
            ChildSa {
                spi_in,
                spi_out: u32::from_be_bytes(spi_out),
                suite,
                keys,
                initiator: false,
                local_ts,
                remote_ts,
                created: Instant::now(),
            },
            prop,
        ))
    }

    fn on_informational(&mut self, payloads: Vec<Payload>, id: u32) -> Vec<Output> {
        let mut out = Vec::new();
        let mut answer = Vec::new();
        for p in &payloads {
            match p {
                Payload::Delete {
                    protocol: PROTO_IKE,
                    ..
                } => {
                    let send = self.respond_with(INFORMATIONAL, id, &[]);
                    self.state = State::Closed;
                    let mut v = vec![send];
                    v.extend(self.children.drain(..).map(|c| Output::ChildDown {
                        spi_in: c.spi_in,
                        spi_out: c.spi_out,
                    }));
                    v.push(Output::Closed("deleted by the peer".into()));
                    return v;
                }
                Payload::Delete {
                    protocol: PROTO_ESP,
                    spis,
                } => {
                    // Their SPIs are our outbound ones; we answer with our inbound ones.
                    let gone = self.remove_children_by_out(spis);
                    let ours: Vec<Vec<u8>> = gone
                        .iter()
                        .filter_map(|o| match o {
                            Output::ChildDown { spi_in, .. } => Some(spi_in.to_be_bytes().to_vec()),
                            _ => None,
                        })
                        .collect();
                    if !ours.is_empty() {
                        answer.push(Payload::Delete {
                            protocol: PROTO_ESP,
                            spis: ours,
                        });
                    }
                    out.extend(gone);
                }
                _ => {}
            }
        }
        // An empty request is a liveness check (DPD): the empty answer is the point.
        let mut v = vec![self.respond_with(INFORMATIONAL, id, &answer)];
        v.extend(out);
        v
    }

    fn remove_children_by_out(&mut self, spis: &[Vec<u8>]) -> Vec<Output> {
        let mut out = Vec::new();
        self.children.retain(|c| {
            let hit = spis.iter().any(|s| s.as_slice() == c.spi_out.to_be_bytes());
            if hit {
                out.push(Output::ChildDown {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                });
            }
            !hit
        });
        out
    }

    fn close(&mut self, why: String) -> Vec<Output> {
        self.state = State::Closed;
        self.pending = None;
        let mut v: Vec<Output> = self
            .children
            .drain(..)
            .map(|c| Output::ChildDown {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            })
            .collect();
        v.push(Output::Closed(why));
        v
    }

    /// Sends DELETE for the IKE SA (and with it its CHILD SAs); the SA closes when the
    /// peer answers or the retransmissions run out.
    pub fn delete(&mut self, now: Instant) -> Vec<Output> {
        if self.state != State::Established {
            return self.close("deleted by us".into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.encrypted(
            INFORMATIONAL,
            false,
            id,
            &[Payload::Delete {
                protocol: PROTO_IKE,
                spis: Vec::new(),
            }],
        );
        self.state = State::Deleting;
        let mut out: Vec<Output> = self
            .children
            .drain(..)
            .map(|c| Output::ChildDown {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            })
            .collect();
        out.extend(self.request(id, msg, now));
        out
    }

    /// Deletes one CHILD SA (by our inbound SPI), telling the peer.
    pub fn delete_child(&mut self, spi_in: u32, now: Instant) -> Vec<Output> {
        self.delete_children(&[spi_in], now)
    }

    /// Deletes CHILD SAs (by inbound SPI) in one INFORMATIONAL exchange: at once here,
    /// toward the peer as soon as no other request of ours is in flight.
    pub fn delete_children(&mut self, spis_in: &[u32], now: Instant) -> Vec<Output> {
        if self.state != State::Established {
            return Vec::new();
        }
        let mut out = Vec::new();
        for spi in spis_in {
            if let Some(pos) = self.children.iter().position(|c| c.spi_in == *spi) {
                let c = self.children.remove(pos);
                self.delete_queue.push(c.spi_in);
                out.push(Output::ChildDown {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                });
            }
        }
        out.extend(self.send_deletes(now));
        out
    }

    /// The queued CHILD SA DELETEs, if the window is free.
    fn send_deletes(&mut self, now: Instant) -> Vec<Output> {
        if self.pending.is_some() || self.delete_queue.is_empty() {
            return Vec::new();
        }
        let spis: Vec<Vec<u8>> = self
            .delete_queue
            .drain(..)
            .map(|s| s.to_be_bytes().to_vec())
            .collect();
        let mut out = Vec::new();
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.encrypted(
            INFORMATIONAL,
            false,
            id,
            &[Payload::Delete {
                protocol: PROTO_ESP,
                spis,
            }],
        );
        out.extend(self.request(id, msg, now));
        out
    }

    /// Retransmissions and liveness checks; call about once a second.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Output> {
        if let Some(p) = &mut self.pending {
            let (wait, tries) = if p.liveness {
                (self.conn.dpd.retransmit, self.conn.dpd.retries + 1)
            } else {
                (Duration::from_millis(500 << p.tries.min(5)), TRIES)
            };
            if now.duration_since(p.sent) >= wait {
                if p.tries + 1 >= tries {
                    // The daemon counts DPD failures by this word.
                    let what = if p.liveness { " DPD" } else { "" };
                    return self.close(format!(
                        "peer not answering{what} (retransmissions exhausted)"
                    ));
                }
                p.tries += 1;
                p.sent = now;
                return vec![Output::Send(p.msg.clone())];
            }
            return Vec::new();
        }
        if self.state == State::Established {
            let out = self.send_deletes(now);
            if !out.is_empty() {
                return out;
            }
        }
        if self.state == State::Established && self.redundant {
            // The loser of a simultaneous IKE SA rekey: its initiator (we) deletes it.
            return self.delete(now);
        }
        if self.state == State::Established {
            let out = self.rekey_due(now);
            if !out.is_empty() {
                return out;
            }
        }
        if self.state == State::Established
            && !self.conn.dpd.interval.is_zero()
            && now.duration_since(self.last_heard) >= self.conn.dpd.interval
        {
            let id = self.next_id;
            self.next_id += 1;
            let msg = self.encrypted(INFORMATIONAL, false, id, &[]);
            let out = self.request(id, msg, now);
            if let Some(p) = &mut self.pending {
                p.liveness = true;
            }
            return out;
        }
        // A responder whose initiator never sent IKE_AUTH.
        if self.state == State::InitDone
            && now.duration_since(self.last_heard) > Duration::from_secs(30)
        {
            return self.close("half-open: no IKE_AUTH within 30 s".into());
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(
        local: &str,
        remote: &str,
        ike: &[&str],
        esp: &[&str],
        psk: &str,
        lts: &str,
        rts: &str,
    ) -> Arc<Conn> {
        let local: IpAddr = local.parse().unwrap();
        let remote: IpAddr = remote.parse().unwrap();
        Arc::new(Conn {
            name: "t".into(),
            local,
            remote,
            auth: Auth::Psk(Secret::new(psk.as_bytes().to_vec())),
            local_id: id_of(local),
            remote_id: Some(id_of(remote)),
            ike: ike.iter().map(|n| Suite::parse(n, true).unwrap()).collect(),
            esp: esp
                .iter()
                .map(|n| Suite::parse(n, false).unwrap())
                .collect(),
            local_ts: vec![TrafficSelector::from_net(lts.parse().unwrap())],
            remote_ts: vec![TrafficSelector::from_net(rts.parse().unwrap())],
            dpd: Dpd {
                interval: Duration::from_secs(10),
                ..Dpd::OFF
            },
            force_encap: false,
            child_lifetime: Duration::from_secs(3600),
            ike_lifetime: Duration::from_secs(14400),
            initiate: true,
        })
    }

    /// 192.0.2.1 (10.1.0.0/16) and 192.0.2.2 (10.2.0.0/16) with the same proposals.
    fn pair(ike: &[&str], esp: &[&str], psk_a: &str, psk_b: &str) -> (Arc<Conn>, Arc<Conn>) {
        (
            conn(
                "192.0.2.1",
                "192.0.2.2",
                ike,
                esp,
                psk_a,
                "10.1.0.0/16",
                "10.2.0.0/16",
            ),
            conn(
                "192.0.2.2",
                "192.0.2.1",
                ike,
                esp,
                psk_b,
                "10.2.0.0/16",
                "10.1.0.0/16",
            ),
        )
    }

    /// `pair` with the AES-GCM/ECP-384 IKE proposal and one PSK.
    fn gcm_pair(esp: &[&str]) -> (Arc<Conn>, Arc<Conn>) {
        pair(&["aes256gcm16-prfsha384-ecp384"], esp, "s", "s")
    }

    fn sent(out: &[Output]) -> Vec<u8> {
        out.iter()
            .find_map(|o| match o {
                Output::Send(m) => Some(m.clone()),
                _ => None,
            })
            .expect("something to send")
    }

    fn child(out: &[Output]) -> ChildSa {
        out.iter()
            .find_map(|o| match o {
                Output::ChildUp(c) => Some(c.clone()),
                _ => None,
            })
            .expect("a CHILD SA")
    }

    /// Two state machines negotiate; returns both ends.
    fn handshake(a: Arc<Conn>, b: Arc<Conn>) -> (IkeSa, IkeSa, Vec<Output>, Vec<Output>) {
        let now = Instant::now();
        let (mut i, out) = IkeSa::initiate(a, now);
        let mut msg = sent(&out);
        let mut r = loop {
            match IkeSa::respond(b.clone(), &msg, 500, now) {
                Ok((r, out)) => {
                    let o = i.on_message(&sent(&out), now);
                    msg = sent(&o);
                    break r;
                }
                // INVALID_KE_PAYLOAD: the initiator tries again.
                Err((Some(answer), _)) => msg = sent(&i.on_message(&answer, now)),
                Err((None, why)) => panic!("{why}"),
            }
        };
        let r_out = r.on_message(&msg, now);
        let i_out = i.on_message(&sent(&r_out), now);
        (i, r, i_out, r_out)
    }

    #[test]
    fn psk_handshake_with_three_proposal_kinds_and_narrowing() {
        for (ike, esp) in [
            ("aes256gcm16-prfsha384-ecp384", "aes256gcm16"),
            ("aes128-sha256-modp2048", "aes128-sha256"),
            ("aes256-sha512-curve25519", "aes256-sha512"),
            ("aes128gcm16-prfsha256-ecp521", "aes128gcm16"),
        ] {
            let a = conn(
                "192.0.2.1",
                "192.0.2.2",
                &[ike],
                &[esp],
                "secret",
                "10.1.0.0/16",
                "0.0.0.0/0",
            );
            let b = conn(
                "192.0.2.2",
                "192.0.2.1",
                &[ike],
                &[esp],
                "secret",
                "192.168.0.0/16",
                "10.0.0.0/8",
            );
            let (i, r, i_out, r_out) = handshake(a, b);
            assert_eq!(i.state, State::Established, "{ike}");
            assert_eq!(r.state, State::Established);
            let (ci, cr) = (child(&i_out), child(&r_out));
            // Each side's outbound SA is the other's inbound, with the same keys.
            assert_eq!(ci.spi_out, cr.spi_in);
            assert_eq!(ci.spi_in, cr.spi_out);
            assert_eq!(ci.out_keys(), cr.in_keys());
            assert_eq!(ci.in_keys(), cr.out_keys());
            assert_eq!(ci.suite, Suite::parse(esp, false).unwrap());
            // The responder narrowed the initiator's 0.0.0.0/0 to its own 192.168/16.
            assert_eq!(
                ci.remote_ts,
                vec![TrafficSelector::from_net("192.168.0.0/16".parse().unwrap())]
            );
            assert_eq!(
                cr.remote_ts,
                vec![TrafficSelector::from_net("10.1.0.0/16".parse().unwrap())]
            );
        }
    }

    #[test]
    fn invalid_ke_payload_makes_the_initiator_switch_groups() {
        let a = conn(
            "192.0.2.1",
            "192.0.2.2",
            &[
                "aes256gcm16-prfsha384-ecp384",
                "aes256gcm16-prfsha384-curve25519",
            ],
            &["aes256gcm16"],
            "s",
            "10.1.0.0/16",
            "10.2.0.0/16",
        );
        let b = conn(
            "192.0.2.2",
            "192.0.2.1",
            &["aes256gcm16-prfsha384-curve25519"],
            &["aes256gcm16"],
            "s",
            "10.2.0.0/16",
            "10.1.0.0/16",
        );
        let (i, _, _, _) = handshake(a, b);
        assert_eq!(i.state, State::Established);
        assert_eq!(i.suite().unwrap().dh, crypto::DhGroup::Curve25519);
    }

    #[test]
    fn wrong_psk_fails_authentication_on_both_sides() {
        let (a, b) = pair(
            &["aes256gcm16-prfsha384-ecp384"],
            &["aes256gcm16"],
            "one",
            "two",
        );
        let (i, r, i_out, r_out) = handshake(a, b);
        assert_eq!(r.state, State::Closed);
        assert!(r_out
            .iter()
            .any(|o| matches!(o, Output::Closed(w) if w.contains("PSK"))));
        assert_eq!(i.state, State::Closed);
        assert!(
            i_out
                .iter()
                .any(|o| matches!(o, Output::Closed(w) if w.contains("AUTHENTICATION_FAILED"))),
            "{i_out:?}"
        );
    }

    #[test]
    fn a_silent_peer_is_declared_dead_within_the_dpd_bound() {
        let (a, b) = pair(&["aes128-sha256-modp2048"], &["aes128-sha256"], "s", "s");
        let dpd = Dpd {
            interval: Duration::from_secs(10),
            retransmit: Duration::from_secs(3),
            retries: 2,
        };
        assert_eq!(dpd.bound(), Duration::from_secs(19));
        let a = Arc::new(Conn {
            dpd,
            ..(*a).clone()
        });
        let (mut i, _r, _, _) = handshake(a, b);
        let t0 = i.last_heard;
        // Nothing heard: a check at 10 s, resent at 13 and 16 s, dead at 19 s, not before.
        let mut sends = Vec::new();
        let mut dead = None;
        for ms in (0..30_000).step_by(100) {
            let t = t0 + Duration::from_millis(ms);
            let out = i.on_tick(t);
            if out.iter().any(|o| matches!(o, Output::Send(_))) {
                sends.push(ms);
            }
            if out.iter().any(|o| matches!(o, Output::Closed(_))) {
                dead = Some(ms);
                break;
            }
        }
        assert_eq!(sends, [10_000, 13_000, 16_000]);
        assert_eq!(dead, Some(19_000));
    }

    #[test]
    fn dpd_delete_retransmission_and_tampering() {
        let (a, b) = pair(&["aes128-sha256-modp2048"], &["aes128-sha256"], "s", "s");
        let (mut i, mut r, i_out, _) = handshake(a, b);
        let spi_out = child(&i_out).spi_out;
        let t0 = Instant::now();
        // Idle past the DPD interval: an empty INFORMATIONAL, answered empty.
        let dpd = sent(&i.on_tick(t0 + Duration::from_secs(11)));
        let answer = sent(&r.on_message(&dpd, t0));
        // The same request again (our answer was lost): the same answer, no new state.
        assert_eq!(sent(&r.on_message(&dpd, t0)), answer);
        assert!(i.on_message(&answer, t0).is_empty());
        // A tampered message is dropped and changes nothing.
        let mut bad = sent(&i.on_tick(t0 + Duration::from_secs(30)));
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        let out = r.on_message(&bad, t0);
        assert!(matches!(&out[..], [Output::Dropped(_)]), "{out:?}");
        assert_eq!(r.state, State::Established);
        // No answer: retransmitted with back-off, then the peer is dead.
        let mut t = t0 + Duration::from_secs(30);
        let mut sends = 0;
        let closed = loop {
            t += Duration::from_secs(1);
            let out = i.on_tick(t);
            sends += out.iter().filter(|o| matches!(o, Output::Send(_))).count();
            if let Some(Output::Closed(w)) = out.iter().find(|o| matches!(o, Output::Closed(_))) {
                break w.clone();
            }
            assert!(t < t0 + Duration::from_secs(120));
        };
        assert!(closed.contains("not answering"), "{closed}");
        // The liveness check and 4 retransmissions 2 s apart (the defaults).
        assert_eq!(sends, 4);
        // DELETE of a CHILD SA from the responder: both sides drop it.
        let (a, b) = pair(&["aes128-sha256-modp2048"], &["aes128-sha256"], "s", "s");
        let (mut i, mut r, i_out, _) = handshake(a, b);
        let c = child(&i_out);
        let _ = spi_out;
        let del = r.delete_child(c.spi_out, t0);
        assert!(del.contains(&Output::ChildDown {
            spi_in: c.spi_out,
            spi_out: c.spi_in
        }));
        let out = i.on_message(&sent(&del), t0);
        assert!(
            out.contains(&Output::ChildDown {
                spi_in: c.spi_in,
                spi_out: c.spi_out
            }),
            "{out:?}"
        );
        assert!(r.on_message(&sent(&out), t0).is_empty());
        // DELETE of the IKE SA from the initiator.
        let out = i.delete(t0);
        let out = r.on_message(&sent(&out), t0);
        assert!(out.contains(&Output::Closed("deleted by the peer".into())));
        assert_eq!(
            i.on_message(&sent(&out), t0),
            vec![Output::Closed("deleted by us".into())]
        );
    }

    #[test]
    fn rekeys_child_and_ike_sas_both_ways_make_before_break() {
        for esp in ["aes256gcm16", "aes128-sha256-ecp256"] {
            let (a, b) = gcm_pair(&[esp]);
            let (mut i, mut r, i_out, _) = handshake(a, b);
            let old = child(&i_out);
            let t = Instant::now();
            // CHILD SA rekey from the initiator: the new SA comes up first, then the old
            // one is deleted.
            let req = i.rekey_child(old.spi_in, t);
            let resp = r.on_message(&sent(&req), t);
            let r_new = child(&resp);
            let out = i.on_message(&sent(&resp), t);
            let i_new = child(&out);
            assert_eq!(i_new.out_keys(), r_new.in_keys(), "{esp}");
            assert_eq!(i_new.spi_out, r_new.spi_in);
            assert_ne!(i_new.spi_in, old.spi_in);
            let up = out
                .iter()
                .position(|o| matches!(o, Output::ChildUp(_)))
                .unwrap();
            let down = out
                .iter()
                .position(|o| matches!(o, Output::ChildDown { .. }))
                .unwrap();
            assert!(up < down, "make before break: {out:?}");
            let del = r.on_message(&sent(&out), t);
            assert!(del.contains(&Output::ChildDown {
                spi_in: old.spi_out,
                spi_out: old.spi_in
            }));
            assert!(i.on_message(&sent(&del), t).is_empty());
            assert_eq!((i.children.len(), r.children.len()), (1, 1));
            // CHILD SA rekey from the responder.
            let req = r.rekey_child(r_new.spi_in, t);
            let resp = i.on_message(&sent(&req), t);
            let out = r.on_message(&sent(&resp), t);
            let ack = i.on_message(&sent(&out), t);
            assert!(r.on_message(&sent(&ack), t).is_empty());
            assert_eq!((i.children.len(), r.children.len()), (1, 1));
            assert_eq!(i.children[0].out_keys(), r.children[0].in_keys());
            // IKE SA rekey from the responder: both get a successor with the CHILD SA.
            let req = r.rekey_ike(t);
            let mut resp = i.on_message(&sent(&req), t);
            let mut i2 = take_new(&mut resp);
            let mut out = r.on_message(&sent(&resp), t);
            let mut r2 = take_new(&mut out);
            assert!(
                r2.initiator && !i2.initiator,
                "the rekey's initiator starts the new SA"
            );
            assert_eq!((r2.children.len(), i2.children.len()), (1, 1));
            assert!(r.children.is_empty() && i.children.is_empty(), "moved");
            // The old SA is deleted on the old keys; the new one answers DPD.
            let closed = i.on_message(&sent(&out), t);
            assert!(
                closed.iter().any(|o| matches!(o, Output::Closed(_))),
                "{closed:?}"
            );
            let dpd = sent(&r2.on_tick(t + Duration::from_secs(11)));
            let ans = i2.on_message(&dpd, t);
            assert!(r2.on_message(&sent(&ans), t).is_empty());
        }
    }

    /// Both ends rekey the same CHILD SA at once (RFC 7296 §2.8.1): each answers the
    /// other's request, then the redundant pair (lowest nonce) and the old one go, and
    /// both are left with the same single CHILD SA.
    #[test]
    fn simultaneous_child_rekeys_leave_one_child_sa() {
        for _ in 0..8 {
            let (a, b) = gcm_pair(&["aes256gcm16"]);
            let (mut i, mut r, i_out, _) = handshake(a, b);
            let old = child(&i_out);
            let t = Instant::now();
            let req_i = sent(&i.rekey_child(old.spi_in, t));
            let req_r = sent(&r.rekey_child(old.spi_out, t));
            let resp_r = sent(&r.on_message(&req_i, t));
            let resp_i = sent(&i.on_message(&req_r, t));
            let del_i = sent(&i.on_message(&resp_r, t));
            let del_r = sent(&r.on_message(&resp_i, t));
            let ack_r = sent(&r.on_message(&del_i, t));
            let ack_i = sent(&i.on_message(&del_r, t));
            assert!(i.on_message(&ack_r, t).is_empty());
            assert!(r.on_message(&ack_i, t).is_empty());
            assert_eq!(
                (i.children.len(), r.children.len()),
                (1, 1),
                "{:?} {:?}",
                i.children,
                r.children
            );
            let (ci, cr) = (&i.children[0], &r.children[0]);
            assert_eq!((ci.spi_out, ci.spi_in), (cr.spi_in, cr.spi_out));
            assert_eq!(ci.out_keys(), cr.in_keys());
            assert_ne!(ci.spi_in, old.spi_in);
        }
    }

    /// The CREATE_CHILD_SA or IKE_AUTH payloads inside a request of `from`'s.
    fn payloads_of(to: &IkeSa, msg: &[u8]) -> Vec<Payload> {
        let h = Header::decode(msg).unwrap();
        to.decrypt(msg, &h).unwrap()
    }

    /// With `ike` done, `i`'s IKE_AUTH request carrying these ESP proposals (as a peer
    /// that puts a D-H transform in them would send it).
    fn auth_request_with(i: &mut IkeSa, esp: Vec<Proposal>) -> Vec<u8> {
        let id = i.conn.local_id.clone();
        let mut payloads = vec![Payload::Id {
            initiator: true,
            kind: id.0,
            data: id.1.clone(),
        }];
        payloads.extend(i.our_auth(true, &id));
        payloads.push(Payload::Sa(esp));
        payloads.extend(ts_pair(&i.conn.local_ts, &i.conn.remote_ts));
        i.encrypted(IKE_AUTH, false, 1, &payloads)
    }

    /// RFC 7296 §1.2: IKE_AUTH has no KE, so its proposals carry no D-H transform ("SHOULD
    /// omit the whole transform substructure"); one a peer sends anyway is ignored, both
    /// ways, and the group is kept for the rekeys.
    #[test]
    fn ike_auth_carries_no_dh_and_ignores_a_peers() {
        use crate::testutil::hex;
        // What we send: the ESP proposal of "aes256gcm16-ecp384" without its group.
        let ours = [Suite::parse("aes256gcm16-ecp384", false).unwrap()];
        let (_, body) = encode_payloads(&[Payload::Sa(proposal::first_child_proposals(
            &ours, 0x01020304,
        ))]);
        assert_eq!(
            body,
            hex("00000024 00000020 01030402 01020304 0300000c 01000014 800e0100 00000008 05000000"),
            "SA: one ESP proposal, SPI, ENCR AES-GCM-16 256, ESN none; no transform type 4"
        );
        // In a handshake of ours: no D-H transform in IKE_AUTH, the group kept.
        let (a, b) = gcm_pair(&["aes256gcm16-ecp384"]);
        let now = Instant::now();
        let (mut i, out) = IkeSa::initiate(a.clone(), now);
        let (mut r, out) = IkeSa::respond(b.clone(), &sent(&out), 500, now).unwrap();
        let auth_out = i.on_message(&sent(&out), now);
        // One proposal: the inbound SA of the first CHILD SA comes before IKE_AUTH.
        let Some(Output::InboundFirst(early)) = auth_out.first() else {
            panic!("{auth_out:?}")
        };
        let early = early.clone();
        let auth = sent(&auth_out);
        let p = payloads_of(&r, &auth);
        assert!(
            p.sa()
                .unwrap()
                .iter()
                .all(|p| p.transforms.iter().all(|t| t.kind != TRANSFORM_DH)),
            "{p:?}"
        );
        let r_out = r.on_message(&auth, now);
        let i_out = i.on_message(&sent(&r_out), now);
        assert_eq!(
            child(&i_out).suite,
            ours[0],
            "the group stays for the rekeys"
        );
        assert_eq!(
            (early.spi_in, early.in_keys()),
            (child(&i_out).spi_in, child(&i_out).in_keys()),
            "what was installed early is the CHILD SA's inbound SA"
        );
        assert_eq!(child(&r_out).suite, ours[0]);
        // A peer that sends one anyway, to a responder with or without PFS.
        for (theirs, responder) in [
            ("aes256gcm16-ecp384", "aes256gcm16"),
            ("aes256gcm16-ecp384", "aes256gcm16-ecp384"),
            ("aes256gcm16-modp2048", "aes256gcm16-ecp384"),
        ] {
            let (a, b) = gcm_pair(&[responder]);
            let (mut i, out) = IkeSa::initiate(a, now);
            let (mut r, out) = IkeSa::respond(b, &sent(&out), 500, now).unwrap();
            // The initiator takes the IKE_SA_INIT answer, then we replace its IKE_AUTH.
            i.on_message(&sent(&out), now);
            let theirs = Suite::parse(theirs, false).unwrap();
            let msg = auth_request_with(&mut i, vec![theirs.proposal(1, false, vec![1, 2, 3, 4])]);
            let r_out = r.on_message(&msg, now);
            let c = child(&r_out);
            assert_eq!(
                c.suite,
                Suite::parse(responder, false).unwrap(),
                "{theirs:?}"
            );
            // Our answer names no group either; the peer (a real initiator) reads it.
            let p = payloads_of(&i, &sent(&r_out));
            assert!(p
                .chosen()
                .unwrap()
                .transforms
                .iter()
                .all(|t| t.kind != TRANSFORM_DH));
            assert_eq!(
                proposal::chosen_first_child(p.chosen().unwrap(), &[theirs]),
                Some(theirs)
            );
        }
    }

    /// PFS (§1.3.1, §1.3.3): a rekey of a CHILD SA whose proposal has a group carries KE
    /// payloads both ways, and the keys of the two ends agree.
    #[test]
    fn pfs_rekeys_carry_ke_both_ways() {
        let (a, b) = gcm_pair(&["aes256gcm16-ecp384"]);
        let (mut i, mut r, i_out, _) = handshake(a, b);
        let old = child(&i_out);
        let t = Instant::now();
        for initiator_rekeys in [true, false] {
            let (x, y) = if initiator_rekeys {
                (&mut i, &mut r)
            } else {
                (&mut r, &mut i)
            };
            let spi = x.children[0].spi_in;
            let req = sent(&x.rekey_child(spi, t));
            assert_eq!(
                payloads_of(y, &req).ke().map(|k| k.0),
                Some(20),
                "KEi of ECP-384"
            );
            let resp = y.on_message(&req, t);
            assert_eq!(
                payloads_of(x, &sent(&resp)).ke().map(|k| k.0),
                Some(20),
                "KEr"
            );
            let y_new = child(&resp);
            let out = x.on_message(&sent(&resp), t);
            let x_new = child(&out);
            assert_eq!(x_new.out_keys(), y_new.in_keys());
            assert_eq!(x_new.in_keys(), y_new.out_keys());
            let ack = y.on_message(&sent(&out), t);
            assert!(x.on_message(&sent(&ack), t).is_empty());
        }
        assert_eq!((i.children.len(), r.children.len()), (1, 1));
        assert_ne!(i.children[0].keys, old.keys);
        // A rekey without KE for a PFS proposal gets INVALID_KE_PAYLOAD with our group,
        // and an initiator offered another group it has retries with it at once.
        let (a, b) = gcm_pair(&["aes256gcm16-ecp256", "aes256gcm16-ecp384"]);
        let b = Arc::new(Conn {
            esp: vec![Suite::parse("aes256gcm16-ecp384", false).unwrap()],
            ..(*b).clone()
        });
        let (mut i, mut r, _, _) = handshake(a, b);
        let spi = i.children[0].spi_in;
        // Our first group is ECP-256; the responder wants ECP-384.
        let req = sent(&i.rekey_child(spi, t));
        assert_eq!(payloads_of(&r, &req).ke().map(|k| k.0), Some(19));
        let resp = sent(&r.on_message(&req, t));
        assert_eq!(
            payloads_of(&i, &resp).notify(N_INVALID_KE_PAYLOAD),
            Some(&[0u8, 20][..])
        );
        let again = sent(&i.on_message(&resp, t));
        assert_eq!(payloads_of(&r, &again).ke().map(|k| k.0), Some(20));
        let resp = r.on_message(&again, t);
        assert!(i
            .on_message(&sent(&resp), t)
            .iter()
            .any(|o| matches!(o, Output::ChildUp(_))));
    }

    /// More than one CHILD SA per IKE SA: the peer may ask for another (no REKEY_SA), and
    /// the initiator re-creates one the peer deleted.
    #[test]
    fn more_child_sas_and_a_deleted_one_comes_back() {
        let (a, b) = gcm_pair(&["aes256gcm16"]);
        let (mut i, mut r, _, _) = handshake(a, b);
        let t = Instant::now();
        let req = r.create_child(t);
        let resp = i.on_message(&sent(&req), t);
        let i_new = child(&resp);
        let out = r.on_message(&sent(&resp), t);
        let r_new = child(&out);
        assert_eq!(i_new.out_keys(), r_new.in_keys());
        assert_eq!((i.children.len(), r.children.len()), (2, 2));
        assert_eq!(r_new.local_ts, r.conn.local_ts, "narrowed to both configs");
        // The responder deletes both; the initiator, which starts the connector, makes
        // a new one on its next tick.
        let spis: Vec<u32> = r.children.iter().map(|c| c.spi_in).collect();
        let del = r.delete_children(&spis, t);
        let ans = i.on_message(&sent(&del), t);
        assert!(r.on_message(&sent(&ans), t).is_empty());
        assert!(i.children.is_empty() && r.children.is_empty());
        let req = i.on_tick(t + Duration::from_millis(500));
        let resp = r.on_message(&sent(&req), t);
        let out = i.on_message(&sent(&resp), t);
        assert_eq!(child(&out).out_keys(), child(&resp).in_keys());
        assert_eq!((i.children.len(), r.children.len()), (1, 1));
        // An unknown REKEY_SA is CHILD_SA_NOT_FOUND (§2.25), not a new SA.
        let old = r.children[0].spi_in;
        r.children[0].spi_in = 7777;
        let req = sent(&r.rekey_child(7777, t));
        r.children[0].spi_in = old;
        i.children[0].spi_out = 1;
        let resp = sent(&i.on_message(&req, t));
        assert_eq!(
            payloads_of(&r, &resp).error_notify(),
            Some(N_CHILD_SA_NOT_FOUND)
        );
    }

    /// A peer that refuses our rekeys (here: it has no PFS, we do) is not asked every
    /// tick: after 1, 2 and 4 s, then a fresh CHILD SA, then a new IKE SA, long before the
    /// kernel's hard lifetime; each refusal is a problem the operator sees.
    #[test]
    fn refused_rekeys_back_off_then_reauthenticate() {
        let (a, b) = gcm_pair(&["aes256gcm16-ecp384"]);
        let a = Arc::new(Conn {
            child_lifetime: Duration::from_secs(10),
            ..(*a).clone()
        });
        let b = Arc::new(Conn {
            esp: vec![Suite::parse("aes256gcm16", false).unwrap()],
            ..(*b).clone()
        });
        let (mut i, mut r, _, _) = handshake(a, b);
        let t0 = Instant::now();
        let mut asked = Vec::new();
        let mut problems = Vec::new();
        let mut reauth = None;
        for ms in (10_000..40_000).step_by(500) {
            let now = t0 + Duration::from_millis(ms);
            let out = i.on_tick(now);
            if out.contains(&Output::Reauth) {
                reauth = Some(ms);
                break;
            }
            let Some(req) = out.iter().find_map(|o| match o {
                Output::Send(m) => Some(m.clone()),
                _ => None,
            }) else {
                continue;
            };
            let rekey = payloads_of(&r, &req).notify(N_REKEY_SA).is_some();
            asked.push((ms, rekey));
            let resp = r.on_message(&req, now);
            problems.extend(resp.iter().filter_map(|o| match o {
                Output::Problem(p) => Some(p.clone()),
                _ => None,
            }));
            for o in i.on_message(&sent(&resp), now) {
                if let Output::Problem(p) = o {
                    problems.push(p);
                }
            }
        }
        assert_eq!(
            asked,
            [
                (10_000, true),
                (11_000, true),
                (13_000, true),
                (17_000, false)
            ],
            "rekeys after 1, 2, 4 s, then a fresh CHILD SA"
        );
        assert_eq!(
            reauth,
            Some(25_000),
            "then a new IKE SA, 65 s before the hard lifetime"
        );
        assert!(
            problems.iter().any(|p| p.contains("rekey of CHILD SA")
                && p.contains("NO_PROPOSAL_CHOSEN")
                && p.contains("D-H group 20")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("the peer wants PFS with D-H group 20")),
            "{problems:?}"
        );
        assert_eq!(i.children.len(), 1, "the old CHILD SA carries on meanwhile");
        let later = i.on_tick(t0 + Duration::from_secs(60));
        assert!(
            !later.contains(&Output::Reauth) && i.rekey.is_none(),
            "asked once"
        );
    }

    /// Both ends rekey the IKE SA at once (§2.8.2): the new SA made with the lowest nonce
    /// is deleted by its initiator; both ends keep the same survivor, with the CHILD SA.
    #[test]
    fn simultaneous_ike_rekeys_leave_one_ike_sa() {
        for _ in 0..8 {
            let (a, b) = gcm_pair(&["aes256gcm16"]);
            let (mut i, mut r, _, _) = handshake(a, b);
            let t = Instant::now();
            let req_i = sent(&i.rekey_ike(t));
            let req_r = sent(&r.rekey_ike(t));
            let mut resp_r = r.on_message(&req_i, t);
            let mut resp_i = i.on_message(&req_r, t);
            let b_r = take_new(&mut resp_r);
            let b_i = take_new(&mut resp_i);
            assert!(b_r.provisional && b_i.provisional);
            assert!(
                b_r.children.is_empty() && r.children.len() == 1,
                "children wait"
            );
            // Each side's answer to its own request decides.
            let end = |x: &mut IkeSa, resp: &[Output], mut b: IkeSa| -> (IkeSa, Vec<Output>) {
                let mut out = x.on_message(&sent(resp), t);
                let a = take_new(&mut out);
                if let Some(children) = out.iter().find_map(|o| match o {
                    Output::Adopt { children, .. } => Some(children.clone()),
                    _ => None,
                }) {
                    assert!(a.redundant);
                    b.children = children;
                    b.provisional = false;
                    (b, out)
                } else {
                    assert!(!a.redundant);
                    (a, out)
                }
            };
            let (si, _) = end(&mut i, &resp_r, b_i);
            let (sr, _) = end(&mut r, &resp_i, b_r);
            assert_eq!(
                (si.spi_i, si.spi_r),
                (sr.spi_i, sr.spi_r),
                "the same survivor"
            );
            assert_eq!((si.children.len(), sr.children.len()), (1, 1));
            let (mut si, mut sr) = (si, sr);
            let dpd = sent(&si.on_tick(t + Duration::from_secs(11)));
            let ans = sr.on_message(&dpd, t);
            assert!(si.on_message(&sent(&ans), t).is_empty(), "same keys");
        }
    }

    /// Certificate authentication end to end: CERTREQ in IKE_SA_INIT, CERT and a
    /// digital-signature AUTH (RFC 7427) in IKE_AUTH, both ways; a peer whose certificate
    /// another CA issued is refused with the reason.
    #[test]
    fn certificate_authentication_both_ways() {
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
        let cert = |pem: &str, key: &str, local: &str, remote: &str| {
            let c = super::super::cert::Credentials::load(
                &d.join(pem),
                &d.join(key),
                &d.join("ca.pem"),
            )
            .unwrap();
            let base = conn(
                local,
                remote,
                &["aes256gcm16-prfsha384-ecp384"],
                &["aes256gcm16"],
                "unused",
                "10.1.0.0/16",
                "10.2.0.0/16",
            );
            Arc::new(Conn {
                local_id: (ID_DER_ASN1_DN, c.subject.clone()),
                remote_id: None,
                auth: Auth::Cert(Arc::new(c)),
                local_ts: base.local_ts.clone(),
                remote_ts: base.remote_ts.clone(),
                ..(*base).clone()
            })
        };
        let a = cert("cxp.pem", "cxp.key", "192.0.2.1", "192.0.2.2");
        let mut b = cert("gw.pem", "gw.key", "192.0.2.2", "192.0.2.1");
        Arc::make_mut(&mut b).local_ts = a.remote_ts.clone();
        Arc::make_mut(&mut b).remote_ts = a.local_ts.clone();
        // The responder asks for certificates from its CA and takes method 14.
        let now = Instant::now();
        let (_, out) = IkeSa::initiate(a.clone(), now);
        let (_, resp) = IkeSa::respond(b.clone(), &sent(&out), 500, now).unwrap();
        let (p, _) = decode_payloads(
            Header::decode(&sent(&resp)).unwrap().next,
            &sent(&resp)[HEADER_LEN..],
            HEADER_LEN,
        )
        .unwrap();
        assert!(p.iter().any(
            |x| matches!(x, Payload::Cert { request: true, encoding: 4, data } if data.len() == 20)
        ));
        assert_eq!(
            p.notify(N_SIGNATURE_HASH_ALGORITHMS),
            Some(&[0u8, 2, 0, 3, 0, 4][..])
        );
        let (i, r, i_out, r_out) = handshake(a.clone(), b.clone());
        assert_eq!(
            (i.state, r.state),
            (State::Established, State::Established),
            "{i_out:?} {r_out:?}"
        );
        assert_eq!(child(&i_out).out_keys(), child(&r_out).in_keys());
        // The same subject and key, from a CA of the same name that is not ours.
        let mut rogue = cert("rogue-gw.pem", "gw.key", "192.0.2.2", "192.0.2.1");
        Arc::make_mut(&mut rogue).local_ts = b.local_ts.clone();
        Arc::make_mut(&mut rogue).remote_ts = b.remote_ts.clone();
        let (i, _, i_out, _) = handshake(a, rogue);
        assert_eq!(i.state, State::Closed);
        assert!(
            i_out.iter().any(
                |o| matches!(o, Output::Closed(w) if w.contains("is not signed by a CA in ca_file"))
            ),
            "{i_out:?}"
        );
    }

    fn take_new(out: &mut Vec<Output>) -> IkeSa {
        let pos = out
            .iter()
            .position(|o| matches!(o, Output::NewIkeSa(_)))
            .expect("a successor SA");
        match out.remove(pos) {
            Output::NewIkeSa(b) => *b,
            _ => unreachable!(),
        }
    }
}
