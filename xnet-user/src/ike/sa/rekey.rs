//! CREATE_CHILD_SA (RFC 7296 §1.3): new CHILD SAs, rekeying a CHILD SA (with a KE
//! payload when its proposal has a D-H group: PFS, §1.3.1) and the IKE SA itself, both
//! ways, make-before-break: the new SAs are up before the old ones are deleted, so traffic
//! never waits for keys. Lifetimes in the connector decide when we rekey on our own; a
//! peer that refuses gets asked again with back-off, then a fresh CHILD SA, then a new
//! IKE SA before the kernel's hard lifetime would leave the tunnel without SAs.

use std::time::{Duration, Instant};

use super::super::crypto::{self, Dh, DhGroup, IkeKeys, IkeSuite, Secret};
use super::super::packet::*;
use super::super::proposal::{self, Suite};
use super::{narrow, new_esp_spi, nonzero_u64, notify_name, ChildSa, IkeSa, Output, State};

/// Our CREATE_CHILD_SA request in flight.
pub(super) enum Rekey {
    Child {
        /// The CHILD SA this rekeys (REKEY_SA); None: a new one.
        rekey: Option<u32>,
        /// A CHILD SA the new one replaces without REKEY_SA (its rekeys were refused).
        replaces: Option<u32>,
        new_in: u32,
        ni: Vec<u8>,
        dh: Option<Dh>,
    },
    Ike {
        new_spi: u64,
        ni: Vec<u8>,
        dh: Dh,
    },
}

/// Refusals in a row after which we stop rekeying and reauthenticate: the rekey asked
/// again twice (after 1 and 2 s), then a fresh CHILD SA, then a new IKE SA.
const GIVE_UP: u32 = 4;

/// What the peer's request asks for: a rekey of one of our CHILD SAs, or a new one.
struct ChildRequest {
    ni: Vec<u8>,
    old: Option<ChildSa>,
}

impl IkeSa {
    /// Starts rekeying the CHILD SA whose inbound SPI is `old_in`.
    pub fn rekey_child(&mut self, old_in: u32, now: Instant) -> Vec<Output> {
        self.child_request(Some(old_in), None, None, now)
    }

    /// Asks for a new CHILD SA for the connector's traffic selectors.
    pub fn create_child(&mut self, now: Instant) -> Vec<Output> {
        self.child_request(None, None, None, now)
    }

    /// A CREATE_CHILD_SA request for a CHILD SA: a rekey of `rekey`, or a new SA (which
    /// replaces `replaces` once up). `group`: the KE group (default: the old SA's, or the
    /// first of our ESP proposals that has one).
    pub(super) fn child_request(
        &mut self,
        rekey: Option<u32>,
        replaces: Option<u32>,
        group: Option<DhGroup>,
        now: Instant,
    ) -> Vec<Output> {
        if self.state != State::Established || self.pending.is_some() {
            return Vec::new();
        }
        let old = match rekey.or(replaces) {
            Some(spi) => match self.children.iter().find(|c| c.spi_in == spi) {
                Some(c) => Some(c.clone()),
                None => return Vec::new(),
            },
            None => None,
        };
        let new_in = new_esp_spi();
        let ni = crypto::random(32);
        let group = group.or(old.as_ref().and_then(|c| c.suite.dh)).or(self
            .conn
            .esp
            .iter()
            .find_map(|s| s.dh));
        let dh = group.map(Dh::new);
        let proposals = self
            .conn
            .esp
            .iter()
            .enumerate()
            .map(|(i, s)| s.proposal(i as u8 + 1, false, new_in.to_be_bytes().to_vec()))
            .collect();
        let mut payloads = Vec::new();
        if let Some(spi) = rekey {
            payloads.push(Payload::Notify {
                protocol: PROTO_ESP,
                spi: spi.to_be_bytes().to_vec(),
                kind: N_REKEY_SA,
                data: Vec::new(),
            });
        }
        payloads.push(Payload::Sa(proposals));
        payloads.push(Payload::Nonce(ni.clone()));
        if let Some(d) = &dh {
            payloads.push(Payload::Ke {
                group: d.group.id(),
                data: d.public.clone(),
            });
        }
        match &old {
            Some(o) => payloads.extend(ts_pair(&o.local_ts, &o.remote_ts)),
            None => payloads.extend(ts_pair(&self.conn.local_ts, &self.conn.remote_ts)),
        }
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.encrypted(CREATE_CHILD_SA, false, id, &payloads);
        self.rekey = Some(Rekey::Child {
            rekey,
            replaces,
            new_in,
            ni,
            dh,
        });
        self.request(id, msg, now)
    }

