//! The BFD Control packet (RFC 5880 §4.1) and the checks of §6.8.6 that need nothing but
//! the packet. Authentication is not supported: a packet with the A bit is refused (we
//! never configure it, and §6.8.6 says to discard a packet whose A bit does not match).

use std::time::Duration;

use crate::wire::Reader;

/// Length of the mandatory section, without authentication.
pub const LEN: usize = 24;
pub const VERSION: u8 = 1;

/// bfd.SessionState and the State field (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            State::AdminDown => "admin-down",
            State::Down => "down",
            State::Init => "init",
            State::Up => "up",
        }
    }
}

/// The Diagnostic field (§4.1): why the session last left Up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Diag {
    None = 0,
    DetectionTimeExpired = 1,
    EchoFailed = 2,
    NeighborSignaledDown = 3,
    ForwardingPlaneReset = 4,
    PathDown = 5,
    ConcatenatedPathDown = 6,
    AdminDown = 7,
    ReverseConcatenatedPathDown = 8,
    /// 9–31: reserved, kept so a peer's value is shown as it came.
    Other = 31,
}

impl Diag {
    fn from_bits(b: u8) -> Diag {
        match b & 0x1f {
            0 => Diag::None,
            1 => Diag::DetectionTimeExpired,
            2 => Diag::EchoFailed,
            3 => Diag::NeighborSignaledDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdminDown,
            8 => Diag::ReverseConcatenatedPathDown,
            _ => Diag::Other,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Diag::None => "none",
            Diag::DetectionTimeExpired => "control detection time expired",
            Diag::EchoFailed => "echo function failed",
            Diag::NeighborSignaledDown => "neighbor signaled session down",
            Diag::ForwardingPlaneReset => "forwarding plane reset",
            Diag::PathDown => "path down",
            Diag::ConcatenatedPathDown => "concatenated path down",
            Diag::AdminDown => "administratively down",
            Diag::ReverseConcatenatedPathDown => "reverse concatenated path down",
            Diag::Other => "reserved",
        }
    }
}

/// A Control packet's fields; intervals in microseconds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub fin: bool,
    /// Control Plane Independent: our BFD does not share fate with the control plane's
    /// process (it runs on its own thread, but in the same process): clear.
    pub cpi: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub required_min_echo_rx: Duration,
}

const F_POLL: u8 = 0x20;
const F_FINAL: u8 = 0x10;
const F_CPI: u8 = 0x08;
const F_AUTH: u8 = 0x04;
const F_DEMAND: u8 = 0x02;
const F_MULTIPOINT: u8 = 0x01;

