//! The node's link to etcd: a tokio task that keeps the node's key under a lease, follows
//! the cluster's keys with one watch and tells the agent's loop (`Event`); on any failure
//! it reports the loss and starts over. Also the one-shot reads and the compare-and-swap
//! write the command-line tools use.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use log::{info, warn};
use tokio::sync::{mpsc, watch};

use super::{cluster_prefix, config_key, nodes_prefix, NodeRecord};

/// Lease time to live: a node that stops renewing leaves the live set after this.
pub const LEASE_TTL_S: i64 = 3;
/// How often the lease is renewed, and how long without an answer counts as losing etcd.
const KEEPALIVE: Duration = Duration::from_millis(500);
const LOST_AFTER: Duration = Duration::from_millis(1500);

/// What the store tells the agent.
#[derive(Debug, Clone)]
pub enum Event {
    /// etcd answers again (true) or stopped answering (false).
    Connected(bool),
    /// The cluster's config document at etcd revision `revision` (its mod_revision).
    Config { revision: i64, text: String },
    /// The live nodes, after any change.
    Members(BTreeMap<String, NodeRecord>),
}

/// The running task: its events, and where the node's record is handed to it.
pub struct Store {
    pub events: mpsc::Receiver<Event>,
    record: watch::Sender<NodeRecord>,
    task: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Starts the task for node `node` of `cluster` at `endpoints`.
    pub fn start(endpoints: Vec<String>, cluster: String, record: NodeRecord) -> Store {
        let (tx, events) = mpsc::channel(64);
        let (record, rx) = watch::channel(record);
        let task = tokio::spawn(async move {
            let mut connected = false;
            loop {
                let e = session(&endpoints, &cluster, rx.clone(), &tx, &mut connected).await;
                if connected {
                    warn!("cluster {cluster}: lost etcd ({e:#}): forwarding on with the config in force and this node's own probes");
                    connected = false;
                    if tx.send(Event::Connected(false)).await.is_err() {
                        return;
                    }
                } else {
                    log::debug!("cluster {cluster}: etcd: {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Store {
            events,
            record,
            task,
        }
    }

    /// Publishes the node's record (only when it changed).
    pub fn publish(&self, r: NodeRecord) {
        self.record.send_if_modified(|old| {
            let changed = *old != r;
            *old = r;
            changed
        });
    }

    pub fn record(&self) -> NodeRecord {
        self.record.borrow().clone()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client of the first etcd member in `endpoints` that answers and has a leader.
/// One member, not a balanced set: etcd-client's balancing still sends requests to a
/// member that died (connection refused); on any failure the caller connects again and
/// gets the next live one. Requests time out instead of hanging on a lost member.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let mut errors = Vec::new();
    for e in endpoints {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_require_leader(true);
        let answer = async {
            let mut c = Client::connect([e], Some(opts)).await?;
            let s = c.status().await?;
            if s.leader() == 0 {
                bail!("no leader");
            }
            Ok(c)
        };
        match tokio::time::timeout(Duration::from_secs(1), answer).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(err)) => errors.push(format!("{e}: {err:#}")),
            Err(_) => errors.push(format!("{e}: no answer within 1 s")),
        }
    }
    bail!("no etcd member answers: {}", errors.join("; "))
}

/// One connection's life: lease, record, initial read, then watch and renew until
/// something fails (returned).
async fn session(
    endpoints: &[String],
    cluster: &str,
    mut record: watch::Receiver<NodeRecord>,
    tx: &mpsc::Sender<Event>,
    connected: &mut bool,
) -> anyhow::Error {
    let r: Result<()> = async {
        let mut client = connect(endpoints).await?;
        let lease = client.lease_grant(LEASE_TTL_S, None).await?.id();
        let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
        let node = record.borrow_and_update().node.clone();
        let key = format!("{}{node}", nodes_prefix(cluster));
        let put = |r: &NodeRecord| serde_json::to_vec(r).expect("a record serializes");
        let body = put(&record.borrow());
        client
            .put(key.as_str(), body, Some(PutOptions::new().with_lease(lease)))
            .await?;
        let all = client
            .get(cluster_prefix(cluster), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = all.header().map_or(0, |h| h.revision());
        let mut members = BTreeMap::new();
        let mut config = None;
        for kv in all.kvs() {
            on_put(cluster, kv, &mut members, &mut config);
        }
        let mut watch = client
            .watch(
                cluster_prefix(cluster),
                Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
            )
            .await?;
        info!("cluster {cluster}: node {node} joined (etcd revision {revision}, {} live nodes)", members.len());
        *connected = true;
        let send = |e: Event| async { tx.send(e).await.map_err(|_| anyhow::anyhow!("agent gone")) };
        send(Event::Connected(true)).await?;
        if let Some((revision, text)) = config.take() {
            send(Event::Config { revision, text }).await?;
        }
        send(Event::Members(members.clone())).await?;
        let mut tick = tokio::time::interval(KEEPALIVE);
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if answered.elapsed() > LOST_AFTER {
                        bail!("no lease renewal answered for {} ms", answered.elapsed().as_millis());
                    }
                    keeper.keep_alive().await?;
                }
                m = renewals.message() => {
                    let m = m?.context("lease renewals ended")?;
                    if m.ttl() <= 0 {
                        bail!("our lease expired");
                    }
                    answered = Instant::now();
                }
                w = watch.message() => {
                    let w = w?.context("watch ended")?;
                    if w.canceled() {
                        bail!("watch cancelled: {}", w.cancel_reason());
                    }
                    let before = members.clone();
                    for ev in w.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => on_put(cluster, kv, &mut members, &mut config),
                            EventType::Delete => {
                                let k = String::from_utf8_lossy(kv.key());
                                if let Some(n) = k.strip_prefix(&nodes_prefix(cluster)) {
                                    members.remove(n);
                                } else if k == config_key(cluster) {
                                    warn!("cluster {cluster}: the config was deleted: keeping the one in force");
                                }
                            }
                        }
                    }
                    if let Some((revision, text)) = config.take() {
                        send(Event::Config { revision, text }).await?;
                    }
                    if members != before {
                        send(Event::Members(members.clone())).await?;
                    }
                }
                c = record.changed() => {
                    c?;
                    let body = put(&record.borrow_and_update());
                    client.put(key.as_str(), body, Some(PutOptions::new().with_lease(lease))).await?;
                }
            }
        }
    }
    .await;
    r.err().unwrap_or_else(|| anyhow::anyhow!("ended"))
}

