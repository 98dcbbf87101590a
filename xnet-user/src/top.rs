//! `xnet top`: a live view of a running agent, refreshed every second: per-interface
//! packet and bit rates, passes and drops by reason, the busiest policy rules, BGP and
//! IPsec sessions, firewall instances. Rates are the difference of two brief statuses
//! (`view`, pure); `draw` lays the view out with ratatui; `run` owns the terminal.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::status::{self, Status};

/// Everything one screen shows, as text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct View {
    pub title: String,
    pub interfaces: Vec<Vec<String>>,
    pub reasons: Vec<Vec<String>>,
    pub rules: Vec<Vec<String>>,
    pub bgp: Vec<Vec<String>>,
    pub ipsec: Vec<Vec<String>>,
    pub firewalls: Vec<Vec<String>>,
}

/// Per second, from the difference of two counters (0 without a previous sample, or
/// when a counter went back: the agent restarted).
fn rate(now: u64, before: Option<u64>, secs: f64) -> f64 {
    match before {
        Some(b) if now >= b && secs > 0.0 => (now - b) as f64 / secs,
        _ => 0.0,
    }
}

/// 1234567 → "1.23M".
pub fn si(v: f64) -> String {
    let (d, unit) = match v {
        v if v >= 1e9 => (1e9, "G"),
        v if v >= 1e6 => (1e6, "M"),
        v if v >= 1e3 => (1e3, "k"),
        _ => return format!("{v:.0}"),
    };
    format!("{:.2}{unit}", v / d)
}

fn duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The view of `cur`, with rates against `prev` taken `secs` earlier.
pub fn view(prev: Option<&Status>, cur: &Status, secs: f64, now_unix: f64) -> View {
    let mut v = View::default();
    let itf = |name: &str| prev.and_then(|p| p.interface(name));
    let (mut fwd, mut pass, mut drop) = (0.0, 0.0, 0.0);
    for i in &cur.interfaces {
        let p = itf(&i.name);
        let r = |f: fn(&status::InterfaceStatus) -> u64| rate(f(i), p.map(f), secs);
        let (f, pa, d) = (r(|x| x.forwarded), r(|x| x.passed), r(|x| x.dropped));
        fwd += f;
        pass += pa;
        drop += d;
        v.interfaces.push(vec![
            i.name.clone(),
            i.segment.clone(),
            i.xdp.clone(),
            si(r(|x| x.rx)),
            format!("{}b", si(8.0 * r(|x| x.rx_bytes))),
            si(f),
            si(pa),
            si(d),
        ]);
    }
    let uptime = (now_unix - cur.started_unix).max(0.0) as u64;
    v.title = format!(
        " xnet top — {} — up {} — forwarded {}/s, to the kernel {}/s, dropped {}/s ",
        cur.config,
        duration(uptime),
        si(fwd),
        si(pass),
        si(drop)
    );

    // Reasons, all interfaces together: the busiest first, then the largest totals.
    let mut reasons: Vec<(String, String, f64, u64)> = Vec::new();
    for i in &cur.interfaces {
        for c in &i.reasons {
            let before = prev.and_then(|p| p.interface(&i.name)).map(|p| {
                p.reasons
                    .iter()
                    .find(|x| x.reason == c.reason)
                    .map_or(0, |x| x.packets)
            });
            let r = rate(c.packets, before, secs);
            match reasons.iter_mut().find(|x| x.0 == c.reason) {
                Some(x) => {
                    x.2 += r;
                    x.3 += c.packets;
                }
                None => reasons.push((c.reason.clone(), c.outcome.clone(), r, c.packets)),
            }
        }
    }
    reasons.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)));
    v.reasons = reasons
        .into_iter()
        .map(|(n, o, r, t)| vec![n, o, si(r), si(t as f64)])
        .collect();

    let mut rules: Vec<(f64, Vec<String>)> = cur
        .policies
        .iter()
        .map(|p| {
            let before = prev.and_then(|x| {
                x.policies
                    .iter()
                    .find(|q| q.name == p.name && q.segment == p.segment)
            });
            let pps = rate(p.packets, before.map(|b| b.packets), secs);
            let bps = 8.0 * rate(p.bytes, before.map(|b| b.bytes), secs);
            (
                pps,
                vec![
                    p.name.clone(),
                    p.segment.clone(),
                    p.action.clone(),
                    si(pps),
                    format!("{}b", si(bps)),
                    si(p.packets as f64),
                ],
            )
        })
        .collect();
    rules.sort_by(|a, b| b.0.total_cmp(&a.0));
    v.rules = rules.into_iter().map(|(_, r)| r).collect();

    v.bgp = cur
        .bgp
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.peer.clone(),
                b.state.clone(),
                if b.state == "Established" {
                    duration(b.uptime_secs)
                } else {
                    "-".into()
                },
                b.received.to_string(),
                b.sent.to_string(),
                b.flaps.to_string(),
            ]
        })
        .collect();
    v.ipsec = cur
        .ipsec
        .iter()
        .map(|c| {
            let before = prev.and_then(|p| p.ipsec.iter().find(|x| x.name == c.name));
            let bps = |f: fn(&status::IpsecStatus) -> u64| {
                format!("{}b", si(8.0 * rate(f(c), before.map(f), secs)))
            };
            vec![
                c.name.clone(),
                c.remote.clone(),
                c.state.clone(),
                c.children
                    .iter()
                    .filter(|x| x.installed)
                    .count()
                    .to_string(),
                bps(|x| x.totals.bytes_in),
                bps(|x| x.totals.bytes_out),
                (c.totals.ike_rekeys + c.totals.child_rekeys).to_string(),
            ]
        })
        .collect();
    for svc in &cur.services {
        for i in &svc.instances {
            let before = prev
                .and_then(|p| p.services.iter().find(|s| s.name == svc.name))
                .and_then(|s| s.instances.iter().find(|x| x.name == i.name));
            v.firewalls.push(vec![
                svc.name.clone(),
                i.name.clone(),
                i.via.clone(),
                i.health.clone(),
                i.probe_rtt_ms
                    .map_or("-".into(), |ms| format!("{ms:.2} ms")),
                si(rate(i.packets, before.map(|b| b.packets), secs)),
            ]);
        }
    }
    v
}