    /// Starts rekeying the IKE SA.
    pub fn rekey_ike(&mut self, now: Instant) -> Vec<Output> {
        if self.state != State::Established || self.pending.is_some() {
            return Vec::new();
        }
        let s = self.suite.unwrap();
        // The current group first: the peer accepted it once.
        let mut suites: Vec<Suite> = self.conn.ike.clone();
        suites.sort_by_key(|x| x.dh != Some(s.dh));
        let group = suites[0].dh.expect("IKE suites have a group");
        let dh = Dh::new(group);
        let new_spi = nonzero_u64();
        let ni = crypto::random(32);
        let proposals = suites
            .iter()
            .enumerate()
            .map(|(i, x)| x.proposal(i as u8 + 1, true, new_spi.to_be_bytes().to_vec()))
            .collect();
        let payloads = vec![
            Payload::Sa(proposals),
            Payload::Nonce(ni.clone()),
            Payload::Ke {
                group: group.id(),
                data: dh.public.clone(),
            },
        ];
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.encrypted(CREATE_CHILD_SA, false, id, &payloads);
        self.rekey = Some(Rekey::Ike { new_spi, ni, dh });
        self.request(id, msg, now)
    }

    /// A refusal of our request: ask again later, with back-off.
    fn refused(&mut self, what: &str, n: u16, pfs: Option<DhGroup>, now: Instant) -> Vec<Output> {
        // §2.25: the peer is busy with the same SA (a collision, a rekey of its own);
        // ask again in a moment, it is not a refusal.
        if n == N_TEMPORARY_FAILURE {
            self.retry_at = Some(now + Duration::from_secs(1));
            return vec![Output::Note(format!(
                "{what}: TEMPORARY_FAILURE from the peer, asking again in 1 s"
            ))];
        }
        self.failures += 1;
        let wait = Duration::from_secs(1 << (self.failures - 1).min(5));
        self.retry_at = Some(now + wait);
        let hint = match (n, pfs) {
            (N_NO_PROPOSAL_CHOSEN, Some(g)) => format!(
                " (our proposals carry D-H group {} for PFS: does the peer's policy have it?)",
                g.id()
            ),
            (N_NO_PROPOSAL_CHOSEN, None) => {
                " (our proposals have no D-H group: does the peer's policy require PFS?)".into()
            }
            _ => String::new(),
        };
        vec![Output::Problem(format!(
            "{what} refused by the peer: {}{hint}",
            notify_name(n)
        ))]
    }

