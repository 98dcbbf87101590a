//! One BFD session in asynchronous mode (RFC 5880 §6.8), sans-IO: it takes received
//! Control packets and the time, and returns packets to send and state changes. The
//! driver owns sockets and the clock; `deadline()` says when to call `timer` next.
//!
//! Timers (§6.8.2–§6.8.4): while the session is not Up we advertise a transmit interval
//! of at least one second; when it comes Up we move to the configured one with a Poll
//! Sequence. The transmit interval is max(our DesiredMinTx, the peer's RequiredMinRx),
//! less 0–25 % jitter (10–25 % with a Detect Mult of 1); the detection time is the
//! peer's Detect Mult × max(our RequiredMinRx, the peer's DesiredMinTx). During a Poll
//! Sequence a slower transmit interval and a faster receive interval wait for the Final.

use std::time::{Duration, Instant};

use super::packet::{Control, Diag, State};

/// The intervals an operator configures (`bfd = { interval_ms, multiplier }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub interval: Duration,
    pub multiplier: u8,
}

/// §6.8.3: no faster than one packet a second while the session is not Up.
pub const SLOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(Control),
    /// The session changed state; `diag` is our diagnostic (why it went down).
    State {
        from: State,
        to: State,
        diag: Diag,
    },
}

pub struct Session {
    timers: Timers,
    state: State,
    remote_state: State,
    local_discr: u32,
    remote_discr: u32,
    diag: Diag,
    /// bfd.DesiredMinTxInterval and bfd.RequiredMinRxInterval as advertised.
    desired_min_tx: Duration,
    required_min_rx: Duration,
    /// The values in effect until a Poll Sequence ends (§6.8.3).
    tx_in_effect: Duration,
    rx_in_effect: Duration,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    polling: bool,
    /// The peer polled: our next packet carries Final, now.
    send_final: bool,
    next_tx: Instant,
    /// Detection timer: set while we hear the peer.
    detect_at: Option<Instant>,
    /// xorshift state for the transmit jitter (§6.8.7).
    rng: u32,
    pub flaps: u32,
    pub last_diag: Diag,
    pub remote_diag: Diag,
}