fn table<'a>(
    title: &'a str,
    header: &'a [&'a str],
    rows: &'a [Vec<String>],
    widths: &'a [u16],
) -> Table<'a> {
    let rows = rows
        .iter()
        .map(|r| Row::new(r.iter().map(|c| Cell::from(c.as_str()))));
    Table::new(rows, widths.iter().map(|w| Constraint::Length(*w)))
        .header(Row::new(header.iter().copied()).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::new().borders(Borders::TOP).title(title))
}

/// Lays `v` out on one screen.
pub fn draw(f: &mut Frame, v: &View) {
    let h = |rows: usize, max: usize| Constraint::Length((rows.min(max) + 2) as u16);
    let [title, itf, mid, bgp, ipsec, fws, _, help] = Layout::vertical([
        Constraint::Length(1),
        h(v.interfaces.len(), 12),
        h(v.reasons.len().max(v.rules.len()), 12),
        h(v.bgp.len(), 8),
        h(v.ipsec.len(), 8),
        h(v.firewalls.len(), 8),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(Line::from(v.title.as_str()))
            .style(Style::new().add_modifier(Modifier::REVERSED)),
        title,
    );
    f.render_widget(
        table(
            "Interfaces",
            &[
                "NAME", "SEGMENT", "XDP", "RX pps", "RX bps", "FWD pps", "PASS pps", "DROP pps",
            ],
            &v.interfaces,
            &[12, 10, 8, 9, 10, 9, 9, 9],
        ),
        itf,
    );
    let [reasons, rules] =
        Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(mid);
    f.render_widget(
        table(
            "Outcomes by reason",
            &["REASON", "OUTCOME", "pps", "TOTAL"],
            &v.reasons,
            &[18, 10, 8, 8],
        ),
        reasons,
    );
    f.render_widget(
        table(
            "Busiest rules",
            &["RULE", "SEGMENT", "ACTION", "pps", "bps", "HITS"],
            &v.rules,
            &[20, 8, 14, 8, 9, 8],
        ),
        rules,
    );
    f.render_widget(
        table(
            "BGP",
            &[
                "NEIGHBOR",
                "PEER",
                "STATE",
                "UP",
                "ACCEPTED",
                "ADVERTISED",
                "FLAPS",
            ],
            &v.bgp,
            &[14, 26, 12, 8, 9, 11, 6],
        ),
        bgp,
    );
    f.render_widget(
        table(
            "IPsec",
            &[
                "CONNECTOR",
                "REMOTE",
                "STATE",
                "CHILD SAs",
                "IN bps",
                "OUT bps",
                "REKEYS",
            ],
            &v.ipsec,
            &[14, 18, 12, 10, 10, 10, 7],
        ),
        ipsec,
    );
    f.render_widget(
        table(
            "Firewalls",
            &[
                "SERVICE",
                "INSTANCE",
                "VIA",
                "HEALTH",
                "PROBE RTT",
                "STEERED pps",
            ],
            &v.firewalls,
            &[10, 12, 18, 8, 10, 12],
        ),
        fws,
    );
    f.render_widget(Paragraph::new(" q: quit"), help);
}

/// Two samples `interval` apart, drawn once into a `width`×`height` text screen (for a
/// terminal that is not one, and for tests).
pub async fn once(socket: &Path, interval: Duration, width: u16, height: u16) -> Result<String> {
    let a = status::fetch_brief(socket).await?;
    let t = Instant::now();
    tokio::time::sleep(interval).await;
    let b = status::fetch_brief(socket).await?;
    let v = view(
        Some(&a),
        &b,
        t.elapsed().as_secs_f64(),
        crate::status::unix_now(),
    );
    let mut term = ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height))?;
    term.draw(|f| draw(f, &v))?;
    let buf = term.backend().buffer();
    let area: Rect = buf.area;
    let mut out = String::new();
    for y in 0..area.height {
        let line: String = (0..area.width).map(|x| buf[(x, y)].symbol()).collect();
        out += line.trim_end();
        out.push('\n');
    }
    Ok(out)
}