    /// The answer to our CREATE_CHILD_SA.
    pub(super) fn on_rekey_response(
        &mut self,
        payloads: Vec<Payload>,
        now: Instant,
    ) -> Vec<Output> {
        let Some(rekey) = self.rekey.take() else {
            return vec![Output::Dropped(
                "CREATE_CHILD_SA response without a request".into(),
            )];
        };
        match rekey {
            Rekey::Child {
                rekey,
                replaces,
                new_in,
                ni,
                dh,
            } => {
                let what = match rekey {
                    Some(spi) => format!("rekey of CHILD SA 0x{spi:08x}"),
                    None => "a new CHILD SA".to_string(),
                };
                if let Some(n) = payloads.error_notify() {
                    // The peer wants another group (§1.3): ask again at once with it.
                    if n == N_INVALID_KE_PAYLOAD {
                        let want = payloads
                            .notify(N_INVALID_KE_PAYLOAD)
                            .and_then(|g| g.get(..2))
                            .map(|b| u16::from_be_bytes([b[0], b[1]]))
                            .and_then(DhGroup::from_id)
                            .filter(|g| self.conn.esp.iter().any(|s| s.dh == Some(*g)))
                            .filter(|g| dh.as_ref().map(|d| d.group) != Some(*g));
                        if let Some(g) = want {
                            return self.child_request(rekey, replaces, Some(g), now);
                        }
                    }
                    return self.refused(&what, n, dh.map(|d| d.group), now);
                }
                let Some(nr) = payloads.nonce().map(<[u8]>::to_vec) else {
                    return vec![Output::Dropped(
                        "CREATE_CHILD_SA response without nonce".into(),
                    )];
                };
                let old = rekey
                    .or(replaces)
                    .map(|spi| self.children.iter().find(|c| c.spi_in == spi).cloned());
                if let Some(None) = old {
                    return vec![Output::Dropped(format!("{what}: the CHILD SA is gone"))];
                }
                let old = old.flatten();
                let Some((suite, spi_out)) = payloads.chosen().and_then(|p| {
                    let s = Suite::from_chosen(p, false).filter(|s| self.conn.esp.contains(s))?;
                    Some((s, u32::from_be_bytes(p.spi.as_slice().try_into().ok()?)))
                }) else {
                    return vec![Output::Dropped(format!(
                        "{what}: peer chose an ESP proposal we did not offer"
                    ))];
                };
                let pfs = match (&dh, suite.dh, payloads.ke()) {
                    (Some(d), Some(g), Some((kg, data))) if d.group == g && kg == g.id() => {
                        match d.shared(data) {
                            Ok(s) => Some(s),
                            Err(e) => return vec![Output::Dropped(e.into())],
                        }
                    }
                    (_, None, _) => None,
                    _ => return vec![Output::Dropped(format!("{what}: PFS group mismatch"))],
                };
                // A new SA takes what the responder narrowed to, within ours.
                let (local_ts, remote_ts) = match &old {
                    Some(o) => (o.local_ts.clone(), o.remote_ts.clone()),
                    None => {
                        let (Some(tsi), Some(tsr)) = (payloads.ts(true), payloads.ts(false)) else {
                            return vec![Output::Dropped(format!("{what}: no TSi/TSr"))];
                        };
                        let l = narrow(tsi, &self.conn.local_ts);
                        let r = narrow(tsr, &self.conn.remote_ts);
                        if l != tsi || r != tsr || l.is_empty() || r.is_empty() {
                            return vec![Output::Dropped(format!(
                                "{what}: peer's traffic selectors are wider than ours"
                            ))];
                        }
                        (l, r)
                    }
                };
                let new = ChildSa {
                    spi_in: new_in,
                    spi_out,
                    suite,
                    keys: self.child_keys(suite, pfs.as_ref(), &ni, &nr),
                    initiator: true,
                    local_ts,
                    remote_ts,
                    created: now,
                };
                self.failures = 0;
                self.retry_at = None;
                self.children.push(new.clone());
                let mut out = vec![Output::ChildUp(new)];
                let Some(old_in) = rekey else {
                    // A fresh SA that replaces one we could not rekey: that one goes.
                    if let Some(r) = replaces {
                        out.extend(self.delete_child(r, now));
                    }
                    return out;
                };
                // Make before break: the new SA is up; now the old one goes. If the peer
                // rekeyed the same SA meanwhile (§2.8.1), the new SA made with the lowest
                // of the four nonces is redundant and its initiator deletes it: if that
                // is ours, it goes too (the peer deletes its own otherwise).
                let ours_redundant = self
                    .rekey_collision
                    .take()
                    .is_some_and(|theirs| ni.as_slice().min(nr.as_slice()) < theirs.as_slice());
                if ours_redundant {
                    out.push(Output::Note(
                        "simultaneous CHILD SA rekey: ours has the lowest nonce, deleted as redundant".into(),
                    ));
                    out.extend(self.delete_children(&[old_in, new_in], now));
                } else {
                    out.extend(self.delete_child(old_in, now));
                }
                out
            }
            Rekey::Ike { new_spi, ni, dh } => {
                if let Some(n) = payloads.error_notify() {
                    let mut out = self.refused("rekey of the IKE SA", n, None, now);
                    // The peer's rekey of it went through meanwhile: its SA is the one.
                    if let Some((theirs, _)) = self.ike_collision.take() {
                        let children = std::mem::take(&mut self.children);
                        out.push(Output::Adopt {
                            spi: theirs,
                            children,
                        });
                    }
                    return out;
                }
                let Some(nr) = payloads.nonce().map(<[u8]>::to_vec) else {
                    return vec![Output::Dropped(
                        "CREATE_CHILD_SA response without nonce".into(),
                    )];
                };
                let Some(p) = payloads.chosen() else {
                    return vec![Output::Dropped("IKE rekey response without SA".into())];
                };
                let Some(suite) = Suite::from_chosen(p, true)
                    .filter(|s| self.conn.ike.contains(s) && s.dh == Some(dh.group))
                else {
                    return vec![Output::Dropped(
                        "IKE rekey: peer chose a proposal we did not offer".into(),
                    )];
                };
                let Ok(spi_r) = <[u8; 8]>::try_from(p.spi.as_slice()).map(u64::from_be_bytes)
                else {
                    return vec![Output::Dropped(
                        "IKE rekey: responder SPI not 8 octets".into(),
                    )];
                };
                let Some(shared) = payloads
                    .ke()
                    .filter(|(g, _)| *g == dh.group.id())
                    .and_then(|(_, d)| dh.shared(d).ok())
                else {
                    return vec![Output::Dropped("IKE rekey: bad KE".into())];
                };
                self.failures = 0;
                self.retry_at = None;
                // §2.8.2: both ends rekeyed at once. The new SA made with the lowest of
                // the four nonces is redundant; its initiator deletes it, and the
                // initiator of the survivor deletes the old SA.
                let collision = self.ike_collision.take();
                let ours_redundant = collision.as_ref().is_some_and(|(_, theirs)| {
                    ni.as_slice().min(nr.as_slice()) < theirs.as_slice()
                });
                // A redundant SA gets no CHILD SAs: they go to the peer's.
                let children = ours_redundant.then(|| std::mem::take(&mut self.children));
                let mut new = self.successor(suite, true, new_spi, spi_r, &shared, &ni, &nr, now);
                if let (Some((theirs, _)), Some(children)) = (&collision, children) {
                    new.redundant = true;
                    return vec![
                        Output::Note("simultaneous IKE SA rekey: the peer's new SA survives, ours is deleted".into()),
                        Output::NewIkeSa(Box::new(new)),
                        Output::Adopt {
                            spi: *theirs,
                            children,
                        },
                    ];
                }
                let mut out = Vec::new();
                if collision.is_some() {
                    out.push(Output::Note(
                        "simultaneous IKE SA rekey: ours survives, the peer deletes its new SA"
                            .into(),
                    ));
                }
                // The children live on under the new SA; the old one is deleted.
                out.push(Output::NewIkeSa(Box::new(new)));
                out.extend(self.delete(now));
                out
            }
        }
    }

