//! Bidirectional Forwarding Detection: RFC 5880 asynchronous mode, single hop (RFC 5881)
//! and multihop (RFC 5883). `packet` is the wire format, `session` the sans-IO state
//! machine, `driver` the thread that owns the sockets and the clock, `config` what an
//! operator writes.

pub mod config;
pub mod driver;
pub mod packet;
pub mod session;