/// Why a received packet is discarded (§6.8.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Discard {
    #[error("{0} bytes: shorter than a Control packet (24)")]
    Short(usize),
    #[error("version {0}, not 1")]
    Version(u8),
    #[error("Length field {field} with {got} bytes received")]
    Length { field: u8, got: usize },
    #[error("Detect Mult is zero")]
    DetectMult,
    #[error("Multipoint bit set")]
    Multipoint,
    #[error("My Discriminator is zero")]
    MyDiscr,
    #[error("Your Discriminator is zero in state {0:?}")]
    YourDiscr(State),
    #[error("authentication present but not configured")]
    Auth,
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl Control {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (VERSION << 5) | (self.diag as u8 & 0x1f);
        b[1] = ((self.state as u8) << 6)
            | if self.poll { F_POLL } else { 0 }
            | if self.fin { F_FINAL } else { 0 }
            | if self.cpi { F_CPI } else { 0 }
            | if self.demand { F_DEMAND } else { 0 };
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_discr.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discr.to_be_bytes());
        b[12..16].copy_from_slice(&us(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&us(self.required_min_rx).to_be_bytes());
        b[20..24].copy_from_slice(&us(self.required_min_echo_rx).to_be_bytes());
        b
    }

    /// Parses a packet and applies the checks of §6.8.6 that need no session (the
    /// session lookup by Your Discriminator is the demultiplexer's).
    pub fn decode(buf: &[u8]) -> Result<Control, Discard> {
        if buf.len() < LEN {
            return Err(Discard::Short(buf.len()));
        }
        let mut r = Reader::new(buf);
        let short = |_| Discard::Short(buf.len());
        let vd = r.u8().map_err(short)?;
        let flags = r.u8().map_err(short)?;
        let detect_mult = r.u8().map_err(short)?;
        let length = r.u8().map_err(short)?;
        if vd >> 5 != VERSION {
            return Err(Discard::Version(vd >> 5));
        }
        // Length below the minimum (24, or 26 with authentication) or beyond the payload.
        let min = if flags & F_AUTH != 0 { LEN + 2 } else { LEN };
        if (length as usize) < min || length as usize > buf.len() {
            return Err(Discard::Length {
                field: length,
                got: buf.len(),
            });
        }
        if detect_mult == 0 {
            return Err(Discard::DetectMult);
        }
        if flags & F_MULTIPOINT != 0 {
            return Err(Discard::Multipoint);
        }
        let my_discr = r.u32().map_err(short)?;
        let your_discr = r.u32().map_err(short)?;
        let tx = r.u32().map_err(short)?;
        let rx = r.u32().map_err(short)?;
        let echo = r.u32().map_err(short)?;
        if my_discr == 0 {
            return Err(Discard::MyDiscr);
        }
        let state = State::from_bits(flags >> 6);
        if your_discr == 0 && !matches!(state, State::Down | State::AdminDown) {
            return Err(Discard::YourDiscr(state));
        }
        if flags & F_AUTH != 0 {
            return Err(Discard::Auth);
        }
        Ok(Control {
            diag: Diag::from_bits(vd),
            state,
            poll: flags & F_POLL != 0,
            fin: flags & F_FINAL != 0,
            cpi: flags & F_CPI != 0,
            demand: flags & F_DEMAND != 0,
            detect_mult,
            my_discr,
            your_discr,
            desired_min_tx: Duration::from_micros(tx as u64),
            required_min_rx: Duration::from_micros(rx as u64),
            required_min_echo_rx: Duration::from_micros(echo as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet as BIRD sends it when its session comes up (captured layout): version 1,
    /// diag 0, state Init, detect mult 3, length 24, discriminators, 300 ms / 300 ms / 0.
    const INIT: [u8; 24] = [
        0x20, 0x80, 0x03, 0x18, 0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x07, 0x00, 0x04, 0x93,
        0xe0, 0x00, 0x04, 0x93, 0xe0, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn exact_bytes_both_ways() {
        let c = Control::decode(&INIT).unwrap();
        assert_eq!(c.state, State::Init);
        assert_eq!(c.diag, Diag::None);
        assert_eq!((c.my_discr, c.your_discr), (42, 7));
        assert_eq!(c.desired_min_tx, Duration::from_millis(300));
        assert_eq!(c.required_min_rx, Duration::from_millis(300));
        assert!(!c.poll && !c.fin && !c.demand);
        assert_eq!(c.encode(), INIT);
        // Poll and Final and a diagnostic land in their bits.
        let p = Control {
            poll: true,
            diag: Diag::DetectionTimeExpired,
            state: State::Down,
            ..c
        };
        let b = p.encode();
        assert_eq!((b[0], b[1]), (0x21, 0x60));
        let f = Control { fin: true, ..c }.encode();
        assert_eq!(f[1], 0x90);
    }

    #[test]
    fn section_6_8_6_discards() {
        let with = |i: usize, v: u8| {
            let mut b = INIT;
            b[i] = v;
            b
        };
        assert_eq!(Control::decode(&INIT[..23]), Err(Discard::Short(23)));
        assert_eq!(Control::decode(&with(0, 0x40)), Err(Discard::Version(2)));
        assert_eq!(
            Control::decode(&with(3, 23)),
            Err(Discard::Length { field: 23, got: 24 })
        );
        // A Length beyond what arrived.
        assert_eq!(
            Control::decode(&with(3, 25)),
            Err(Discard::Length { field: 25, got: 24 })
        );
        assert_eq!(Control::decode(&with(2, 0)), Err(Discard::DetectMult));
        assert_eq!(Control::decode(&with(1, 0x81)), Err(Discard::Multipoint));
        let mut no_mine = INIT;
        no_mine[4..8].fill(0);
        assert_eq!(Control::decode(&no_mine), Err(Discard::MyDiscr));
        // Your Discriminator zero is only valid in Down and AdminDown.
        let mut no_yours = INIT;
        no_yours[8..12].fill(0);
        assert_eq!(
            Control::decode(&no_yours),
            Err(Discard::YourDiscr(State::Init))
        );
        no_yours[1] = 0x40; // Down
        assert!(Control::decode(&no_yours).is_ok());
        // Authentication we have not configured (Length 26 to pass the length check).
        let mut auth = [0u8; 26];
        auth[..24].copy_from_slice(&INIT);
        auth[1] |= 0x04;
        auth[3] = 26;
        assert_eq!(Control::decode(&auth), Err(Discard::Auth));
        // Trailing bytes beyond Length are ignored (Length is what counts).
        let mut long = [0u8; 30];
        long[..24].copy_from_slice(&INIT);
        assert!(Control::decode(&long).is_ok());
    }
}
