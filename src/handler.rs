//! The decision for one query: answer from cache, answer locally, reject with an rcode, drop, or
//! forward. This is the hit path, top to bottom; it does no I/O and takes `now` as an argument.
//!
//! ```text
//! bytes ─► wire::scan_query ─► policy checks ─► cache.with_hit(key, now) ─► wire::render ─► reply bytes
//!                                                     └─ miss ─► Outcome::Forward (server spawns the
//!                                                                upstream exchange, then `complete`)
//! ```

use std::sync::Arc;
use std::time::Instant;

use crate::cache::Cache;
use crate::wire::{
    self, CLASS_CH, CLASS_IN, Freshness, QueryView, Response, TtlPolicy, WireError, rcode,
};

/// The transport a query came over: UDP replies are limited to what the client can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// The wire-format name of the local health probe (`health.nodedns.`, class CH), answered without
/// touching the cache or upstream so `/health` measures the listener alone.
pub const HEALTH_NAME: &[u8] = b"\x06health\x07nodedns\x00";

/// What the server should do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply is in `out`: send it.
    Reply(Answered),
    /// Send nothing (short packet, a response, or garbage without an ID).
    Drop,
    /// Cache miss: forward upstream, then call [`Handler::complete`]. `stale_fallback`: a stale
    /// entry under serve-stale `verify` exists; if upstream gives nothing usable within
    /// [`wire::STALE_VERIFY_TIMEOUT`], answer it with [`Handler::answer_stale`].
    Forward { stale_fallback: bool },
}

/// What was answered, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// A background refresh was claimed for this slot hash (prefetch, or a stale answer): the
    /// server queues it ([`crate::server::Ctx::queue_refresh`]).
    pub refresh: Option<u64>,
    pub qtype: u16,
    /// The full 12-bit rcode (BADVERS is 16: its upper bits travel in the OPT record).
    pub rcode: u16,
    pub source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the cache; `negative` tells which part, `stale` whether past its lifetime (RFC 8767).
    Cache { negative: bool, stale: bool },
    /// From upstream (a miss that was forwarded).
    Upstream,
    /// Made up here: errors, refusals, health.
    Local,
}

/// The sans-IO core shared by every listener. It holds no policy of its own: the zone that routed
/// a miss brings its TTL policy to [`Handler::store`], so a reload never touches the hit path.
pub struct Handler {
    pub cache: Cache,
}

impl Handler {
    pub fn new(cache: Cache) -> Handler {
        Handler { cache }
    }

    /// Decides what to do with one query packet; a reply, if any, is written into `out`. `proto`
    /// sets the reply size limit (the client's UDP size for UDP, 65535 for TCP; see [`limit_for`]).
    pub fn answer(&self, packet: &[u8], proto: Proto, now: Instant, out: &mut Vec<u8>) -> Outcome {
        let view = match wire::scan_query(packet) {
            Ok(v) => v,
            Err(WireError::TooShort | WireError::NotAQuery) => return Outcome::Drop,
            Err(_) => {
                // Answer what we cannot read with FORMERR, echoing the ID, as resolvers do.
                let (Some(id), Some(flags)) = (wire::peek_id(packet), flags_of(packet)) else {
                    return Outcome::Drop;
                };
                wire::render_formerr_header(id, flags, out);
                return Outcome::Reply(Answered {
                    refresh: None,
                    qtype: 0,
                    rcode: rcode::FORMERR.into(),
                    source: Source::Local,
                });
            }
        };
        let qtype = view.key.qtype;
        let local = |rc: u16, out: &mut Vec<u8>| {
            wire::render_error(&view, rc, out);
            Outcome::Reply(Answered {
                refresh: None,
                qtype,
                rcode: rc,
                source: Source::Local,
            })
        };
        if view.opcode() != 0 {
            return local(rcode::NOTIMP.into(), out);
        }
        if view.edns.is_some_and(|e| e.version != 0) {
            return local(rcode::BADVERS, out);
        }
        if view.key.qclass == CLASS_CH {
            // CHAOS is answered here: the health probe gets NOERROR, the rest (version.bind, ...)
            // REFUSED, so nothing about the node leaks and nothing goes upstream.
            let rc = if view.key.name() == HEALTH_NAME {
                rcode::NOERROR
            } else {
                rcode::REFUSED
            };
            return local(rc.into(), out);
        }
        if view.key.qclass != CLASS_IN || qtype == wire::TYPE_AXFR || qtype == wire::TYPE_IXFR {
            // A cache serves no zone transfers, and classes other than IN have no upstream here.
            return local(rcode::REFUSED.into(), out);
        }
        let hit = self
            .cache
            .with_hit(&view.key, now, |response, negative, fresh, slot| {
                let limit = limit_for(&view, proto);
                if fresh != Freshness::Fresh {
                    return self
                        .answer_aging(response, &view, negative, fresh, slot, now, limit, out);
                }
                // The fresh hit, kept small so it inlines into the lookup (with the aging cases
                // in here too the closure was a call, measured +14 ns a hit).
                wire::render(response, &view, now, limit, out);
                Outcome::Reply(Answered {
                    refresh: None,
                    qtype,
                    rcode: response.rcode.into(),
                    source: Source::Cache {
                        negative,
                        stale: false,
                    },
                })
            });
        hit.unwrap_or(Outcome::Forward {
            stale_fallback: false,
        })
    }

