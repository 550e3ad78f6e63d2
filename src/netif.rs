//! The node-local listen interface: a link (dummy or bridge) carrying the listen IPs.
//!
//! The addon's `node-cache` puts its IPs on a dummy link named `nodelocaldns` and deletes the
//! link on exit, whether it created it or not. nodedns is stricter: [`ensure`] is idempotent,
//! reports exactly what it created, and [`teardown`] removes only what nodedns created
//! (tracked in [`Owned`]), so a pre-existing link or somebody else's address is never touched.
//!
//! Everything goes through rtnetlink (no `ip` subprocess). Reads (dumps) work without
//! privileges; creating links and adding addresses needs `CAP_NET_ADMIN`.
//!
//! Why the "already local" check: kube-proxy in IPVS mode puts the kube-dns ClusterIP on
//! `kube-ipvs0`, and on a laptop `--listen 127.0.0.1:5353` needs no link at all. Such addresses
//! are left alone; if nothing remains to add, no link is created and (for loopback-only
//! configurations) netlink is not even opened.
//!
//! IPv6 addresses are added with `IFA_F_NODAD`: without it the kernel keeps a new address
//! *tentative* until duplicate address detection finishes (about a second, or forever on a link
//! without carrier) and `bind()` fails with `EADDRNOTAVAIL` in the meantime. A node-local
//! service address has no neighbours to collide with, so DAD buys nothing.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use futures_util::stream::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec, MulticastGroup, RouteMessageBuilder};

/// Kind of link to create when the configured link does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinkKind {
    /// A dummy link (what node-cache uses). Needs `CONFIG_DUMMY` in the kernel.
    #[default]
    Dummy,
    /// A port-less bridge: behaves like a dummy for local delivery and exists in kernels
    /// (and minimal VMs) built without the dummy driver.
    Bridge,
}

impl LinkKind {
    /// The kernel's name for the link type (as in `ip link add ... type <name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Dummy => "dummy",
            LinkKind::Bridge => "bridge",
        }
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LinkKind {
    type Err = NetifError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dummy" => Ok(LinkKind::Dummy),
            "bridge" => Ok(LinkKind::Bridge),
            other => Err(NetifError::UnknownKind(other.to_string())),
        }
    }
}

/// What the listen interface should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetifConfig {
    /// Link name (at most 15 bytes, the kernel's `IFNAMSIZ - 1`).
    pub name: String,
    /// Kind used when the link has to be created; an existing link is used whatever its kind.
    pub kind: LinkKind,
    /// Listen IPs; each is added as a host address (/32 or /128).
    pub addrs: Vec<IpAddr>,
}

/// Errors from [`ensure`] and [`teardown`].
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// The kernel answered EOPNOTSUPP to creating a link of this kind.
    #[error(
        "the kernel has no {kind} link type (build with CONFIG_DUMMY or run `modprobe dummy`); \
         use `--link-kind bridge` instead"
    )]
    KindUnsupported {
        /// The kind that was refused.
        kind: LinkKind,
    },
    /// EPERM/EACCES from netlink.
    #[error("{op}: permission denied; nodedns needs CAP_NET_ADMIN to manage the listen interface")]
    PermissionDenied {
        /// What was being attempted, e.g. "create link nodelocaldns".
        op: String,
    },
    /// A link kind string that is neither "dummy" nor "bridge".
    #[error("unknown link kind {0:?} (expected \"dummy\" or \"bridge\")")]
    UnknownKind(String),
    /// The link name is empty, too long or contains characters the kernel refuses.
    #[error("invalid link name {0:?}: must be 1-15 bytes without '/', ':' or whitespace")]
    InvalidName(String),
    /// Opening the netlink socket failed.
    #[error("cannot open netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    /// The address was added but the kernel did not make it routable in time.
    #[error("address {ip} was added but the kernel did not install its local route within 2s")]
    NotReady {
        /// The address.
        ip: IpAddr,
    },
    /// Any other netlink failure.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being attempted.
        op: String,
        /// The underlying rtnetlink error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// One thing [`Netif::ensure`] had to put back although nodedns had set it up before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The link nodedns created had disappeared and was created again.
    LinkRecreated(String),
    /// The link was administratively down and was set up.
    LinkSetUp(String),
    /// An address nodedns had added was missing and was added again.
    AddressRestored(IpAddr),
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::LinkRecreated(n) => write!(f, "link {n} recreated"),
            Repair::LinkSetUp(n) => write!(f, "link {n} set up"),
            Repair::AddressRestored(ip) => write!(f, "address {ip} restored"),
        }
    }
}