    /// The IKE SA that replaces this one (§2.18): keys from the old SK_d and the new
    /// exchange; the rekey's initiator is the new SA's initiator. Takes the CHILD SAs.
    #[allow(clippy::too_many_arguments)]
    fn successor(
        &mut self,
        suite: Suite,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        shared: &Secret,
        ni: &[u8],
        nr: &[u8],
        now: Instant,
    ) -> IkeSa {
        let s = IkeSuite {
            encr: suite.encr,
            prf: suite.prf.unwrap(),
            integ: suite.integ,
            dh: suite.dh.unwrap(),
        };
        let mut spis = [0u8; 16];
        spis[..8].copy_from_slice(&spi_i.to_be_bytes());
        spis[8..].copy_from_slice(&spi_r.to_be_bytes());
        let keys = IkeKeys::rekey(&s, &self.keys.as_ref().unwrap().d, shared, ni, nr, &spis);
        let mut new = IkeSa::new(self.conn.clone(), initiator);
        new.spi_i = spi_i;
        new.spi_r = spi_r;
        new.suite = Some(s);
        new.keys = Some(keys);
        new.ni = ni.to_vec();
        new.nr = nr.to_vec();
        new.state = State::Established;
        new.established_at = Some(now);
        new.last_heard = now;
        new.natt = self.natt;
        new.nat_detected = self.nat_detected;
        new.remote_port = self.remote_port;
        new.children = std::mem::take(&mut self.children);
        self.superseded = true;
        new
    }

