//! Says when the agent's event loop stops running. Everything the agent does shares one
//! thread (the tokio runtime): a call that blocks it (a synchronous netlink request, a long
//! computation) holds up BGP keepalives, IKE, status and start-up alike. A thread of its
//! own watches a heartbeat the loop bumps; when it goes stale it logs where the loop's
//! thread waits (its kernel stack from /proc), and how long the stall lasted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;

/// A stall this long is worth a warning.
const STALL: Duration = Duration::from_secs(1);
const BEAT: Duration = Duration::from_millis(100);

/// Starts the heartbeat on the current runtime and the watching thread.
pub(super) fn start() {
    let t0 = Instant::now();
    let beat = Arc::new(AtomicU64::new(0));
    let b = beat.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BEAT);
        loop {
            tick.tick().await;
            b.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    });
    // SAFETY: gettid has no preconditions; this is the runtime's thread.
    let tid = unsafe { libc::gettid() };
    let spawned = std::thread::Builder::new()
        .name("xnet-watchdog".into())
        .spawn(move || {
            let mut stalled_since: Option<u64> = None;
            loop {
                std::thread::sleep(BEAT * 5);
                let now = t0.elapsed().as_millis() as u64;
                let last = beat.load(Ordering::Relaxed);
                let stale = now.saturating_sub(last);
                match stalled_since {
                    None if stale > STALL.as_millis() as u64 => {
                        stalled_since = Some(last);
                        warn!(
                            "the agent's event loop has not run for {stale} ms; its thread waits in {}",
                            where_waits(tid)
                        );
                    }
                    Some(since) if last > since => {
                        warn!(
                            "the agent's event loop ran again after a stall of about {} ms",
                            last - since
                        );
                        stalled_since = None;
                    }
                    _ => {}
                }
            }
        });
    if let Err(e) = spawned {
        warn!("no watchdog for the event loop: {e}");
    }
}

/// The kernel function and stack thread `tid` of this process sleeps in ("running" when
/// it does not sleep: a computation).
fn where_waits(tid: i32) -> String {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}"));
    let wchan = read("wchan").unwrap_or_default();
    let stack = read("stack").unwrap_or_default();
    let frames: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(8)
        .collect();
    match (wchan.trim(), frames.is_empty()) {
        ("" | "0", true) => "running (not in a system call)".into(),
        (w, true) => w.to_string(),
        (w, false) => format!("{w} [{}]", frames.join(" < ")),
    }
}