/// What one [`ensure`] call found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// This call created the link.
    pub link_created: bool,
    /// This call set an existing, down link up (a freshly created link is created up and does
    /// not count here).
    pub link_set_up: bool,
    /// Addresses this call added to the link.
    pub added: Vec<IpAddr>,
    /// Addresses that were already on the link.
    pub present: Vec<IpAddr>,
    /// Addresses that are local already without the link (loopback range, or on another link
    /// such as `kube-ipvs0`); they were not added.
    pub local_elsewhere: Vec<IpAddr>,
    /// The link existed already and carries nodedns's alias: an earlier nodedns (crashed, or the
    /// previous version during an upgrade) created it, so it counts as nodedns's to remove.
    pub adopted: bool,
    /// Filled only by [`Netif::ensure`] (which knows the history): what had been set up by
    /// nodedns before and had to be put back. The stateless [`ensure`] leaves it empty.
    pub repaired: Vec<Repair>,
}

impl Outcome {
    /// True when the call changed nothing.
    pub fn is_noop(&self) -> bool {
        !self.link_created && !self.link_set_up && self.added.is_empty()
    }
}

/// Cumulative record of what nodedns created, i.e. what [`teardown`] may remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Name of the link the addresses live on.
    pub link: String,
    /// nodedns created the link (so teardown deletes it, and with it the addresses).
    pub link_created: bool,
    /// Addresses nodedns added.
    pub addrs: BTreeSet<IpAddr>,
}

impl Owned {
    /// An empty record for the link `link`.
    pub fn new(link: impl Into<String>) -> Self {
        Owned {
            link: link.into(),
            ..Owned::default()
        }
    }

    /// Merges one [`Outcome`] into the record and returns what counts as a repair: things this
    /// call had to create although nodedns had created them before.
    pub fn record(&mut self, outcome: &Outcome) -> Vec<Repair> {
        let mut repairs = Vec::new();
        if outcome.link_created {
            if self.link_created {
                repairs.push(Repair::LinkRecreated(self.link.clone()));
            }
            self.link_created = true;
        }
        if outcome.adopted && !self.link_created {
            self.link_created = true;
            self.addrs.extend(outcome.present.iter().copied());
        }
        if outcome.link_set_up && (self.link_created || !self.addrs.is_empty()) {
            repairs.push(Repair::LinkSetUp(self.link.clone()));
        }
        for ip in &outcome.added {
            if !self.addrs.insert(*ip) {
                repairs.push(Repair::AddressRestored(*ip));
            }
        }
        repairs
    }

    /// True when there is nothing to tear down.
    pub fn is_empty(&self) -> bool {
        !self.link_created && self.addrs.is_empty()
    }
}

/// Stateful wrapper: a config plus the cumulative [`Owned`] record, for the reconcile loop.
#[derive(Debug, Clone)]
pub struct Netif {
    cfg: NetifConfig,
    owned: Owned,
}

impl Netif {
    /// A manager that has created nothing yet.
    pub fn new(cfg: NetifConfig) -> Self {
        let owned = Owned::new(cfg.name.clone());
        Netif { cfg, owned }
    }

    /// The configuration.
    pub fn config(&self) -> &NetifConfig {
        &self.cfg
    }

    /// What nodedns created so far.
    pub fn owned(&self) -> &Owned {
        &self.owned
    }

    /// Runs [`ensure`], records what it created and fills [`Outcome::repaired`].
    pub async fn ensure(&mut self) -> Result<Outcome, NetifError> {
        let mut outcome = ensure(&self.cfg).await?;
        outcome.repaired = self.owned.record(&outcome);
        Ok(outcome)
    }

    /// Runs [`teardown`] and forgets the record on success.
    pub async fn teardown(&mut self) -> Result<(), NetifError> {
        teardown(&self.owned).await?;
        self.owned = Owned::new(self.cfg.name.clone());
        Ok(())
    }
}

const EPERM: i32 = libc::EPERM;
const EACCES: i32 = libc::EACCES;
const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;
const ENODEV: i32 = libc::ENODEV;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// The positive errno of a netlink error reply, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn map_err(op: impl Into<String>, source: rtnetlink::Error) -> NetifError {
    let op = op.into();
    match errno(&source) {
        Some(EPERM | EACCES) => NetifError::PermissionDenied { op },
        _ => NetifError::Netlink { op, source },
    }
}

fn validate_name(name: &str) -> Result<(), NetifError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NetifError::InvalidName(name.to_string()))
    }
}

/// Host prefix length for an address: /32 for IPv4, /128 for IPv6.
fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// A netlink connection whose driver task is aborted on drop, so a failed `ensure` does not
/// leave a task behind on the caller's runtime.
struct Conn {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    /// Unsolicited messages of the multicast groups joined in [`Conn::open`].
    events: Events,
}

