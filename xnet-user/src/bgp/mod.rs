//! BGP: the wire codec (`packet`), the per-neighbour session state machine (`fsm`), the
//! RIB with best-path selection (`rib`) and what is advertised to whom (`policy`).
pub mod fsm;
pub mod packet;
pub mod rib;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::config::{Advertise, Config};
use fsm::{Advert, Event, SessionConfig, SharedState};
use packet::{AsSegment, Attrs};

/// One configured neighbour and the handles to its session task.
pub struct Peer {
    pub name: String,
    pub segment: u32,
    pub address: IpAddr,
    pub remote_asn: u32,
    pub advertise: Advertise,
    pub prefixes: Vec<ipnet::IpNet>,
    pub state: SharedState,
    pub adverts: watch::Sender<Arc<Vec<Advert>>>,
    pub import: policy::Import,
    pub export: policy::Export,
}

/// The BGP speaker: listener, sessions, and the channel their events arrive on.
pub struct Speaker {
    pub asn: u32,
    pub peers: Vec<Peer>,
    pub events: mpsc::Receiver<Event>,
}

impl Speaker {
    /// Starts a session per neighbour and a listener that hands incoming connections to
    /// them (connections from unknown addresses are closed).
    pub async fn start(config: &Config) -> Result<Option<Speaker>> {
        let Some(b) = &config.bgp else {
            return Ok(None);
        };
        let (tx, events) = mpsc::channel(4096);
        let mut inboxes: HashMap<IpAddr, mpsc::Sender<TcpStream>> = HashMap::new();
        let mut peers = Vec::new();
        for n in &b.neighbors {
            let (in_tx, in_rx) = mpsc::channel(4);
            inboxes.insert(n.address, in_tx);
            let (adv_tx, adv_rx) = watch::channel(Arc::new(Vec::new()));
            let state: SharedState = Default::default();
            let cfg = SessionConfig {
                name: n.name.clone(),
                segment: config.segment_id(&n.segment).unwrap(),
                local_asn: b.asn,
                router_id: b.router_id,
                peer: n.address,
                port: b.port,
                remote_asn: n.remote_asn,
                hold_time: n.hold_time,
                passive: n.passive,
                max_prefixes: n.max_prefixes,
                local_address: n.local_address,
            };
            tokio::spawn(fsm::run(cfg, tx.clone(), in_rx, adv_rx, state.clone()));
            peers.push(Peer {
                name: n.name.clone(),
                segment: config.segment_id(&n.segment).unwrap(),
                address: n.address,
                remote_asn: n.remote_asn,
                advertise: n.advertise,
                prefixes: n.prefixes.clone(),
                state,
                adverts: adv_tx,
                import: n.import.clone(),
                export: n.export.clone(),
            });
        }
        let listener = TcpListener::bind(SocketAddr::new("::".parse().unwrap(), b.port))
            .await
            .with_context(|| format!("bgp: listening on port {}", b.port))?;
        info!(
            "bgp: AS {}, router id {}, listening on port {}, {} neighbours",
            b.asn,
            b.router_id,
            b.port,
            peers.len()
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    continue;
                };
                let ip = from.ip().to_canonical();
                match inboxes.get(&ip) {
                    Some(inbox) => {
                        let _ = inbox.try_send(stream);
                    }
                    None => warn!("bgp: connection from unknown peer {ip} closed"),
                }
            }
        });
        Ok(Some(Speaker {
            asn: b.asn,
            peers,
            events,
        }))
    }

    /// Recomputes what each neighbour of `segment` is sent, from `routes` (the segment's
    /// routes with their BGP attributes when learned, `None` for static ones) and the
    /// neighbours' advertisement modes.
    pub fn readvertise(
        &self,
        segment: u32,
        routes: &[(ipnet::IpNet, Option<(IpAddr, Arc<Attrs>)>)],
    ) {
        for p in self.peers.iter().filter(|p| p.segment == segment) {
            let own = |net| Advert {
                net,
                attrs: Attrs {
                    origin: 0,
                    ..Default::default()
                },
            };
            let list: Vec<Advert> = match p.advertise {
                Advertise::None => Vec::new(),
                Advertise::Default => {
                    vec![own(if p.address.is_ipv4() {
                        "0.0.0.0/0".parse().unwrap()
                    } else {
                        "::/0".parse().unwrap()
                    })]
                }
                Advertise::Custom => p.prefixes.iter().map(|n| own(*n)).collect(),
                Advertise::All => routes
                    .iter()
                    // Split horizon: nothing goes back to the peer it came from.
                    .filter(|(_, from)| from.as_ref().is_none_or(|(peer, _)| *peer != p.address))
                    .map(|(net, from)| match from {
                        Some((_, a)) => Advert {
                            net: *net,
                            attrs: Attrs {
                                local_pref: None,
                                med: None,
                                ..(**a).clone()
                            },
                        },
                        None => own(*net),
                    })
                    .collect(),
            };
            let list: Vec<Advert> = list
                .into_iter()
                .map(|mut a| {
                    p.export.apply(self.asn, &mut a.attrs);
                    a
                })
                .collect();
            p.adverts.send_if_modified(|cur| {
                if **cur == list {
                    false
                } else {
                    *cur = Arc::new(list);
                    true
                }
            });
        }
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
