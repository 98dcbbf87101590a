//! BGP: the wire codec (`packet`), the per-neighbour session (`session`, the sans-IO state
//! machine, run by `driver`), the
//! RIB with best-path selection (`rib`) and what is advertised to whom (`policy`).
pub mod advertise;
pub mod config;
pub mod driver;
pub mod graceful;
pub mod inbound;
pub mod md5;
pub mod packet;
pub mod rib;
pub mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use config::{Advertise, Bgp, Neighbor};
use driver::{Advert, Control, Event, GrLocal, SessionConfig, SharedState};
use packet::AsSegment;

/// A segment's id by name (the config knows them).
pub type SegmentIds<'a> = &'a dyn Fn(&str) -> Option<u32>;

/// One configured neighbour and the handles to its session task.
pub struct Peer {
    pub name: String,
    pub segment: u32,
    pub address: IpAddr,
    pub remote_asn: u32,
    pub advertise: Advertise,
    pub state: SharedState,
    /// None until the agent has a table for this peer (it holds it back while restarting).
    pub adverts: watch::Sender<Option<Arc<Vec<Advert>>>>,
    control: mpsc::UnboundedSender<Control>,
    pub import: policy::Import,
    /// The session task's id: events of older tasks for this address are stale.
    pub session: u64,
    neighbor: Neighbor,
    /// Its TCP-MD5 key as read (a new key in the same file is a change).
    password: Option<md5::Key>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Peer {
    /// Ends the session with NOTIFICATION Cease `subcode`, in the background: the task
    /// gets a second to send it, then goes. The receiver fires when it has gone.
    fn stop(mut self, subcode: u8) -> tokio::sync::oneshot::Receiver<()> {
        let _ = self.control.send(Control::Shutdown(subcode));
        let (done, gone) = tokio::sync::oneshot::channel();
        let task = self.task.take();
        tokio::spawn(async move {
            // Its channels live until it is done: a closed advertisement channel would
            // end the session with another Cease.
            let _channels = self;
            if let Some(mut task) = task {
                if tokio::time::timeout(Duration::from_secs(1), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
            let _ = done.send(());
        });
        gone
    }
}

/// A route of a segment as advertisement sees it: prefix, and for a learned route the
/// peer it came from and its attributes (`None`: static).
pub type SegmentRoute = (ipnet::IpNet, Option<(IpAddr, Arc<rib::Learned>)>);

type Inboxes = Arc<std::sync::Mutex<HashMap<IpAddr, mpsc::Sender<TcpStream>>>>;

/// The BGP speaker: listener, sessions, and the channel their events arrive on.
pub struct Speaker {
    pub asn: u32,
    bgp: Bgp,
    pub peers: Vec<Peer>,
    pub events: mpsc::Receiver<(u64, Event)>,
    tx: mpsc::Sender<(u64, Event)>,
    inboxes: Inboxes,
    /// Kept to set and remove the neighbours' TCP-MD5 keys as they come and go.
    listener: Arc<TcpListener>,
    /// The agent's own addresses (a NEXT_HOP among them is ignored).
    local_addrs: Arc<Vec<IpAddr>>,
    next_session: u64,
    /// The agent restarted and has not selected its routes yet: the R bit in OPENs, and
    /// no advertisements.
    restarting: Arc<AtomicBool>,
    /// The agent took over a data plane that kept forwarding (the F bit).
    forwarding: bool,
    /// The task that accepts connections (it holds the listener too).
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl Speaker {
    /// Starts a session per neighbour and a listener that hands incoming connections to
    /// them (connections from unknown addresses are closed). `restarted`: the agent took
    /// over a forwarding data plane and is restarting gracefully.
    pub async fn start(
        bgp: Option<&Bgp>,
        segment_ids: SegmentIds<'_>,
        file: &str,
        restarted: bool,
        local_addrs: Vec<IpAddr>,
    ) -> Result<Option<Speaker>> {
        let Some(b) = bgp else {
            return Ok(None);
        };
        let (tx, events) = mpsc::channel(4096);
        let inboxes: Inboxes = Default::default();
        let listener = TcpListener::bind(SocketAddr::new("::".parse().unwrap(), b.port))
            .await
            .with_context(|| format!("bgp: listening on port {}", b.port))?;
        let listener = Arc::new(listener);
        let mut speaker = Speaker {
            asn: b.asn,
            bgp: b.clone(),
            peers: Vec::new(),
            events,
            tx,
            inboxes: inboxes.clone(),
            listener: listener.clone(),
            local_addrs: Arc::new(local_addrs),
            next_session: 1,
            restarting: Arc::new(AtomicBool::new(restarted && b.graceful_restart)),
            forwarding: restarted,
            accept: None,
        };
        let mut keys = md5::load_all(b, file)?;
        for n in &b.neighbors {
            let key = keys.remove(&n.address).flatten();
            speaker.spawn(segment_ids, n, key, None)?;
        }
        info!(
            "bgp: AS {}, router id {}, listening on port {}, {} neighbours",
            b.asn,
            b.router_id,
            b.port,
            b.neighbors.len()
        );
        speaker.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    continue;
                };
                let ip = from.ip().to_canonical();
                let inbox = inboxes.lock().unwrap().get(&ip).cloned();
                match inbox {
                    Some(inbox) => {
                        let _ = inbox.try_send(stream);
                    }
                    None => warn!("bgp: connection from unknown peer {ip} closed"),
                }
            }
        }));
        Ok(Some(speaker))
    }

    /// Starts neighbour `n`'s session; with `after`, once that fires (the session it
    /// replaces has said goodbye: a graceful-restart peer would take an early new
    /// connection for a restart and never see the NOTIFICATION).
    fn spawn(
        &mut self,
        segment_ids: SegmentIds<'_>,
        n: &Neighbor,
        password: Option<md5::Key>,
        after: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Result<()> {
        if let Some(k) = &password {
            md5::set(&*self.listener, n.address, Some(k)).with_context(|| {
                format!(
                    "bgp {} ({}): TCP-MD5 key on the listener",
                    n.name, n.address
                )
            })?;
        }
        let b = &self.bgp;
        let (in_tx, in_rx) = mpsc::channel(4);
        self.inboxes.lock().unwrap().insert(n.address, in_tx);
        let (adv_tx, adv_rx) = watch::channel(None);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let state: SharedState = Default::default();
        let session = self.next_session;
        self.next_session += 1;
        let segment = segment_ids(&n.segment).expect("validated");
        let cfg = SessionConfig {
            id: session,
            name: n.name.clone(),
            segment,
            local_asn: b.asn,
            router_id: b.router_id,
            peer: n.address,
            port: b.port,
            remote_asn: n.remote_asn,
            hold_time: n.hold_time,
            passive: n.passive,
            max_prefixes: n.max_prefixes,
            warn_prefixes: n.warn_prefixes,
            enforce_first_as: n.enforce_first_as,
            local_addrs: self.local_addrs.clone(),
            password: password.clone(),
            local_address: n.local_address,
            graceful_restart: b.graceful_restart.then_some(GrLocal {
                restart_time: b.restart_time,
                forwarding: self.forwarding,
            }),
            restarting: self.restarting.clone(),
        };
        let run = driver::run(cfg, self.tx.clone(), in_rx, adv_rx, ctl_rx, state.clone());
        let task = tokio::spawn(async move {
            if let Some(after) = after {
                let _ = after.await;
            }
            run.await
        });
        self.peers.push(Peer {
            name: n.name.clone(),
            segment,
            address: n.address,
            remote_asn: n.remote_asn,
            advertise: n.advertise,
            state,
            adverts: adv_tx,
            control: ctl_tx,
            import: n.import.clone(),
            session,
            neighbor: n.clone(),
            password,
            task: Some(task),
        });
        Ok(())
    }

    /// Applies a new neighbour list: sessions of removed or changed neighbours stop (a
    /// changed one starts again with its new settings); the others are not touched.
    /// Returns the addresses whose sessions stopped. Settings of `[bgp]` itself (AS,
    /// router id, port) need a restart: the caller rejects such changes.
    /// `keys`: the neighbours' TCP-MD5 keys as read for this config (`md5::load_all`).
    pub fn reconcile(
        &mut self,
        bgp: Option<&Bgp>,
        segment_ids: SegmentIds<'_>,
        mut keys: md5::Keys,
    ) -> Vec<IpAddr> {
        let Some(b) = bgp else {
            return Vec::new();
        };
        let mut stopped = Vec::new();
        for p in &mut self.peers {
            // Only BFD changed: the agent's BFD follows; the session stays as it is.
            if let Some(n) = b.neighbors.iter().find(|n| {
                n.address == p.address
                    && n.bfd != p.neighbor.bfd
                    && Neighbor {
                        bfd: n.bfd,
                        ..p.neighbor.clone()
                    } == **n
            }) {
                p.neighbor = n.clone();
            }
            // Only the import policy changed: keep the session, ask for the routes again.
            let refreshed = b.neighbors.iter().find(|n| {
                n.address == p.address
                    && **n != p.neighbor
                    && Neighbor {
                        import: n.import.clone(),
                        ..p.neighbor.clone()
                    } == **n
            });
            if let Some(n) = refreshed {
                p.import = n.import.clone();
                p.neighbor = n.clone();
                let _ = p.control.send(Control::Refresh);
            }
        }
        let (keep, gone): (Vec<Peer>, Vec<Peer>) =
            std::mem::take(&mut self.peers).into_iter().partition(|p| {
                b.neighbors.contains(&p.neighbor) && keys.get(&p.address) == Some(&p.password)
            });
        self.peers = keep;
        let mut replaced = HashMap::new();
        for p in gone {
            // RFC 4486: tell the peer why, so it drops our routes now instead of keeping
            // them for a graceful restart.
            let changed = b.neighbors.iter().any(|n| n.address == p.address);
            let (what, subcode) = if changed {
                ("changed", packet::CEASE_OTHER_CONFIG_CHANGE)
            } else {
                ("removed", packet::CEASE_PEER_DECONFIGURED)
            };
            info!(
                "bgp {} ({}): {what}: session stopped (Cease {subcode})",
                p.name, p.address
            );
            stopped.push(p.address);
            if p.neighbor.password_file.is_some() || p.neighbor.password_env.is_some() {
                let _ = md5::set(&*self.listener, p.address, None);
            }
            let address = p.address;
            let gone = p.stop(subcode);
            if changed {
                replaced.insert(address, gone);
            }
        }
        {
            let mut inboxes = self.inboxes.lock().unwrap();
            for a in &stopped {
                inboxes.remove(a);
            }
        }
        let new: Vec<Neighbor> = b
            .neighbors
            .iter()
            .filter(|n| !self.peers.iter().any(|p| p.neighbor == **n))
            .cloned()
            .collect();
        for n in &new {
            info!("bgp {} ({}): starting", n.name, n.address);
            let key = keys.remove(&n.address).flatten();
            if let Err(e) = self.spawn(segment_ids, n, key, replaced.remove(&n.address)) {
                warn!("bgp {} ({}): not started: {e:#}", n.name, n.address);
            }
        }
        self.bgp.neighbors = b.neighbors.clone();
        stopped
    }

    /// Recomputes what each neighbour of `segment` is sent, from `routes` (the segment's
    /// routes with their BGP attributes when learned, `None` for static ones) and the
    /// neighbours' advertisement modes.
    pub fn readvertise(&self, segment: u32, routes: &[SegmentRoute]) {
        if self.restarting() {
            return;
        }
        let internal = |peer: &IpAddr| {
            self.peers
                .iter()
                .any(|q| q.address == *peer && q.remote_asn == self.asn)
        };
        for p in self.peers.iter().filter(|p| p.segment == segment) {
            let list = advertise::adverts(self.asn, &p.neighbor, routes, internal);
            p.adverts.send_if_modified(|cur| {
                if cur.as_deref() == Some(&list) {
                    false
                } else {
                    *cur = Some(Arc::new(list));
                    true
                }
            });
        }
    }

    /// Whether the agent is still restarting (routes not selected, nothing advertised).
    pub fn restarting(&self) -> bool {
        self.restarting.load(Ordering::Relaxed)
    }

    /// The restarted agent has selected its routes: advertisements may flow (the caller
    /// readvertises every segment), later OPENs no longer carry the R bit.
    pub fn restart_done(&self) {
        self.restarting.store(false, Ordering::Relaxed);
    }

    /// Stops every session with Cease/Administrative Shutdown, so peers drop our routes
    /// now; waits up to a second for the NOTIFICATIONs to go out.
    pub async fn shutdown(&mut self) {
        for p in &self.peers {
            let _ = p
                .control
                .send(Control::Shutdown(packet::CEASE_ADMIN_SHUTDOWN));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for p in &mut self.peers {
                if let Some(t) = &mut p.task {
                    let _ = t.await;
                }
            }
        })
        .await;
        self.peers.clear();
    }

    /// Stops listening: the port is free once this returns (a new speaker may bind it).
    pub async fn close(mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Resets the session with `peer` (Cease `subcode`); it connects again by itself.
    pub fn reset(&self, peer: IpAddr, subcode: u8) {
        for p in self.peers.iter().filter(|p| p.address == peer) {
            if p.control.send(Control::Reset(subcode)).is_err() {
                log::debug!("bgp {peer}: session task gone");
            }
        }
    }

    /// Drops every session without a NOTIFICATION: to graceful-restart peers this is a
    /// restart, and they keep our routes for `restart_time`.
    pub fn close_for_restart(&mut self) {
        self.peers.clear();
    }
}

/// AS_PATH as text, for status.
pub fn as_path_string(p: &[AsSegment]) -> String {
    p.iter()
        .map(|s| {
            let a: Vec<String> = s.asns.iter().map(|x| x.to_string()).collect();
            if s.kind == 1 {
                format!("{{{}}}", a.join(" "))
            } else {
                a.join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
pub mod policy;