/// Unsolicited netlink messages from rtnetlink's multicast connection.
type Events = futures_channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

impl Conn {
    /// Opens a connection subscribed to `groups` (joining a group needs no privilege).
    fn open(groups: &[MulticastGroup]) -> Result<Self, NetifError> {
        let (conn, handle, events) =
            rtnetlink::new_multicast_connection(groups).map_err(NetifError::Connect)?;
        let task = tokio::spawn(conn);
        Ok(Conn {
            handle,
            task,
            events,
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The link called `name`, or `None` if there is none.
async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetifError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(map_err(format!("look up link {name}"), e)),
    }
}

/// Every local address with the index of the link it is on (one read-only dump).
async fn dump_addrs(handle: &Handle) -> Result<HashMap<IpAddr, Vec<u32>>, NetifError> {
    let mut map: HashMap<IpAddr, Vec<u32>> = HashMap::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| map_err("dump addresses", e))?
    {
        // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise (and
        // both are equal for ours). Take either.
        for attr in &msg.attributes {
            if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr {
                let idxs = map.entry(*ip).or_default();
                if !idxs.contains(&msg.header.index) {
                    idxs.push(msg.header.index);
                }
            }
        }
    }
    Ok(map)
}

async fn create_link(handle: &Handle, cfg: &NetifConfig) -> Result<(), NetifError> {
    let msg = match cfg.kind {
        LinkKind::Dummy => LinkDummy::new(&cfg.name).up().build(),
        LinkKind::Bridge => LinkBridge::new(&cfg.name).up().build(),
    };

    handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| match errno(&e) {
            Some(EOPNOTSUPP) => NetifError::KindUnsupported { kind: cfg.kind },
            _ => map_err(format!("create {} link {}", cfg.kind, cfg.name), e),
        })
}

async fn add_addr(handle: &Handle, index: u32, ip: IpAddr, link: &str) -> Result<(), NetifError> {
    let mut req = handle.address().add(index, ip, host_prefix(ip)).replace();
    if ip.is_ipv6() {
        // See the module docs: skip DAD so the address is bindable at once. The 8-bit header
        // field and the 32-bit IFA_FLAGS attribute both carry it; newer kernels read the latter.
        let msg = req.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(|e| map_err(format!("add address {ip} to {link}"), e))
}

/// The alias (`ip link` shows it as `alias nodedns`) set on links nodedns creates.
pub const LINK_ALIAS: &str = "nodedns";

/// Whether a link carries nodedns's alias, i.e. a nodedns created it.
fn created_by_nodedns(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfAlias(s) if s == LINK_ALIAS))
}