    /// A hit on an entry due for its refresh (prefetch) or past its lifetime (serve-stale): the
    /// answer, and the refresh to start if this hit claimed it.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn answer_aging(
        &self,
        response: &Response,
        view: &QueryView<'_>,
        negative: bool,
        fresh: Freshness,
        slot: u64,
        now: Instant,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let (stale, refresh) = match fresh {
            Freshness::Fresh | Freshness::Counted | Freshness::RefreshDue => {
                wire::render(response, view, now, limit, out);
                // Prefetch AMOUNT counts every hit in a row, as CoreDNS's does, not only those in
                // the refresh window (`Counted`: before it); AMOUNT 1 needs no count.
                let amount = response.prefetch_amount();
                let reached = amount <= 1
                    || self
                        .cache
                        .count_hit(slot, amount, response.prefetch_gap_s(), now);
                let claimed =
                    fresh == Freshness::RefreshDue && reached && self.cache.try_begin_refresh(slot);
                (false, claimed.then_some(slot))
            }
            Freshness::Stale => {
                if response.stale_verify() && !self.cache.refresh_busy(slot) {
                    // Ask upstream first; the stale answer is the fallback.
                    return Outcome::Forward {
                        stale_fallback: true,
                    };
                }
                wire::render_stale(response, view, limit, out);
                (true, self.cache.try_begin_refresh(slot).then_some(slot))
            }
        };
        Outcome::Reply(Answered {
            refresh,
            qtype: view.key.qtype,
            rcode: response.rcode.into(),
            source: Source::Cache { negative, stale },
        })
    }

    /// Finishes a miss: validates the upstream `reply` to `view`'s query (sent upstream with ID
    /// `sent_id`) and stores it if its zone's `policy` lets it be cached; [`Handler::complete`]
    /// then renders each client's reply.
    pub fn store(
        &self,
        view: &QueryView<'_>,
        reply: &[u8],
        sent_id: u16,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<Arc<Response>, wire::ResponseError> {
        let resp = Response::from_upstream(reply, sent_id, view, policy, now)?;
        Ok(self.insert(view, resp, now))
    }

    /// Caches `resp`, a validated reply to `view` (as its zone's policy allows).
    pub fn insert(&self, view: &QueryView<'_>, resp: Response, now: Instant) -> Arc<Response> {
        self.cache.insert(&view.key, resp.clone(), now);
        Arc::new(resp)
    }

    /// Renders a reply to `view` from an upstream response (possibly one fetched for another client
    /// asking the same question).
    pub fn complete(
        &self,
        view: &QueryView<'_>,
        resp: &Response,
        proto: Proto,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Answered {
        wire::render(resp, view, now, limit_for(view, proto), out);
        Answered {
            refresh: None,
            qtype: view.key.qtype,
            rcode: resp.rcode.into(),
            source: Source::Upstream,
        }
    }

    /// The stale answer for `view` (serve-stale `verify` after upstream failed), if one is still
    /// servable; claims the failure-recheck hold on its slot (see `Ctx::queue_refresh`).
    pub fn answer_stale(
        &self,
        view: &QueryView<'_>,
        proto: Proto,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<Answered> {
        self.cache
            .with_hit(&view.key, now, |response, negative, fresh, slot| {
                let limit = limit_for(view, proto);
                if fresh == Freshness::Stale {
                    wire::render_stale(response, view, limit, out);
                } else {
                    // Refreshed meanwhile by another client's query.
                    wire::render(response, view, now, limit, out);
                }
                Answered {
                    refresh: self.cache.try_begin_refresh(slot).then_some(slot),
                    qtype: view.key.qtype,
                    rcode: response.rcode.into(),
                    source: Source::Cache {
                        negative,
                        stale: true,
                    },
                }
            })
    }

    /// The reply when upstream gave nothing usable before the deadline: SERVFAIL, never silence.
    pub fn fail(&self, view: &QueryView<'_>, rc: u8, out: &mut Vec<u8>) -> Answered {
        wire::render_error(view, rc.into(), out);
        Answered {
            refresh: None,
            qtype: view.key.qtype,
            rcode: rc.into(),
            source: Source::Local,
        }
    }
}

/// The reply size limit for a transport.
pub fn limit_for(view: &QueryView<'_>, proto: Proto) -> usize {
    match proto {
        Proto::Udp => view.udp_limit(),
        Proto::Tcp => u16::MAX as usize,
    }
}

fn flags_of(packet: &[u8]) -> Option<u16> {
    (packet.len() >= 4).then(|| u16::from_be_bytes([packet[2], packet[3]]))
}

#[cfg(test)]
mod tests;
