//! What makes nodedns node-local: the link with the listen IPs ([`crate::netif`]), the NOTRACK/ACCEPT
//! rules ([`crate::firewall`]), the reconcile loop that puts back whatever was removed, and the
//! teardown that removes only what nodedns created.
//!
//! Order matters and follows the addon's fixed behaviour: link and addresses before the listeners
//! bind; rules only after the listeners are bound (a nodedns that fails to start never captures
//! traffic); at exit, rules first, then addresses and link.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use thiserror::Error;

use crate::config::NodeOptions;
use crate::firewall::{Backend, Firewall, FirewallError, Intercept, Rules};
use crate::metrics::{Metrics, SetupErrorKind};
use crate::netif::{self, Netif, NetifConfig, NetifError};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("interface setup: {0}")]
    Netif(#[from] NetifError),
    #[error(
        "listen address {0} is not configured on this node; add it, or let nodedns do it with --setup-interface"
    )]
    NotLocal(IpAddr),
    #[error("cannot check whether {ip} is local: {source}")]
    Check { ip: IpAddr, source: std::io::Error },
}

/// The node's state as nodedns manages it.
pub struct Node {
    netif: Option<Netif>,
    firewall: Option<Firewall>,
    skip_teardown: bool,
    metrics: Arc<Metrics>,
}

/// The IPs nodedns listens on, without the wildcard addresses (nothing to set up for those).
pub fn local_ips(listen: &[SocketAddr]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in listen {
        let ip = a.ip();
        if !ip.is_unspecified() && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// How long a peer has to answer the health query. It answers from memory in microseconds; a
/// missing one answers with ICMP port unreachable at once, so this only bounds a lost datagram.
pub const PEER_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// The listen addresses another nodedns answers on: each local listen address (a wildcard has no
/// node state, and an address that is not local is not probed, since the probe would leave the
/// node) gets the CHAOS health query. Called before binding (a handover) and after this process
/// closed its own sockets (then any answer is a peer's).
pub async fn serving_peers(listen: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    for &a in listen {
        if a.ip().is_unspecified() || found.contains(&a) {
            continue;
        }
        if !netif::is_local(a.ip()).unwrap_or(false) {
            continue;
        }
        if crate::admin::probe_nodedns(a, PEER_PROBE_TIMEOUT).await {
            found.push(a);
        }
    }
    found
}

fn firewall_metric(e: &FirewallError) -> SetupErrorKind {
    match e.kind() {
        "iptables_lock" => SetupErrorKind::IptablesLock,
        "nftables" => SetupErrorKind::Nftables,
        _ => SetupErrorKind::Iptables,
    }
}

impl Node {
    /// Puts the listen IPs on the link (or checks they exist with `--setup-interface=false`).
    /// Runs before the listeners bind.
    pub async fn setup_interface(
        opts: &NodeOptions,
        listen: &[SocketAddr],
        health: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Result<Node, NodeError> {
        let ips = local_ips(listen);
        let mut on_link: Vec<IpAddr> = Vec::new();
        let netif = if opts.setup_interface {
            let mut n = Netif::new(NetifConfig {
                name: opts.interface.clone(),
                kind: opts.link_kind,
                addrs: ips.clone(),
            });
            match n.ensure().await {
                Ok(o) => {
                    if o.link_created {
                        tracing::info!(link = %opts.interface, kind = %opts.link_kind, "created link");
                    }
                    for ip in &o.added {
                        tracing::info!(link = %opts.interface, %ip, "added address");
                    }
                    for ip in &o.local_elsewhere {
                        tracing::info!(%ip, "address is already local elsewhere; not adding it");
                    }
                    on_link.extend(o.added.iter().chain(o.present.iter()));
                }
                Err(e) => {
                    metrics.setup_error(SetupErrorKind::InterfaceAdd);
                    return Err(e.into());
                }
            }
            Some(n)
        } else {
            for &ip in &ips {
                match netif::is_local(ip) {
                    Ok(true) => {}
                    Ok(false) => return Err(NodeError::NotLocal(ip)),
                    Err(source) => return Err(NodeError::Check { ip, source }),
                }
            }
            None
        };
        let backend = match opts.firewall {
            Some(b) => b,
            None if !on_link.is_empty() => Backend::Iptables,
            None => Backend::None,
        };
        let firewall = if backend == Backend::None {
            None
        } else {
            // Rules for the IPs on nodedns's link; with an explicit backend and nothing on the link,
            // for every listen IP.
            let ruled = if on_link.is_empty() { &ips } else { &on_link };
            let mut rules = plan_rules(listen, ruled, health);
            let probe = rules.clone();
            match tokio::task::spawn_blocking(move || {
                Firewall::socket_match_supported(backend, &probe)
            })
            .await
            {
                Ok(Ok(())) => tracing::info!(
                    "queries skip conntrack only while a nodedns socket is bound (socket match): \
                     a dead nodedns fails open to kube-proxy's DNAT"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "no socket match in this kernel: queries to the listen IPs skip conntrack even when nodedns is down (no fail-open to a ClusterIP's endpoints)");
                    rules.intercept = Intercept::Always;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "socket match check; intercepting unconditionally");
                    rules.intercept = Intercept::Always;
                }
            }
            tracing::info!(%backend, addrs = ?rules.addrs, intercept = ?rules.intercept, "packet filter rules will skip conntrack for DNS");
            Some(Firewall::new(backend, rules))
        };
        Ok(Node {
            netif,
            firewall,
            skip_teardown: opts.skip_teardown,
            metrics,
        })
    }

    /// Installs the rules. Runs after the listeners are bound. An error is logged and counted, and
    /// the reconcile loop tries again; DNS is served either way.
    pub async fn setup_firewall(&self) -> bool {
        let Some(fw) = self.firewall.clone() else {
            return true;
        };
        match tokio::task::spawn_blocking(move || fw.ensure()).await {
            Ok(Ok(added)) => {
                if !added.is_empty() {
                    tracing::info!(rules = added.len(), "installed packet filter rules");
                }
                true
            }
            Ok(Err(e)) => {
                self.metrics.setup_error(firewall_metric(&e));
                tracing::error!(error = %e, "packet filter rules");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "packet filter task");
                false
            }
        }
    }

    /// Checks the link, addresses and rules, and puts back what is missing. Returns whether all is
    /// in place.
    pub async fn reconcile(&mut self) -> bool {
        let mut ok = true;
        if let Some(n) = self.netif.as_mut() {
            match n.ensure().await {
                Ok(o) => {
                    for r in &o.repaired {
                        tracing::warn!(repair = %r, "repaired the interface");
                    }
                }
                Err(e) => {
                    ok = false;
                    self.metrics.setup_error(SetupErrorKind::InterfaceCheck);
                    self.metrics.setup_error(SetupErrorKind::Reconcile);
                    tracing::error!(error = %e, "interface check");
                }
            }
        }
        if let Some(fw) = self.firewall.clone() {
            match tokio::task::spawn_blocking(move || fw.ensure()).await {
                Ok(Ok(added)) => {
                    for rule in added {
                        tracing::warn!(%rule, "added back a packet filter rule");
                    }
                }
                Ok(Err(e)) => {
                    ok = false;
                    self.metrics.setup_error(firewall_metric(&e));
                    self.metrics.setup_error(SetupErrorKind::Reconcile);
                    tracing::error!(error = %e, "packet filter check");
                }
                Err(_) => ok = false,
            }
        }
        ok
    }

    /// At exit, after this process's sockets are closed: when another nodedns still answers on
    /// a listen address, leaves link, addresses and rules to it (it adopts them: the link carries
    /// the nodedns alias, and its reconcile keeps addresses and rules); otherwise [`teardown`].
    /// The last instance to exit tears down.
    ///
    /// [`teardown`]: Node::teardown
    pub async fn teardown_unless_peer(&mut self, listen: &[SocketAddr]) {
        if self.skip_teardown || (self.netif.is_none() && self.firewall.is_none()) {
            return self.teardown().await;
        }
        let peers = serving_peers(listen).await;
        if peers.is_empty() {
            return self.teardown().await;
        }
        tracing::info!(
            peer_serves = ?peers,
            "another nodedns serves these addresses: leaving link, addresses and rules to it"
        );
    }

    /// Removes the rules, then the addresses and link, that nodedns created; nothing with
    /// `--skip-teardown`.
    pub async fn teardown(&mut self) {
        if self.skip_teardown {
            tracing::info!("leaving link, addresses and rules in place (--skip-teardown)");
            return;
        }
        if let Some(fw) = self.firewall.clone() {
            match tokio::task::spawn_blocking(move || fw.teardown()).await {
                Ok(Ok(())) => tracing::info!("removed packet filter rules"),
                Ok(Err(e)) => tracing::error!(error = %e, "removing packet filter rules"),
                Err(e) => tracing::error!(error = %e, "packet filter task"),
            }
        }
        if let Some(n) = self.netif.as_mut() {
            let owned = n.owned().clone();
            match n.teardown().await {
                Ok(()) if owned.link_created => tracing::info!(link = %owned.link, "removed link"),
                Ok(()) if !owned.addrs.is_empty() => {
                    tracing::info!(addrs = ?owned.addrs, "removed addresses")
                }
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "removing link and addresses"),
            }
        }
    }
}