impl Session {
    pub fn new(timers: Timers, local_discr: u32, now: Instant) -> Session {
        Session {
            timers,
            state: State::Down,
            remote_state: State::Down,
            local_discr,
            remote_discr: 0,
            diag: Diag::None,
            desired_min_tx: SLOW.max(timers.interval),
            required_min_rx: timers.interval,
            tx_in_effect: SLOW.max(timers.interval),
            rx_in_effect: timers.interval,
            // §6.8.1: initialised to 1 µs, so we may send before hearing the peer.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_mult: 0,
            polling: false,
            send_final: false,
            next_tx: now,
            detect_at: None,
            rng: local_discr | 1,
            flaps: 0,
            last_diag: Diag::None,
            remote_diag: Diag::None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn remote_state(&self) -> State {
        self.remote_state
    }
    pub fn discriminators(&self) -> (u32, u32) {
        (self.local_discr, self.remote_discr)
    }
    /// The transmit interval in use (before jitter) and the detection time.
    pub fn intervals(&self) -> (Duration, Duration) {
        (self.tx_interval(), self.detection_time())
    }
    /// When the next periodic packet is due.
    pub fn next_transmit(&self) -> Instant {
        self.next_tx
    }
    pub fn polling(&self) -> bool {
        self.polling
    }

    /// When `timer` must run next.
    pub fn deadline(&self) -> Instant {
        match self.detect_at {
            Some(d) if d < self.next_tx || !self.may_transmit() => d,
            _ if self.may_transmit() => self.next_tx,
            // Nothing to send and nothing to detect: an idle wake-up is harmless.
            _ => self.next_tx + SLOW,
        }
    }

    /// §6.8.7: never periodically when the peer asked for nothing (RequiredMinRx 0);
    /// AdminDown is still sent so the peer learns it.
    fn may_transmit(&self) -> bool {
        !self.remote_min_rx.is_zero()
    }

    fn tx_interval(&self) -> Duration {
        self.tx_in_effect.max(self.remote_min_rx)
    }

    fn detection_time(&self) -> Duration {
        self.rx_in_effect.max(self.remote_desired_tx) * self.remote_mult as u32
    }

    fn jittered(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        // 75–100 % of the interval; 75–90 % with a Detect Mult of 1.
        let span = if self.timers.multiplier == 1 { 15 } else { 25 };
        let pct = 75 + self.rng % (span + 1);
        self.tx_interval() * pct / 100
    }

    fn packet(&mut self) -> Control {
        let fin = std::mem::take(&mut self.send_final);
        Control {
            diag: self.diag,
            state: self.state,
            // §6.5: no Poll and Final in the same packet.
            poll: self.polling && !fin,
            fin,
            cpi: false,
            demand: false,
            detect_mult: self.timers.multiplier,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx: self.desired_min_tx,
            required_min_rx: self.required_min_rx,
            required_min_echo_rx: Duration::ZERO,
        }
    }

    fn set_state(&mut self, to: State, diag: Diag, now: Instant, out: &mut Vec<Output>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        self.diag = diag;
        if to == State::Down || to == State::AdminDown {
            if from == State::Up {
                self.flaps += 1;
            }
            self.last_diag = diag;
            // Back to one packet a second until Up again (§6.8.3). A session that is not
            // Up is not bound by the Poll rules: take the new values now.
            self.change_timers(SLOW.max(self.timers.interval), self.timers.interval, now);
        } else if to == State::Up {
            self.diag = Diag::None;
            self.change_timers(self.timers.interval, self.timers.interval, now);
        }
        out.push(Output::State { from, to, diag });
    }

    /// The operator changed the intervals (a reload): the session stays, the peer learns
    /// them by a Poll Sequence (§6.8.3); while not Up, one packet a second still.
    pub fn set_timers(&mut self, timers: Timers, now: Instant) {
        self.timers = timers;
        let tx = if self.state == State::Up {
            timers.interval
        } else {
            SLOW.max(timers.interval)
        };
        self.change_timers(tx, timers.interval, now);
    }

    /// New advertised intervals: a Poll Sequence tells the peer (§6.8.3).
    fn change_timers(&mut self, tx: Duration, rx: Duration, now: Instant) {
        if tx == self.desired_min_tx && rx == self.required_min_rx {
            return;
        }
        self.desired_min_tx = tx;
        self.required_min_rx = rx;
        if self.state == State::Up {
            // A slower transmit rate and a faster expected receive rate wait for Final.
            self.tx_in_effect = self.tx_in_effect.min(tx);
            self.rx_in_effect = self.rx_in_effect.max(rx);
        } else {
            self.tx_in_effect = tx;
            self.rx_in_effect = rx;
        }
        if self.remote_discr != 0 {
            self.polling = true;
            // The first packet of the sequence goes now.
            self.next_tx = now;
        }
    }

    /// A valid Control packet for this session (§6.8.6 from "If the Your Discriminator
    /// field is nonzero…" on; the demultiplexer found us).
    pub fn receive(&mut self, c: &Control, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        self.remote_discr = c.my_discr;
        self.remote_state = c.state;
        self.remote_diag = c.diag;
        self.remote_desired_tx = c.desired_min_tx;
        self.remote_mult = c.detect_mult;
        let was_silent = !self.may_transmit();
        self.remote_min_rx = c.required_min_rx;
        if c.fin && self.polling {
            // The Poll Sequence is over: the new values take effect.
            self.polling = false;
            self.tx_in_effect = self.desired_min_tx;
            self.rx_in_effect = self.required_min_rx;
        }
        if self.state == State::AdminDown {
            return out;
        }
        match (self.state, c.state) {
            (State::Down | State::Init | State::Up, State::AdminDown) => {
                if self.state != State::Down {
                    self.set_state(State::Down, Diag::NeighborSignaledDown, now, &mut out);
                }
            }
            (State::Down, State::Down) => self.set_state(State::Init, Diag::None, now, &mut out),
            (State::Down, State::Init) => self.set_state(State::Up, Diag::None, now, &mut out),
            (State::Init, State::Init | State::Up) => {
                self.set_state(State::Up, Diag::None, now, &mut out)
            }
            (State::Up, State::Down) => {
                self.set_state(State::Down, Diag::NeighborSignaledDown, now, &mut out)
            }
            _ => {}
        }
        // The detection timer restarts with every packet (none while the peer is
        // AdminDown: it will not send to time).
        self.detect_at = (c.state != State::AdminDown).then(|| now + self.detection_time());
        if c.poll {
            // §6.8.6: answer a Poll with Final at once, whatever the transmit timer says.
            self.send_final = true;
            out.push(Output::Send(self.packet()));
        } else if self.state_changed(&out) || (was_silent && self.may_transmit()) {
            // Tell the peer of our new state without waiting a whole (slow) interval.
            self.next_tx = now;
        }
        out.extend(self.timer(now));
        out
    }

    fn state_changed(&self, out: &[Output]) -> bool {
        out.iter().any(|o| matches!(o, Output::State { .. }))
    }

    /// Periodic transmission and the detection timer.
    pub fn timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(d) = self.detect_at {
            if now >= d {
                self.detect_at = None;
                // §6.8.1: the peer's discriminator is forgotten after a detection time.
                self.remote_discr = 0;
                self.remote_min_rx = Duration::from_micros(1);
                self.remote_state = State::Down;
                self.polling = false;
                if matches!(self.state, State::Init | State::Up) {
                    self.set_state(State::Down, Diag::DetectionTimeExpired, now, &mut out);
                }
            }
        }
        if self.may_transmit() && now >= self.next_tx {
            out.push(Output::Send(self.packet()));
            self.next_tx = now + self.jittered();
        }
        out
    }

    /// We stop (shutdown, restart): AdminDown with diagnostic 7, so the peer's clients do
    /// not take it for a failure (RFC 5882 §3.2). Returns the packet to send; send it a
    /// few times, the session is over.
    pub fn admin_down(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        self.set_state(State::AdminDown, Diag::AdminDown, now, &mut out);
        self.polling = false;
        self.detect_at = None;
        out.push(Output::Send(self.packet()));
        out
    }

    /// Whether a state change is a failure its clients act on (RFC 5882 §3.2): Up to
    /// Down, except when the peer said AdminDown.
    pub fn is_failure(from: State, to: State, remote: State) -> bool {
        from == State::Up && to == State::Down && remote != State::AdminDown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn timers() -> Timers {
        Timers {
            interval: MS(300),
            multiplier: 3,
        }
    }

    /// The peer's packet: its discriminator 99, our discriminator as given.
    fn peer(state: State, yours: u32, tx: u64, rx: u64) -> Control {
        Control {
            diag: Diag::None,
            state,
            poll: false,
            fin: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_discr: 99,
            your_discr: yours,
            desired_min_tx: MS(tx),
            required_min_rx: MS(rx),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    fn sent(out: &[Output]) -> Vec<Control> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    fn changes(out: &[Output]) -> Vec<(State, State, Diag)> {
        out.iter()
            .filter_map(|o| match o {
                Output::State { from, to, diag } => Some((*from, *to, *diag)),
                _ => None,
            })
            .collect()
    }

    /// The packets sent from `from` (inclusive) to `to`, stepping 1 ms.
    fn sent_between(s: &mut Session, from: Instant, to: Instant) -> Vec<Control> {
        let mut all = Vec::new();
        let mut t = from;
        while t < to {
            all.extend(sent(&s.timer(t)));
            t += MS(1);
        }
        all
    }

    /// Brings a session Up through the three-way handshake; returns it, the time and
    /// what the last packet made it send.
    fn up_with() -> (Session, Instant, Vec<Output>) {
        let t0 = Instant::now();
        let mut s = Session::new(timers(), 7, t0);
        let first = sent(&s.timer(t0));
        assert_eq!(first.len(), 1);
        // Down, no peer yet: Your Discriminator 0, one packet a second.
        assert_eq!((first[0].state, first[0].your_discr), (State::Down, 0));
        assert_eq!(first[0].desired_min_tx, SLOW);
        assert_eq!(first[0].required_min_rx, MS(300));
        let out = s.receive(&peer(State::Down, 0, 1000, 300), t0);
        assert_eq!(changes(&out), [(State::Down, State::Init, Diag::None)]);
        // The new state goes out at once, with the peer's discriminator.
        let p = sent(&out);
        assert_eq!((p[0].state, p[0].your_discr), (State::Init, 99));
        let out = s.receive(&peer(State::Up, 7, 1000, 300), t0);
        assert_eq!(changes(&out), [(State::Init, State::Up, Diag::None)]);
        (s, t0, out)
    }

    fn up() -> (Session, Instant) {
        let (s, t0, _) = up_with();
        (s, t0)
    }

    #[test]
    fn three_way_handshake_and_the_down_to_init_shortcut() {
        up();
        // Down and the peer already Init: straight to Up.
        let t0 = Instant::now();
        let mut s = Session::new(timers(), 7, t0);
        let out = s.receive(&peer(State::Init, 7, 1000, 300), t0);
        assert_eq!(changes(&out), [(State::Down, State::Up, Diag::None)]);
        // Down and the peer Up (it has not noticed our restart): we stay Down.
        let mut s = Session::new(timers(), 7, t0);
        assert!(changes(&s.receive(&peer(State::Up, 7, 1000, 300), t0)).is_empty());
        assert_eq!(s.state(), State::Down);
    }

    #[test]
    fn coming_up_polls_for_the_fast_interval_and_final_ends_it() {
        let (mut s, t0, out) = up_with();
        // Coming Up sends at once, with Poll and the configured 300 ms.
        let p = sent(&out);
        assert_eq!(p.len(), 1);
        assert!(p[0].poll && !p[0].fin);
        assert_eq!(p[0].desired_min_tx, MS(300));
        assert!(s.polling());
        // A faster transmit rate needs no wait: in effect at once.
        assert_eq!(s.intervals().0, MS(300));
        // Poll repeats in every packet until Final.
        let p = sent(&s.timer(t0 + MS(300)));
        assert!(p[0].poll);
        let mut fin = peer(State::Up, 7, 300, 300);
        fin.fin = true;
        s.receive(&fin, t0 + MS(310));
        assert!(!s.polling());
        let p = sent(&s.timer(t0 + MS(700)));
        assert!(!p[0].poll);
    }

    #[test]
    fn a_poll_is_answered_with_final_at_once() {
        let (mut s, t0) = up();
        let mut poll = peer(State::Up, 7, 300, 300);
        poll.poll = true;
        // Not waiting for the transmit timer, and Final is never sent with Poll.
        let p = sent(&s.receive(&poll, t0 + MS(1)));
        assert_eq!(p.len(), 1);
        assert!(p[0].fin && !p[0].poll);
        // The next periodic packet is back to Poll (ours is still open), without Final.
        let p = sent(&s.timer(t0 + MS(400)));
        assert!(p[0].poll && !p[0].fin);
    }

    #[test]
    fn intervals_are_negotiated_both_ways_with_jitter() {
        let (mut s, t0) = up();
        // The peer wants at most one packet per 500 ms and sends every 200 ms.
        let mut fin = peer(State::Up, 7, 200, 500);
        fin.fin = true;
        s.receive(&fin, t0);
        let (tx, detect) = s.intervals();
        assert_eq!(tx, MS(500), "max(our 300, its required 500)");
        assert_eq!(
            detect,
            MS(900),
            "its mult 3 × max(our required 300, its 200)"
        );
        // Every gap between periodic packets is 75–100 % of 500 ms.
        let mut t = t0 + MS(1);
        let mut last = None;
        let mut gaps = Vec::new();
        while t < t0 + Duration::from_secs(20) {
            // Keep the session alive.
            let mut out = Vec::new();
            if t.duration_since(t0).as_millis().is_multiple_of(200) {
                out = s.receive(&peer(State::Up, 7, 200, 500), t);
            }
            out.extend(s.timer(t));
            if !sent(&out).is_empty() {
                if let Some(l) = last {
                    gaps.push(t.duration_since(l));
                }
                last = Some(t);
            }
            t += MS(1);
        }
        assert!(gaps.len() > 30);
        assert!(
            gaps.iter().all(|g| *g >= MS(375) && *g <= MS(501)),
            "{gaps:?}"
        );
        let spread = gaps
            .iter()
            .max()
            .unwrap()
            .saturating_sub(*gaps.iter().min().unwrap());
        assert!(spread >= MS(50), "jitter is applied: {gaps:?}");
    }

    #[test]
    fn detection_time_expiry_takes_it_down_with_diag_1() {
        let (mut s, t0) = up();
        // Negotiated: 3 × max(300, 300) = 900 ms after the last packet.
        s.receive(&peer(State::Up, 7, 300, 300), t0);
        assert!(s.deadline() <= t0 + MS(900));
        assert!(changes(&s.timer(t0 + MS(899))).is_empty());
        let out = s.timer(t0 + MS(900));
        assert_eq!(
            changes(&out),
            [(State::Up, State::Down, Diag::DetectionTimeExpired)]
        );
        assert!(Session::is_failure(
            State::Up,
            State::Down,
            s.remote_state()
        ));
        // The peer's discriminator is forgotten; we are back to one packet a second.
        let p = sent_between(&mut s, t0 + MS(901), t0 + MS(2000));
        assert_eq!((p[0].state, p[0].your_discr), (State::Down, 0));
        assert_eq!(p[0].diag, Diag::DetectionTimeExpired);
        assert_eq!(p[0].desired_min_tx, SLOW);
        assert_eq!(s.flaps, 1);
    }

    #[test]
    fn peer_admin_down_is_not_a_failure_and_ours_says_diag_7() {
        let (mut s, t0) = up();
        let out = s.receive(&peer(State::AdminDown, 7, 300, 300), t0 + MS(10));
        assert_eq!(
            changes(&out),
            [(State::Up, State::Down, Diag::NeighborSignaledDown)]
        );
        assert!(!Session::is_failure(
            State::Up,
            State::Down,
            s.remote_state()
        ));
        // No detection timer while the peer is AdminDown.
        assert!(changes(&s.timer(t0 + Duration::from_secs(10))).is_empty());
        // The peer's Down after Up (not AdminDown) is a failure.
        let (mut s, t0) = up();
        s.receive(&peer(State::Down, 7, 1000, 300), t0);
        assert!(Session::is_failure(
            State::Up,
            State::Down,
            s.remote_state()
        ));
        // Ours: AdminDown, diagnostic 7, and then nothing we receive moves it.
        let (mut s, t0) = up();
        let p = sent(&s.admin_down(t0));
        assert_eq!((p[0].state, p[0].diag), (State::AdminDown, Diag::AdminDown));
        assert!(changes(&s.receive(&peer(State::Down, 7, 1000, 300), t0)).is_empty());
        assert_eq!(s.state(), State::AdminDown);
    }

    #[test]
    fn no_periodic_packets_when_the_peer_requires_none() {
        let (mut s, t0) = up();
        s.receive(&peer(State::Up, 7, 300, 0), t0);
        for ms in (0..3000).step_by(10) {
            // The peer's packets keep it up; we stay silent (§6.8.7).
            if ms % 300 == 0 {
                s.receive(&peer(State::Up, 7, 300, 0), t0 + MS(ms));
            }
            assert!(sent(&s.timer(t0 + MS(ms))).is_empty(), "at {ms} ms");
        }
    }

    #[test]
    fn new_intervals_on_a_live_session_go_by_poll_without_a_flap() {
        let (mut s, t0) = up();
        let mut fin = peer(State::Up, 7, 300, 300);
        fin.fin = true;
        s.receive(&fin, t0);
        let t = Timers {
            interval: MS(100),
            multiplier: 5,
        };
        s.set_timers(t, t0 + MS(10));
        let p = sent(&s.timer(t0 + MS(10)));
        assert_eq!(p.len(), 1);
        assert!(p[0].poll);
        assert_eq!(
            (p[0].desired_min_tx, p[0].required_min_rx),
            (MS(100), MS(100))
        );
        assert_eq!(p[0].detect_mult, 5);
        // A faster receive rate keeps the old detection time until Final.
        assert_eq!(s.intervals().1, MS(900));
        fin = peer(State::Up, 7, 100, 100);
        fin.fin = true;
        s.receive(&fin, t0 + MS(20));
        assert_eq!(s.intervals(), (MS(100), MS(300)));
        assert_eq!(s.state(), State::Up);
        assert_eq!(s.flaps, 0);
    }

    #[test]
    fn a_slower_rate_waits_for_final() {
        let (mut s, t0) = up();
        let mut fin = peer(State::Up, 7, 300, 300);
        fin.fin = true;
        s.receive(&fin, t0);
        assert_eq!(s.intervals(), (MS(300), MS(900)));
        // The peer says Down: we go Down and advertise 1 s again; Down is not bound by
        // the Poll rules, so 1 s is in effect at once.
        s.receive(&peer(State::Down, 7, 1000, 300), t0 + MS(10));
        assert_eq!(s.state(), State::Down);
        assert_eq!(s.intervals().0, SLOW);
        s.receive(&peer(State::Down, 7, 1000, 300), t0 + MS(15));
        assert_eq!(s.state(), State::Init);
        // Up again: 300 ms polled for.
        s.receive(&peer(State::Up, 7, 1000, 300), t0 + MS(20));
        assert_eq!(s.state(), State::Up);
        assert!(s.polling());
        // While Up, a change to a slower rate (1 s) keeps the faster one in effect until
        // Final, and a faster receive rate keeps the longer detection time.
        s.change_timers(SLOW, MS(100), t0 + MS(30));
        assert_eq!(s.tx_interval(), MS(300));
        assert_eq!(s.rx_in_effect, MS(300));
        let mut fin = peer(State::Up, 7, 300, 300);
        fin.fin = true;
        s.receive(&fin, t0 + MS(40));
        assert_eq!(s.tx_interval(), SLOW);
        assert_eq!(s.rx_in_effect, MS(100));
    }
}