    /// The peer's CREATE_CHILD_SA request.
    pub(super) fn on_rekey_request(
        &mut self,
        payloads: Vec<Payload>,
        id: u32,
        now: Instant,
    ) -> Vec<Output> {
        let Some(ni) = payloads.nonce().map(<[u8]>::to_vec) else {
            return self.refuse(id, N_INVALID_SYNTAX, "no nonce");
        };
        let Some(offer) = payloads.sa() else {
            return self.refuse(id, N_INVALID_SYNTAX, "no SA");
        };
        if offer.iter().any(|p| p.protocol == PROTO_IKE) {
            return self.on_ike_rekey_request(&payloads, ni, id, now);
        }
        // A CHILD SA rekey names the SA by REKEY_SA (its SPI is our outbound one);
        // without it, the peer asks for another CHILD SA.
        let rekey = payloads.iter().find_map(|p| match p {
            Payload::Notify {
                kind: N_REKEY_SA,
                spi,
                ..
            } => Some(
                <[u8; 4]>::try_from(spi.as_slice())
                    .ok()
                    .map(u32::from_be_bytes),
            ),
            _ => None,
        });
        let old = match rekey {
            None => None,
            Some(spi) => {
                match spi.and_then(|o| self.children.iter().find(|c| c.spi_out == o)) {
                    Some(c) => Some(c.clone()),
                    // §2.25: the SA may just have been deleted.
                    None => {
                        return self.refuse(
                            id,
                            N_CHILD_SA_NOT_FOUND,
                            "REKEY_SA of an unknown CHILD SA",
                        )
                    }
                }
            }
        };
        self.on_child_request(&payloads, ChildRequest { ni, old }, id, now)
    }

    fn refuse(&mut self, id: u32, n: u16, why: &str) -> Vec<Output> {
        let out = self.respond_with(CREATE_CHILD_SA, id, &[Payload::notify(n, Vec::new())]);
        vec![
            out,
            Output::Problem(format!(
                "CREATE_CHILD_SA from the peer refused ({}): {why}",
                notify_name(n)
            )),
        ]
    }

    /// The group we want instead of the one offered (§1.3).
    fn invalid_ke(&mut self, id: u32, g: DhGroup) -> Vec<Output> {
        vec![self.respond_with(
            CREATE_CHILD_SA,
            id,
            &[Payload::notify(
                N_INVALID_KE_PAYLOAD,
                g.id().to_be_bytes().to_vec(),
            )],
        )]
    }