/// Makes the link exist, carry every configured address that is not local elsewhere, and be up.
///
/// Idempotent: a second call on an unchanged system changes nothing and returns an [`Outcome`]
/// with `link_created == false` and `added` empty. Addresses in the loopback range
/// (127.0.0.0/8, ::1) count as local; if every address is such, netlink is not opened at all.
/// Otherwise the needed reads are unprivileged dumps, so a configuration where every address is
/// local elsewhere needs no `CAP_NET_ADMIN` either.
pub async fn ensure(cfg: &NetifConfig) -> Result<Outcome, NetifError> {
    validate_name(&cfg.name)?;
    let mut outcome = Outcome::default();
    let mut candidates = Vec::new();
    for ip in dedup(&cfg.addrs) {
        if ip.is_loopback() {
            outcome.local_elsewhere.push(ip);
        } else {
            candidates.push(ip);
        }
    }
    if candidates.is_empty() {
        return Ok(outcome);
    }

    // IPv6 addresses become usable only once the kernel has installed their local route, which
    // it does asynchronously after acknowledging the add; subscribe before adding so that event
    // cannot be missed (see `wait_local_routes`).
    let groups: &[MulticastGroup] = if candidates.iter().any(IpAddr::is_ipv6) {
        &[MulticastGroup::Ipv6Route]
    } else {
        &[]
    };
    let mut conn = Conn::open(groups)?;
    let handle = &conn.handle.clone();
    let mut link = find_link(handle, &cfg.name).await?;
    let local = dump_addrs(handle).await?;
    let link_index = link.as_ref().map(|l| l.header.index);
    outcome.adopted = link.as_ref().is_some_and(created_by_nodedns);

    let mut to_add = Vec::new();
    for ip in candidates {
        let on = local.get(&ip).map(Vec::as_slice).unwrap_or_default();
        if link_index.is_some_and(|idx| on.contains(&idx)) {
            outcome.present.push(ip);
        } else if !on.is_empty() {
            outcome.local_elsewhere.push(ip);
        } else {
            to_add.push(ip);
        }
    }

    if link.is_none() {
        if to_add.is_empty() {
            return Ok(outcome);
        }
        create_link(handle, cfg).await?;
        outcome.link_created = true;
        link = find_link(handle, &cfg.name).await?;
        if let Some(l) = &link {
            // Mark the link as nodedns's, so a later nodedns (after a crash, or the next version
            // during an upgrade) knows it may remove it. The kernel takes the alias on a change,
            // not at creation.
            let mut msg = LinkUnspec::new_with_index(l.header.index).build();
            msg.attributes
                .push(LinkAttribute::IfAlias(LINK_ALIAS.to_string()));
            handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| map_err(format!("set the alias of link {}", cfg.name), e))?;
        }
    }
    let Some(link) = link else {
        // Created a moment ago but gone again: someone deleted it concurrently.
        return Err(NetifError::Netlink {
            op: format!("look up link {} after creating it", cfg.name),
            source: rtnetlink::Error::RequestFailed,
        });
    };
    let index = link.header.index;

    // Up before adding: setting a link up after adding IPv6 addresses works too, but a link
    // that goes down flushes them, so doing it first keeps one order for create and repair.
    let has_ours = !to_add.is_empty() || !outcome.present.is_empty();
    if has_ours && !link.header.flags.contains(LinkFlags::Up) {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| map_err(format!("set link {} up", cfg.name), e))?;
        outcome.link_set_up = !outcome.link_created;
    }

    for ip in to_add {
        add_addr(handle, index, ip, &cfg.name).await?;
        outcome.added.push(ip);
    }
    let v6: Vec<Ipv6Addr> = outcome
        .added
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    wait_local_routes(handle, &mut conn.events, v6).await?;
    Ok(outcome)
}

/// How long the kernel gets to install the local route of a new IPv6 address.
const LOCAL_ROUTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the kernel routes `ip` locally right now (`ip route get`).
async fn routed_locally(handle: &Handle, ip: Ipv6Addr) -> Result<bool, NetifError> {
    let msg = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(ip, 128)
        .build();
    let mut routes = handle.route().get(msg).execute();
    match routes.try_next().await {
        Ok(Some(r)) => Ok(r.header.kind == RouteType::Local),
        Ok(None) => Ok(false),
        // No route at all (ENETUNREACH/EHOSTUNREACH) just means "not yet".
        Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(false),
        Err(e) => Err(map_err(format!("route lookup for {ip}"), e)),
    }
}

/// Waits until every address in `pending` has its local route.
///
/// Why: the kernel acknowledges an IPv6 address add (and `bind()` already succeeds) before its
/// address-configuration work has inserted the `local` route; until then the prefix route
/// sends packets for the address out of the link, where neighbour discovery fails. Measured
/// here: about one in ten datagrams sent right after `ensure` were lost that way. The signal is
/// the RTM_NEWROUTE notification on RTNLGRP_IPV6_ROUTE, subscribed before the add; the
/// `ip route get` check covers routes inserted before we started listening.
async fn wait_local_routes(
    handle: &Handle,
    events: &mut Events,
    pending: Vec<Ipv6Addr>,
) -> Result<(), NetifError> {
    let mut pending: BTreeSet<Ipv6Addr> = pending.into_iter().collect();
    let mut ready = Vec::new();
    for ip in &pending {
        if routed_locally(handle, *ip).await? {
            ready.push(*ip);
        }
    }
    for ip in ready {
        pending.remove(&ip);
    }
    let wait = async {
        while !pending.is_empty() {
            let Some((msg, _)) = events.next().await else {
                break;
            };
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) = msg.payload
                && r.header.kind == RouteType::Local
            {
                for attr in &r.attributes {
                    if let RouteAttribute::Destination(RouteAddress::Inet6(a)) = attr {
                        pending.remove(a);
                    }
                }
            }
        }
    };
    // A closed event stream or a timeout both end the wait; whatever is left did not arrive.
    let _ = tokio::time::timeout(LOCAL_ROUTE_TIMEOUT, wait).await;
    match pending.into_iter().next() {
        None => Ok(()),
        Some(ip) => Err(NetifError::NotReady { ip: IpAddr::V6(ip) }),
    }
}

fn dedup(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut seen = BTreeSet::new();
    addrs
        .iter()
        .copied()
        .filter(|ip| seen.insert(*ip))
        .collect()
}

