//! The exporting process: a task that reads samples from the ring buffer as they come,
//! feeds the cache, and once a second sends what expired to every collector.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use xnet_common::FlowSample;

use super::cache::{Cache, Record};
use super::config::Flows;
use super::ipfix::Encoder;

/// Templates go out again this often (collectors restart; UDP loses).
const TEMPLATE_REFRESH: Duration = Duration::from_secs(60);

/// What `xnet status` shows of flow export.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FlowStats {
    pub samples: u64,
    pub flows_in_cache: usize,
    pub records_exported: u64,
    pub messages_sent: u64,
    /// Samples of new flows dropped because the cache was full.
    pub lost: u64,
    pub send_errors: u64,
}

pub struct Exporter {
    stop: Option<oneshot::Sender<()>>,
    /// The task gives the ring buffer back when it stops (for the next exporter).
    done: Option<tokio::task::JoinHandle<RingBuf<MapData>>>,
    pub stats: Arc<Mutex<FlowStats>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Exporter {
    /// Starts exporting the samples of `ring`; `rates`: segment id → its 1-in-N.
    pub async fn start(
        ring: RingBuf<MapData>,
        cfg: &Flows,
        rates: HashMap<u32, u32>,
    ) -> Result<Exporter> {
        // SAFETY: the AsyncFd owns the ring buffer, so its descriptor stays open (and is
        // not reused) while registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("flow samples ring buffer: {}", e.into_parts().1))?;
        let v4 = UdpSocket::bind("0.0.0.0:0").await.context("IPFIX socket")?;
        let v6 = UdpSocket::bind("[::]:0").await.ok();
        let stats = Arc::new(Mutex::new(FlowStats::default()));
        let (stop, mut stopped) = oneshot::channel();
        let mut task = Task {
            cache: Cache::new(
                cfg.idle_timeout_secs * 1000,
                cfg.active_timeout_secs * 1000,
                cfg.max_flows,
            ),
            encoder: Encoder::new(cfg.observation_domain, cfg.enterprise_number),
            collectors: cfg.collectors.clone(),
            v4,
            v6,
            rates,
            stats: stats.clone(),
            templates_at: None,
        };
        info!(
            "flow export to {:?} (IPFIX over UDP, idle {} s, active {} s)",
            cfg.collectors, cfg.idle_timeout_secs, cfg.active_timeout_secs
        );
        let done = tokio::spawn(async move {
            let mut ring = ring;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    guard = ring.readable_mut() => match guard {
                        Ok(mut g) => {
                            let now = now_ms();
                            let rb = g.get_inner_mut();
                            let mut read = 0;
                            while let Some(item) = rb.next() {
                                if item.len() >= std::mem::size_of::<FlowSample>() {
                                    let s: FlowSample = bytemuck::pod_read_unaligned(
                                        &item[..std::mem::size_of::<FlowSample>()],
                                    );
                                    task.sample(&s, now);
                                    read += 1;
                                }
                            }
                            g.clear_ready();
                            // The shared stats once per batch, not per sample.
                            let mut st = task.stats.lock().unwrap();
                            st.samples += read;
                            st.lost = task.cache.lost;
                            st.flows_in_cache = task.cache.len();
                        }
                        Err(e) => {
                            warn!("flow samples: {e}");
                            break;
                        }
                    },
                    _ = tick.tick() => {
                        let due = task.cache.expire(now_ms());
                        task.export(&due).await;
                    }
                }
            }
            // Stopping: what the cache holds goes out.
            let rest = task.cache.drain();
            task.export(&rest).await;
            ring.into_inner()
        });
        Ok(Exporter {
            stop: Some(stop),
            done: Some(done),
            stats,
        })
    }

    /// Exports every flow in the cache and stops; returns the ring buffer.
    pub async fn stop(&mut self) -> Option<RingBuf<MapData>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let d = self.done.take()?;
        tokio::time::timeout(Duration::from_secs(2), d)
            .await
            .ok()?
            .ok()
    }
}

struct Task {
    cache: Cache,
    encoder: Encoder,
    collectors: Vec<SocketAddr>,
    v4: UdpSocket,
    v6: Option<UdpSocket>,
    rates: HashMap<u32, u32>,
    stats: Arc<Mutex<FlowStats>>,
    templates_at: Option<std::time::Instant>,
}

impl Task {
    fn sample(&mut self, s: &FlowSample, now_ms: u64) {
        let rate = self.rates.get(&s.segment).copied().unwrap_or(1);
        self.cache.add(s, rate, now_ms);
    }

    async fn export(&mut self, records: &[Record]) {
        let refresh = self
            .templates_at
            .is_none_or(|t| t.elapsed() >= TEMPLATE_REFRESH);
        if records.is_empty() && !refresh {
            return;
        }
        let secs = (now_ms() / 1000) as u32;
        let mut rates: Vec<u32> = self.rates.values().copied().collect();
        rates.sort();
        rates.dedup();
        let messages = self.encoder.messages(records, &rates, secs, refresh);
        if refresh {
            self.templates_at = Some(std::time::Instant::now());
        }
        let (mut sent, mut errors) = (0u64, 0u64);
        for m in &messages {
            for c in &self.collectors {
                let sock = match (c, &self.v6) {
                    (SocketAddr::V6(_), Some(v6)) => v6,
                    _ => &self.v4,
                };
                match sock.send_to(m, c).await {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        errors += 1;
                        log::debug!("IPFIX to {c}: {e}");
                    }
                }
            }
        }
        let mut st = self.stats.lock().unwrap();
        st.records_exported += records.len() as u64;
        st.messages_sent += sent;
        st.send_errors += errors;
        st.flows_in_cache = self.cache.len();
    }
}