    /// A new CHILD SA or the rekey of one (`req.old`), with PFS when the chosen proposal
    /// has a group.
    fn on_child_request(
        &mut self,
        payloads: &[Payload],
        req: ChildRequest,
        id: u32,
        now: Instant,
    ) -> Vec<Output> {
        let offer = payloads.sa().unwrap_or_default();
        let Some((chosen, suite)) = proposal::choose(offer, &self.conn.esp, false) else {
            let theirs = offer
                .iter()
                .flat_map(|p| &p.transforms)
                .find(|t| t.kind == TRANSFORM_DH && t.id != 0)
                .map(|t| t.id);
            let why = match (theirs, self.conn.esp.iter().any(|s| s.dh.is_some())) {
                (Some(g), false) => format!("no acceptable ESP proposal: the peer wants PFS with D-H group {g}; add it to esp_proposals (e.g. \"aes256gcm16-ecp384\") or set pfs_group"),
                _ => "no acceptable ESP proposal".into(),
            };
            return self.refuse(id, N_NO_PROPOSAL_CHOSEN, &why);
        };
        let Ok(spi_out) = <[u8; 4]>::try_from(chosen.spi.as_slice()).map(u32::from_be_bytes) else {
            return self.refuse(id, N_INVALID_SYNTAX, "ESP SPI not 4 octets");
        };
        let (local_ts, remote_ts) = match &req.old {
            Some(o) => (o.local_ts.clone(), o.remote_ts.clone()),
            None => (
                narrow(payloads.ts(false).unwrap_or_default(), &self.conn.local_ts),
                narrow(payloads.ts(true).unwrap_or_default(), &self.conn.remote_ts),
            ),
        };
        if local_ts.is_empty() || remote_ts.is_empty() {
            return self.refuse(
                id,
                N_TS_UNACCEPTABLE,
                "traffic selectors outside the config",
            );
        }
        let nr = crypto::random(32);
        let mut ke = None;
        let pfs = match suite.dh {
            None => None,
            Some(g) => match payloads.ke() {
                Some((kg, data)) if kg == g.id() => {
                    let dh = Dh::new(g);
                    let Ok(s) = dh.shared(data) else {
                        return self.refuse(id, N_INVALID_SYNTAX, "bad KE");
                    };
                    ke = Some(Payload::Ke {
                        group: g.id(),
                        data: dh.public.clone(),
                    });
                    Some(s)
                }
                _ => return self.invalid_ke(id, g),
            },
        };
        let new_in = new_esp_spi();
        let new = ChildSa {
            spi_in: new_in,
            spi_out,
            suite,
            keys: self.child_keys(suite, pfs.as_ref(), &req.ni, &nr),
            initiator: false,
            local_ts,
            remote_ts,
            created: now,
        };
        if let (
            Some(o),
            Some(Rekey::Child {
                rekey: Some(ours), ..
            }),
        ) = (&req.old, &self.rekey)
        {
            if *ours == o.spi_in {
                self.rekey_collision = Some(req.ni.clone().min(nr.clone()));
            }
        }
        let mut resp = vec![
            Payload::Sa(vec![suite.proposal(
                chosen.num,
                false,
                new_in.to_be_bytes().to_vec(),
            )]),
            Payload::Nonce(nr),
        ];
        resp.extend(ke);
        resp.extend(ts_pair(&new.remote_ts, &new.local_ts));
        let out = self.respond_with(CREATE_CHILD_SA, id, &resp);
        self.children.push(new.clone());
        // Installed before the answer goes: the peer may send on it as soon as it has
        // it. A rekeyed SA stays until the peer deletes it.
        vec![Output::ChildUp(new), out]
    }