/// The rules for the listen addresses whose IP is in `ruled`: each address with its own port (two
/// addresses may use different ports), and the health port where the health endpoint is on one of
/// those IPs (or on every IP).
fn plan_rules(listen: &[SocketAddr], ruled: &[IpAddr], health: Option<SocketAddr>) -> Rules {
    let addrs = listen
        .iter()
        .filter(|a| ruled.contains(&a.ip()))
        .copied()
        .collect();
    let health_port = health
        .filter(|h| ruled.contains(&h.ip()) || h.ip().is_unspecified())
        .map(|h| h.port());
    Rules {
        addrs,
        health_port,
        intercept: Intercept::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_keeps_its_own_port() {
        let a: SocketAddr = "169.254.20.10:53".parse().unwrap();
        let b: SocketAddr = "10.96.0.10:5353".parse().unwrap();
        let ruled = [a.ip(), b.ip()];
        let r = plan_rules(&[a, b], &ruled, Some("169.254.20.10:8080".parse().unwrap()));
        assert_eq!(
            r.addrs,
            vec![a, b],
            "10.96.0.10 keeps port 5353, not the first address's 53"
        );
        assert_eq!(r.health_port, Some(8080));
        let only_a = plan_rules(&[a, b], &[a.ip()], Some("10.1.1.1:8080".parse().unwrap()));
        assert_eq!(only_a.addrs, vec![a]);
        assert_eq!(
            only_a.health_port, None,
            "health elsewhere: no health rules"
        );
    }
}
