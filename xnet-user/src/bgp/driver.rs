//! The tokio task that drives one BGP session (`session`, the sans-IO machine): it owns
//! the TCP connection, the timer and the channels to the agent, tells the machine what
//! happened and does what it says.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::packet::*;
pub use super::session::{Advert, Control, Event, GrLocal, SessionConfig, State};
use super::session::{Input, Output, Session};

pub type SharedState = Arc<std::sync::Mutex<State>>;

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

/// For a passive session: returns once the netns's TCP-MD5 drop counters grow, with the
/// session's error saying so (the counters do not say which peer).
async fn md5_watch(signed: bool) -> String {
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
            return format!("{m} ({whose})");
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TcpStream, String>> + Send>>;

fn connecting(cfg: &SessionConfig) -> Connecting {
    let target = SocketAddr::new(cfg.peer, cfg.port);
    let local = cfg.local_address;
    let key = cfg.password.clone();
    Box::pin(async move {
        let before = super::md5::Counters::read();
        match tokio::time::timeout(Duration::from_secs(5), connect(target, local, key.as_ref()))
            .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("connect to {target}: {e}")),
            // The kernel drops segments whose signature does not match without a word:
            // its counters tell this from an absent peer.
            Err(_) => Err(match super::md5::Counters::read().explain_since(&before) {
                Some(m) => format!("connect to {target}: timed out: {m}"),
                None => format!("connect to {target}: timed out"),
            }),
        }
    })
}

fn local_of(s: &TcpStream) -> IpAddr {
    s.local_addr()
        .map(|a| a.ip().to_canonical())
        .unwrap_or(IpAddr::from([0u8; 4]))
}

/// Closes a connection the peer opened besides ours with Cease 7 (collision).
async fn reject(mut other: TcpStream) {
    if let Err(e) = other
        .write_all(&encode_notification(ERR_CEASE, 7, &[]))
        .await
    {
        debug!("closing a colliding connection: {e}");
    }
}