/// A key of the cluster, read or changed: a node's record into `members`, the config into
/// `config` (revision, text).
fn on_put(
    cluster: &str,
    kv: &etcd_client::KeyValue,
    members: &mut BTreeMap<String, NodeRecord>,
    config: &mut Option<(i64, String)>,
) {
    let k = String::from_utf8_lossy(kv.key());
    if let Some(n) = k.strip_prefix(&nodes_prefix(cluster)) {
        match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(r) => {
                members.insert(n.to_string(), r);
            }
            Err(e) => warn!("cluster {cluster}: {k}: not a node record, ignored: {e}"),
        }
    } else if k == config_key(cluster) {
        *config = Some((
            kv.mod_revision(),
            String::from_utf8_lossy(kv.value()).into_owned(),
        ));
    }
}

/// The cluster's config: (revision, text), or None when none was pushed.
pub async fn get_config(client: &mut Client, cluster: &str) -> Result<Option<(i64, String)>> {
    let r = client.get(config_key(cluster), None).await?;
    Ok(r.kvs().first().map(|kv| {
        (
            kv.mod_revision(),
            String::from_utf8_lossy(kv.value()).into_owned(),
        )
    }))
}

/// Writes `text` as the cluster's config if it is still at revision `expected` (0: none
/// yet), in one transaction; returns the new revision. Someone else's write in between
/// fails it, naming their revision.
pub async fn put_config(
    client: &mut Client,
    cluster: &str,
    text: &str,
    expected: i64,
) -> Result<i64> {
    let key = config_key(cluster);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            expected,
        )])
        .and_then([TxnOp::put(key.as_str(), text, None)])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let r = client.txn(txn).await?;
    if !r.succeeded() {
        let now = get_config(client, cluster).await?.map_or(0, |(rev, _)| rev);
        bail!("{key} changed since revision {expected}: it is at revision {now} now (another push?); nothing written. Read it again (`xnet config get`), merge, push again");
    }
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// The live nodes' records.
pub async fn members(client: &mut Client, cluster: &str) -> Result<BTreeMap<String, NodeRecord>> {
    let r = client
        .get(nodes_prefix(cluster), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut m = BTreeMap::new();
    let mut ignored = None;
    for kv in r.kvs() {
        on_put(cluster, kv, &mut m, &mut ignored);
    }
    Ok(m)
}