/// Removes what `owned` says nodedns created: the link if nodedns created it (which removes its
/// addresses too), otherwise only the addresses nodedns added. Anything already gone is fine.
pub async fn teardown(owned: &Owned) -> Result<(), NetifError> {
    if owned.is_empty() {
        return Ok(());
    }
    let conn = Conn::open(&[])?;
    let handle = &conn.handle;
    let Some(link) = find_link(handle, &owned.link).await? else {
        return Ok(());
    };
    let index = link.header.index;
    if owned.link_created {
        return match handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(map_err(format!("delete link {}", owned.link), e)),
        };
    }
    for ip in &owned.addrs {
        let mut found = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(*ip)
            .execute();
        while let Some(msg) = found
            .try_next()
            .await
            .map_err(|e| map_err(format!("look up address {ip}"), e))?
        {
            match handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(map_err(
                        format!("delete address {ip} from {}", owned.link),
                        e,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether `ip` is currently a local address of this network namespace, i.e. whether a socket
/// can bind to it. Used to check `--setup-interface=false`: the operator promised the address
/// exists, and this verifies it before the listeners start.
///
/// Implemented as a bind probe (UDP, port 0, no `IP_FREEBIND`) rather than a netlink dump, because
/// that is exactly the question the listener will ask: it also says "no" for an IPv6 address that
/// is still tentative. Caveat: with the sysctl `net.ipv4.ip_nonlocal_bind=1` (or the ipv6
/// equivalent) every address looks local.
pub fn is_local(ip: IpAddr) -> std::io::Result<bool> {
    match std::net::UdpSocket::bind((ip, 0)) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test literal")
    }

    #[test]
    fn kind_parses() {
        assert_eq!("dummy".parse::<LinkKind>().ok(), Some(LinkKind::Dummy));
        assert_eq!("bridge".parse::<LinkKind>().ok(), Some(LinkKind::Bridge));
        assert!("veth".parse::<LinkKind>().is_err());
        assert_eq!(LinkKind::Bridge.to_string(), "bridge");
    }

    #[test]
    fn kind_unsupported_message_names_the_fix() {
        let msg = NetifError::KindUnsupported {
            kind: LinkKind::Dummy,
        }
        .to_string();
        assert!(msg.contains("no dummy link type"), "{msg}");
        assert!(msg.contains("CONFIG_DUMMY"), "{msg}");
        assert!(msg.contains("modprobe dummy"), "{msg}");
        assert!(msg.contains("--link-kind bridge"), "{msg}");
    }

    #[test]
    fn permission_message_is_one_line_naming_the_capability() {
        let msg = NetifError::PermissionDenied {
            op: "create dummy link nodelocaldns".into(),
        }
        .to_string();
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("nodelocaldns").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a-name-that-is-too-long").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
    }

    #[test]
    fn prefixes_are_host_routes() {
        assert_eq!(host_prefix(ip("169.254.20.10")), 32);
        assert_eq!(host_prefix(ip("fd00::10")), 128);
    }

    #[tokio::test]
    async fn loopback_only_needs_no_netlink() {
        // No privileges, no netlink: the call must succeed anywhere.
        let cfg = NetifConfig {
            name: "nodedns-none".into(),
            kind: LinkKind::Dummy,
            addrs: vec![ip("127.0.0.1"), ip("::1"), ip("127.0.0.1")],
        };
        let out = ensure(&cfg).await.expect("loopback-only ensure");
        assert!(out.is_noop());
        assert_eq!(out.local_elsewhere, vec![ip("127.0.0.1"), ip("::1")]);
    }

    #[test]
    fn owned_record_tracks_repairs() {
        let mut owned = Owned::new("nl");
        let first = Outcome {
            link_created: true,
            added: vec![ip("169.254.20.10")],
            ..Outcome::default()
        };
        assert!(owned.record(&first).is_empty());
        assert!(owned.link_created);
        let again = Outcome {
            added: vec![ip("169.254.20.10")],
            link_set_up: true,
            ..Outcome::default()
        };
        assert_eq!(
            owned.record(&again),
            vec![
                Repair::LinkSetUp("nl".into()),
                Repair::AddressRestored(ip("169.254.20.10"))
            ]
        );
        let recreated = Outcome {
            link_created: true,
            ..Outcome::default()
        };
        assert_eq!(
            owned.record(&recreated),
            vec![Repair::LinkRecreated("nl".into())]
        );
    }

    #[test]
    fn is_local_probe() {
        assert!(is_local(ip("127.0.0.1")).unwrap_or(false));
        // TEST-NET-3 is never configured on a test host.
        assert!(!is_local(ip("203.0.113.77")).unwrap_or(true));
    }
}
