//! CREATE_CHILD_SA (RFC 7296 §1.3): rekeying a CHILD SA and the IKE SA itself, both ways,
//! make-before-break: the new SAs are up before the old ones are deleted, so traffic never
//! waits for keys. Lifetimes in the connector decide when we rekey on our own.

use std::time::Instant;

use super::super::crypto::{self, Dh, IkeKeys, IkeSuite};
use super::super::packet::*;
use super::super::proposal::{self, Suite};
use super::{new_esp_spi, nonzero_u64, ChildSa, IkeSa, Output, State};

/// Our CREATE_CHILD_SA request in flight.
pub(super) enum Rekey {
    Child {
        old_in: u32,
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

impl IkeSa {
    /// Starts rekeying the CHILD SA whose inbound SPI is `old_in`.
    pub fn rekey_child(&mut self, old_in: u32, now: Instant) -> Vec<Output> {
        if self.state != State::Established || self.pending.is_some() {
            return Vec::new();
        }
        let Some(old) = self.children.iter().find(|c| c.spi_in == old_in).cloned() else {
            return Vec::new();
        };
        let new_in = new_esp_spi();
        let ni = crypto::random(32);
        let group = self.conn.esp.iter().find_map(|s| s.dh);
        let dh = group.map(Dh::new);
        let proposals = self
            .conn
            .esp
            .iter()
            .enumerate()
            .map(|(i, s)| s.proposal(i as u8 + 1, false, new_in.to_be_bytes().to_vec()))
            .collect();
        let mut payloads = vec![
            Payload::Notify {
                protocol: PROTO_ESP,
                spi: old_in.to_be_bytes().to_vec(),
                kind: N_REKEY_SA,
                data: Vec::new(),
            },
            Payload::Sa(proposals),
            Payload::Nonce(ni.clone()),
        ];
        if let Some(d) = &dh {
            payloads.push(Payload::Ke {
                group: d.group.id(),
                data: d.public.clone(),
            });
        }
        payloads.extend(ts_pair(&old.local_ts, &old.remote_ts));
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.encrypted(CREATE_CHILD_SA, false, id, &payloads);
        self.rekey = Some(Rekey::Child {
            old_in,
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
        if let Some(n) = payloads.error_notify() {
            // Refused (or a collision the peer won): the old SAs stay; try again later.
            return vec![Output::Dropped(format!(
                "rekey refused: {}",
                super::notify_name(n)
            ))];
        }
        let Some(nr) = payloads.nonce().map(<[u8]>::to_vec) else {
            return vec![Output::Dropped(
                "CREATE_CHILD_SA response without nonce".into(),
            )];
        };
        match rekey {
            Rekey::Child {
                old_in,
                new_in,
                ni,
                dh,
            } => {
                let Some(old) = self.children.iter().find(|c| c.spi_in == old_in).cloned() else {
                    return vec![Output::Dropped("rekeyed CHILD SA is gone".into())];
                };
                let Some((suite, spi_out)) = payloads.chosen().and_then(|p| {
                    let s = Suite::from_chosen(p, false).filter(|s| self.conn.esp.contains(s))?;
                    Some((s, u32::from_be_bytes(p.spi.as_slice().try_into().ok()?)))
                }) else {
                    return vec![Output::Dropped(
                        "rekey: peer chose an ESP proposal we did not offer".into(),
                    )];
                };
                let pfs = match (&dh, suite.dh, payloads.ke()) {
                    (Some(d), Some(g), Some((kg, data))) if d.group == g && kg == g.id() => {
                        match d.shared(data) {
                            Ok(s) => Some(s),
                            Err(e) => return vec![Output::Dropped(e.into())],
                        }
                    }
                    (_, None, _) => None,
                    _ => return vec![Output::Dropped("rekey: PFS group mismatch".into())],
                };
                let new = ChildSa {
                    spi_in: new_in,
                    spi_out,
                    suite,
                    keys: self.child_keys(suite, pfs.as_ref(), &ni, &nr),
                    initiator: true,
                    local_ts: old.local_ts.clone(),
                    remote_ts: old.remote_ts.clone(),
                    created: now,
                };
                let new_in = new.spi_in;
                self.children.push(new.clone());
                // Make before break: the new SA is up; now the old one goes. If the peer
                // rekeyed the same SA meanwhile (§2.8.1), the new SA made with the lowest
                // of the four nonces is redundant and its initiator deletes it: if that
                // is ours, it goes too (the peer deletes its own otherwise).
                let ours_redundant = self
                    .rekey_collision
                    .take()
                    .is_some_and(|theirs| ni.as_slice().min(nr.as_slice()) < theirs.as_slice());
                let mut out = vec![Output::ChildUp(new)];
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
                let new = self.successor(suite, true, new_spi, spi_r, &shared, &ni, &nr, now);
                // The children live on under the new SA; the old one is deleted.
                let mut out = vec![Output::NewIkeSa(Box::new(new))];
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
        shared: &crypto::Secret,
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
        new
    }

    /// The peer's CREATE_CHILD_SA request.
    pub(super) fn on_rekey_request(
        &mut self,
        payloads: Vec<Payload>,
        id: u32,
        now: Instant,
    ) -> Vec<Output> {
        let refuse = |sa: &mut IkeSa, n: u16, why: &str| {
            let out = sa.respond_with(CREATE_CHILD_SA, id, &[Payload::notify(n, Vec::new())]);
            vec![
                out,
                Output::Dropped(format!("CREATE_CHILD_SA refused: {why}")),
            ]
        };
        // The group we want instead of the one offered.
        let invalid_ke = |sa: &mut IkeSa, g: crypto::DhGroup| {
            vec![sa.respond_with(
                CREATE_CHILD_SA,
                id,
                &[Payload::notify(
                    N_INVALID_KE_PAYLOAD,
                    g.id().to_be_bytes().to_vec(),
                )],
            )]
        };
        let Some(ni) = payloads.nonce().map(<[u8]>::to_vec) else {
            return refuse(self, N_INVALID_SYNTAX, "no nonce");
        };
        let Some(offer) = payloads.sa() else {
            return refuse(self, N_INVALID_SYNTAX, "no SA");
        };
        let nr = crypto::random(32);
        if offer.iter().any(|p| p.protocol == PROTO_IKE) {
            // IKE SA rekey.
            let Some((chosen, suite)) = proposal::choose(offer, &self.conn.ike, true) else {
                return refuse(self, N_NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal");
            };
            let Ok(spi_i) = <[u8; 8]>::try_from(chosen.spi.as_slice()).map(u64::from_be_bytes)
            else {
                return refuse(self, N_INVALID_SYNTAX, "IKE SPI not 8 octets");
            };
            let group = suite.dh.unwrap();
            let Some((kg, kdata)) = payloads.ke() else {
                return refuse(self, N_INVALID_SYNTAX, "no KE");
            };
            if kg != group.id() {
                return invalid_ke(self, group);
            }
            let dh = Dh::new(group);
            let Ok(shared) = dh.shared(kdata) else {
                return refuse(self, N_INVALID_SYNTAX, "bad KE");
            };
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
            let new = self.successor(suite, false, spi_i, spi_r, &shared, &ni, &nr, now);
            // The peer deletes this SA next.
            return vec![out, Output::NewIkeSa(Box::new(new))];
        }
        // CHILD SA rekey: the SA named by REKEY_SA (its SPI is our outbound one).
        let old_out = payloads.iter().find_map(|p| match p {
            Payload::Notify {
                kind: N_REKEY_SA,
                spi,
                ..
            } => <[u8; 4]>::try_from(spi.as_slice())
                .ok()
                .map(u32::from_be_bytes),
            _ => None,
        });
        let Some(old) =
            old_out.and_then(|o| self.children.iter().find(|c| c.spi_out == o).cloned())
        else {
            // A new CHILD SA besides the first, or an unknown one: not supported.
            return refuse(
                self,
                35,
                "only rekeying of existing CHILD SAs is supported (NO_ADDITIONAL_SAS)",
            );
        };
        let Some((chosen, suite)) = proposal::choose(offer, &self.conn.esp, false) else {
            return refuse(self, N_NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal");
        };
        let Ok(spi_out) = <[u8; 4]>::try_from(chosen.spi.as_slice()).map(u32::from_be_bytes) else {
            return refuse(self, N_INVALID_SYNTAX, "ESP SPI not 4 octets");
        };
        let mut resp = Vec::new();
        let pfs = match suite.dh {
            None => None,
            Some(g) => match payloads.ke() {
                Some((kg, data)) if kg == g.id() => {
                    let dh = Dh::new(g);
                    let Ok(s) = dh.shared(data) else {
                        return refuse(self, N_INVALID_SYNTAX, "bad KE");
                    };
                    resp.push(Payload::Ke {
                        group: g.id(),
                        data: dh.public.clone(),
                    });
                    Some(s)
                }
                _ => return invalid_ke(self, g),
            },
        };
        let new_in = new_esp_spi();
        let new = ChildSa {
            spi_in: new_in,
            spi_out,
            suite,
            keys: self.child_keys(suite, pfs.as_ref(), &ni, &nr),
            initiator: false,
            local_ts: old.local_ts.clone(),
            remote_ts: old.remote_ts.clone(),
            created: now,
        };
        if matches!(self.rekey, Some(Rekey::Child { old_in, .. }) if old_in == old.spi_in) {
            self.rekey_collision = Some(ni.clone().min(nr.clone()));
        }
        let mut payloads_out = vec![
            Payload::Sa(vec![suite.proposal(
                chosen.num,
                false,
                new_in.to_be_bytes().to_vec(),
            )]),
            Payload::Nonce(nr),
        ];
        payloads_out.extend(resp);
        payloads_out.extend(ts_pair(&old.remote_ts, &old.local_ts));
        let out = self.respond_with(CREATE_CHILD_SA, id, &payloads_out);
        self.children.push(new.clone());
        // The old SA stays until the peer deletes it.
        vec![out, Output::ChildUp(new)]
    }

    /// Rekeys what has outlived its lifetime; called from `on_tick` when idle.
    pub(super) fn rekey_due(&mut self, now: Instant) -> Vec<Output> {
        if self
            .established_at
            .is_some_and(|t| now.duration_since(t) >= self.conn.ike_lifetime)
        {
            return self.rekey_ike(now);
        }
        let due = self
            .children
            .iter()
            .find(|c| now.duration_since(c.created) >= self.conn.child_lifetime)
            .map(|c| c.spi_in);
        match due {
            Some(spi) => self.rekey_child(spi, now),
            None => Vec::new(),
        }
    }
}
