//! The BGP-4 wire format (RFC 4271) with MP-BGP (RFC 4760), 4-octet AS (RFC 6793),
//! communities and large communities: decoding never panics and reports the NOTIFICATION
//! (code, subcode) a bad message calls for; encoding produces what the session sends.

mod attr;
mod message;

pub use attr::*;
pub use message::*;

/// A decoding failure: the NOTIFICATION it calls for and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (NOTIFICATION {code}/{subcode})")]
pub struct BgpError {
    pub code: u8,
    pub subcode: u8,
    pub reason: String,
    /// The NOTIFICATION's Data field: what RFC 4271 §6 says the peer is shown (the bad
    /// Length field, the offending attribute, the version we support...).
    pub data: Vec<u8>,
}

impl BgpError {
    pub fn with_data(mut self, data: &[u8]) -> Self {
        self.data = data.to_vec();
        self
    }
}

pub const ERR_HEADER: u8 = 1;
pub const ERR_OPEN: u8 = 2;
pub const ERR_UPDATE: u8 = 3;
pub const ERR_HOLD_TIMER: u8 = 4;
pub const ERR_FSM: u8 = 5;
pub const ERR_CEASE: u8 = 6;
/// Cease subcodes (RFC 4486).
pub const CEASE_MAX_PREFIXES: u8 = 1;
pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
pub const CEASE_PEER_DECONFIGURED: u8 = 3;
pub const CEASE_OTHER_CONFIG_CHANGE: u8 = 6;
pub const CEASE_COLLISION: u8 = 7;
/// RFC 9384: the session went down because BFD said the path failed.
pub const CEASE_BFD_DOWN: u8 = 10;

pub fn err(code: u8, subcode: u8, reason: impl Into<String>) -> BgpError {
    BgpError {
        code,
        subcode,
        reason: reason.into(),
        data: Vec::new(),
    }
}

/// The shared bounds-checked reader (`crate::wire`), running out of data as the error
/// `code`/`subcode` says.
pub(crate) struct Reader<'a> {
    r: crate::wire::Reader<'a>,
    code: (u8, u8),
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], code: u8, subcode: u8) -> Self {
        Self {
            r: crate::wire::Reader::new(buf),
            code: (code, subcode),
        }
    }
    pub fn pos(&self) -> usize {
        self.r.pos()
    }
    pub fn left(&self) -> usize {
        self.r.left()
    }
    fn short(&self, s: crate::wire::Short) -> BgpError {
        err(
            self.code.0,
            self.code.1,
            format!("truncated: need {} bytes, have {}", s.need, s.left),
        )
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], BgpError> {
        self.r.bytes(n).map_err(|s| self.short(s))
    }
    pub fn u8(&mut self) -> Result<u8, BgpError> {
        self.r.u8().map_err(|s| self.short(s))
    }
    pub fn u16(&mut self) -> Result<u16, BgpError> {
        self.r.u16().map_err(|s| self.short(s))
    }
    pub fn u32(&mut self) -> Result<u32, BgpError> {
        self.r.u32().map_err(|s| self.short(s))
    }
}