/// Runs the session until the agent drops its channels or shuts it down.
pub async fn run(
    cfg: SessionConfig,
    events: mpsc::Sender<(u64, Event)>,
    mut incoming: mpsc::Receiver<TcpStream>,
    mut adverts: watch::Receiver<Option<Arc<Vec<Advert>>>>,
    mut control: mpsc::UnboundedReceiver<Control>,
    state: SharedState,
) {
    let id = cfg.id;
    let passive = cfg.passive;
    let (mut s, first) = Session::new(cfg, Instant::now());
    let mut queue: VecDeque<Output> = first.into();
    let current = adverts.borrow_and_update().clone();
    queue.extend(s.step(Input::Adverts(current), Instant::now()));
    let mut stream: Option<TcpStream> = None;
    // The peer's second connection, until collision resolution says which stays.
    let mut pending: Option<TcpStream> = None;
    let mut dialing: Option<Connecting> = None;
    let mut buf = vec![0u8; 64 * 1024];
    // The listener hands over to a replacement session by dropping our inbox: a session
    // still connected then finishes as the agent says (its Cease), it does not vanish.
    let mut inbox_open = true;
    loop {
        // Do what the machine said; what that brings (a write failing, the switch to
        // the peer's connection) goes back into it.
        let mut write_failed: Option<String> = None;
        while let Some(o) = queue.pop_front() {
            match o {
                Output::Send(bytes) => {
                    if let (Some(st), None) = (stream.as_mut(), &write_failed) {
                        if let Err(e) = st.write_all(&bytes).await {
                            write_failed = Some(format!("write: {e}"));
                        }
                    }
                }
                Output::Event(e) => {
                    if events.send((id, e)).await.is_err() {
                        return;
                    }
                }
                Output::Connect => dialing = Some(connecting(s.config())),
                Output::Close { drain } => {
                    write_failed = None;
                    if let Some(mut st) = stream.take() {
                        if drain {
                            if let Err(e) = st.shutdown().await {
                                debug!("bgp: closing: {e}");
                            }
                            let mut sink = [0u8; 4096];
                            let drained = tokio::time::timeout(Duration::from_secs(1), async {
                                while matches!(st.read(&mut sink).await, Ok(n) if n > 0) {}
                            })
                            .await;
                            if drained.is_err() {
                                debug!("bgp: the peer did not close within 1 s");
                            }
                        }
                    }
                }
                Output::RejectIncoming => {
                    if let Some(other) = pending.take() {
                        reject(other).await;
                    }
                }
                Output::SwitchToIncoming => {
                    if let Some(st) = pending.take() {
                        st.set_nodelay(true).ok();
                        let local = local_of(&st);
                        stream = Some(st);
                        let initiated = false;
                        queue.extend(s.step(Input::Connected { initiated, local }, Instant::now()));
                    }
                }
                Output::Stop => {
                    *state.lock().unwrap() = s.status().clone();
                    return;
                }
            }
        }
        if let Some(why) = write_failed.take() {
            if stream.is_some() {
                queue.extend(s.step(Input::Closed(why), Instant::now()));
                continue;
            }
        }
        *state.lock().unwrap() = s.status().clone();
        let deadline = s.deadline().map(tokio::time::Instant::from_std);
        let input_now = tokio::select! {
            r = async { stream.as_mut().unwrap().read(&mut buf).await }, if stream.is_some() => match r {
                Ok(0) => Some(Err("read: early eof".to_string())),
                Ok(n) => Some(Ok(n)),
                Err(e) => Some(Err(format!("read: {e}"))),
            },
            r = async { dialing.as_mut().unwrap().await }, if dialing.is_some() => {
                dialing = None;
                match r {
                    Ok(st) => {
                        st.set_nodelay(true).ok();
                        let local = local_of(&st);
                        stream = Some(st);
                        queue.extend(s.step(Input::Connected { initiated: true, local }, Instant::now()));
                    }
                    Err(why) => queue.extend(s.step(Input::ConnectFailed(why), Instant::now())),
                }
                None
            }
            other = incoming.recv(), if inbox_open => {
                let Some(other) = other else {
                    if stream.is_none() {
                        return;
                    }
                    inbox_open = false;
                    continue;
                };
                if stream.is_some() {
                    if pending.is_some() {
                        // One colliding connection at a time.
                        reject(other).await;
                    } else {
                        pending = Some(other);
                        queue.extend(s.step(Input::Incoming, Instant::now()));
                    }
                } else {
                    // Nothing to collide with: it is the connection.
                    dialing = None;
                    other.set_nodelay(true).ok();
                    let local = local_of(&other);
                    stream = Some(other);
                    queue.extend(s.step(Input::Connected { initiated: false, local }, Instant::now()));
                }
                None
            }
            // The kernel drops connections whose TCP-MD5 signature does not match
            // without a word to us: its counters are the only sign.
            why = md5_watch(s.config().password.is_some()), if passive && stream.is_none() => {
                queue.extend(s.step(Input::Md5Drops(why), Instant::now()));
                None
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                queue.extend(s.step(Input::Timer, Instant::now()));
                None
            }
            changed = adverts.changed() => {
                let input = match changed {
                    Ok(()) => Input::Adverts(adverts.borrow_and_update().clone()),
                    // The agent is gone.
                    Err(_) => Input::Control(Control::Shutdown(CEASE_ADMIN_SHUTDOWN)),
                };
                queue.extend(s.step(input, Instant::now()));
                None
            }
            c = control.recv() => {
                let c: Control = match c {
                    Some(c) => c,
                    None => Control::Shutdown(CEASE_ADMIN_SHUTDOWN),
                };
                queue.extend(s.step(Input::Control(c), Instant::now()));
                None
            }
        };
        match input_now {
            Some(Ok(n)) => queue.extend(s.step(Input::Received(&buf[..n]), Instant::now())),
            Some(Err(why)) => queue.extend(s.step(Input::Closed(why), Instant::now())),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! Collision resolution needs two simultaneous connections, which a real peer makes
    //! only by chance: here a scripted peer on loopback plays both.
    use super::*;
    use ipnet::IpNet;
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

    /// The scripted peer's OPEN (AS 65010, no graceful restart).
    fn open_with_hold(id: &str, hold_time: u16) -> Vec<u8> {
        crate::bgp::session::tests::open(65010, id, hold_time, false)
    }

    /// A session to a scripted peer on loopback `port`.
    fn test_config(port: u16, hold_time: u16) -> SessionConfig {
        SessionConfig {
            peer: "127.0.0.1".parse().unwrap(),
            port,
            ..crate::bgp::session::tests::config(hold_time)
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
        theirs
            .write_all(&open_with_hold("10.0.0.9", 90))
            .await
            .unwrap();
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