/// The live view until `q`, Esc or Ctrl-C.
pub async fn run(socket: &Path, interval: Duration) -> Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    // Fail before the screen changes if the agent is not there.
    let mut prev = status::fetch_brief(socket).await?;
    let mut prev_at = Instant::now();
    let mut v = view(None, &prev, 0.0, crate::status::unix_now());
    let mut term = ratatui::init();
    let result: Result<()> = async {
        loop {
            term.draw(|f| draw(f, &v))?;
            let deadline = prev_at + interval;
            // Keys while waiting for the next sample.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if event::poll(left.min(Duration::from_millis(100)))? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                }
            }
            let cur = status::fetch_brief(socket).await?;
            let now = Instant::now();
            v = view(
                Some(&prev),
                &cur,
                (now - prev_at).as_secs_f64(),
                crate::status::unix_now(),
            );
            prev = cur;
            prev_at = now;
        }
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::*;

    fn status(fwd: u64, bytes: u64, hits: u64) -> Status {
        Status {
            config: "/etc/xnet/xnet.toml".into(),
            started_unix: 1000.0,
            interfaces: vec![InterfaceStatus {
                name: "vnet1".into(),
                segment: "prod".into(),
                xdp: "native".into(),
                rx: fwd + 10,
                forwarded: fwd,
                passed: 10,
                rx_bytes: bytes,
                reasons: vec![ReasonCount {
                    reason: "forwarded".into(),
                    outcome: "forwarded".into(),
                    packets: fwd,
                    bytes,
                }],
                ..Default::default()
            }],
            policies: vec![PolicyStatus {
                name: "steer-udp".into(),
                segment: "prod".into(),
                action: "steer fw".into(),
                packets: hits,
                bytes: hits * 100,
            }],
            bgp: vec![BgpSessionStatus {
                name: "onprem".into(),
                peer: "10.0.3.2".into(),
                state: "Established".into(),
                uptime_secs: 3700,
                received: 2,
                sent: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn rates_come_from_two_samples() {
        let a = status(1_000, 1_000_000, 50);
        let b = status(3_000, 3_000_000, 250);
        let v = view(Some(&a), &b, 2.0, 1060.0);
        assert_eq!(
            v.interfaces[0],
            ["vnet1", "prod", "native", "1.00k", "8.00Mb", "1.00k", "0", "0"]
        );
        assert_eq!(v.reasons[0], ["forwarded", "forwarded", "1.00k", "3.00k"]);
        assert_eq!(v.rules[0][3], "100");
        assert_eq!(
            v.bgp[0],
            ["onprem", "10.0.3.2", "Established", "1h1m", "2", "1", "0"]
        );
        assert!(v.title.contains("up 1m0s"), "{}", v.title);
        // A counter that went back (the agent restarted): no negative rate.
        let v = view(Some(&b), &a, 2.0, 1060.0);
        assert_eq!(v.interfaces[0][5], "0");
    }

    #[test]
    fn the_screen_shows_every_section() {
        let v = view(None, &status(1, 1, 1), 1.0, 1001.0);
        let mut term = ratatui::Terminal::new(ratatui::backend::TestBackend::new(100, 30)).unwrap();
        term.draw(|f| draw(f, &v)).unwrap();
        let text: String = term
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for s in [
            "Interfaces",
            "Busiest rules",
            "BGP",
            "IPsec",
            "Firewalls",
            "steer-udp",
            "Established",
        ] {
            assert!(text.contains(s), "{s}");
        }
    }
}