    /// The peer rekeys the IKE SA.
    fn on_ike_rekey_request(
        &mut self,
        payloads: &[Payload],
        ni: Vec<u8>,
        id: u32,
        now: Instant,
    ) -> Vec<Output> {
        // A CHILD SA exchange of ours in flight would end up on the wrong SA: the peer
        // tries again later (§2.25.2, what strongSwan does too).
        if matches!(self.rekey, Some(Rekey::Child { .. })) {
            return vec![self.respond_with(
                CREATE_CHILD_SA,
                id,
                &[Payload::notify(N_TEMPORARY_FAILURE, Vec::new())],
            )];
        }
        let offer = payloads.sa().unwrap_or_default();
        let Some((chosen, suite)) = proposal::choose(offer, &self.conn.ike, true) else {
            return self.refuse(id, N_NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal");
        };
        let Ok(spi_i) = <[u8; 8]>::try_from(chosen.spi.as_slice()).map(u64::from_be_bytes) else {
            return self.refuse(id, N_INVALID_SYNTAX, "IKE SPI not 8 octets");
        };
        let group = suite.dh.unwrap();
        let Some((kg, kdata)) = payloads.ke() else {
            return self.refuse(id, N_INVALID_SYNTAX, "no KE");
        };
        if kg != group.id() {
            return self.invalid_ke(id, group);
        }
        let dh = Dh::new(group);
        let Ok(shared) = dh.shared(kdata) else {
            return self.refuse(id, N_INVALID_SYNTAX, "bad KE");
        };
        let nr = crypto::random(32);
        let spi_r = nonzero_u64();
        let prop = suite.proposal(chosen.num, true, spi_r.to_be_bytes().to_vec());
        let out = self.respond_with(
            CREATE_CHILD_SA,
            id,
            &[
                Payload::Sa(vec![prop]),
                Payload::Nonce(nr.clone()),
                Payload::Ke {
                    group: group.id(),
                    data: dh.public.clone(),
                },
            ],
        );
        let colliding = matches!(self.rekey, Some(Rekey::Ike { .. }));
        let mut new = self.successor(suite, false, spi_i, spi_r, &shared, &ni, &nr, now);
        if colliding {
            // Ours is in flight too (§2.8.2): which new SA survives is decided when its
            // answer comes; until then the CHILD SAs stay here.
            self.children = std::mem::take(&mut new.children);
            new.provisional = true;
            self.ike_collision = Some((new.local_spi(), ni.min(nr)));
        }
        // The peer deletes this SA next (or, after a collision, whoever won).
        vec![out, Output::NewIkeSa(Box::new(new))]
    }

    /// Rekeys what has outlived its lifetime and recovers CHILD SAs; called from
    /// `on_tick` when idle.
    pub(super) fn rekey_due(&mut self, now: Instant) -> Vec<Output> {
        if self.reauth_asked
            || self.superseded
            || self.provisional
            || self.retry_at.is_some_and(|t| now < t)
        {
            return Vec::new();
        }
        let soft = self.conn.child_lifetime;
        let hard = self.conn.child_hard_lifetime();
        // Refused too often, or so late that the kernel would drop the SAs before one
        // more round: a new IKE SA beside this one (only to save a CHILD SA).
        let late = self
            .children
            .iter()
            .any(|c| now.duration_since(c.created) >= soft + (hard - soft) / 2);
        if self.failures > 0 && !self.children.is_empty() && (self.failures >= GIVE_UP || late) {
            self.reauth_asked = true;
            return vec![
                Output::Problem(format!(
                    "rekeys refused {} times: reauthenticating (a new IKE SA and CHILD SA) before the CHILD SA's hard lifetime",
                    self.failures
                )),
                Output::Reauth,
            ];
        }
        if self
            .established_at
            .is_some_and(|t| now.duration_since(t) >= self.conn.ike_lifetime)
        {
            return self.rekey_ike(now);
        }
        if self.children.is_empty() {
            // The side that starts the connector re-creates its CHILD SA (refused in
            // IKE_AUTH, deleted by the peer, expired).
            return if self.conn.initiate {
                self.create_child(now)
            } else {
                Vec::new()
            };
        }
        let due = self
            .children
            .iter()
            .find(|c| now.duration_since(c.created) >= soft)
            .map(|c| c.spi_in);
        match due {
            // After refusals of its rekey, a fresh CHILD SA in its place.
            Some(spi) if self.failures + 1 == GIVE_UP => {
                self.child_request(None, Some(spi), None, now)
            }
            Some(spi) => self.rekey_child(spi, now),
            None => Vec::new(),
        }
    }

    /// The kernel dropped a CHILD SA (its hard lifetime passed): it is gone here too, and
    /// the peer is told.
    pub fn child_expired(&mut self, spi_in: u32, now: Instant) -> Vec<Output> {
        if !self.children.iter().any(|c| c.spi_in == spi_in) {
            return Vec::new();
        }
        let mut out = vec![Output::Problem(format!(
            "CHILD SA 0x{spi_in:08x} expired in the kernel before it was rekeyed"
        ))];
        out.extend(self.delete_child(spi_in, now));
        out
    }
}
