//! Packet-filter rules that let DNS to the node-local IPs skip conntrack.
//!
//! Why: node-cache's listen IP may be the kube-dns ClusterIP. In kube-proxy's iptables mode,
//! conntrack + NAT would rewrite queries to that IP towards the kube-dns pods; `NOTRACK` in the
//! raw table makes them skip conntrack (and so NAT) and reach our local listener instead. Untracked
//! packets also miss the usual `RELATED,ESTABLISHED` accepts, hence the explicit `ACCEPT`s.
//!
//! Two backends produce the same effect:
//! - [`iptables`]: exactly the addon's 12 rules per IP, tagged with a `nodedns: ...` comment so
//!   that nodedns finds and removes only its own, applied with `iptables-restore --noflush`.
//! - [`nft`]: one table of our own, `table inet nodedns`, replaced atomically.
//!
//! Everything here is blocking (it runs `iptables-save`, `iptables-restore`, `nft`); call it from
//! `spawn_blocking`. Rule generation is pure and golden-tested; only [`Firewall`] runs commands.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::str::FromStr;

pub mod iptables;
pub mod nft;

/// Which packet-filter backend programs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore` (node-cache parity; the default).
    #[default]
    Iptables,
    /// `nft` with a table of our own.
    Nftables,
    /// Install nothing (e.g. the listen IP is not a ClusterIP, or the CNI handles it).
    None,
}

impl Backend {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
            Backend::None => "none",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = FirewallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Backend::Iptables),
            "nftables" => Ok(Backend::Nftables),
            "none" => Ok(Backend::None),
            other => Err(FirewallError::UnknownBackend(other.to_string())),
        }
    }
}

/// What the rules protect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Local listen addresses, each IP with its own DNS port (v4 and v6 may be mixed; each family
    /// goes to its own tool/table).
    pub addrs: Vec<SocketAddr>,
    /// Health-check port on the same IPs, if any; its TCP traffic skips conntrack too, so
    /// liveness probes do not pile up conntrack/TIME-WAIT entries.
    pub health_port: Option<u16>,
    /// When incoming DNS to the addresses skips conntrack.
    pub intercept: Intercept,
}

/// When the PREROUTING NOTRACK rules take a query away from conntrack (and so from kube-proxy's
/// DNAT of a ClusterIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Intercept {
    /// Only while a socket would receive them (`-m socket`, which ignores wildcard-bound
    /// sockets, / nft's `socket transparent 0`, which does not): a dead nodedns fails open,
    /// its queries are tracked again and kube-proxy's DNAT takes them to the cluster DNS.
    #[default]
    WhileListening,
    /// Always (the addon's rules, for a kernel without the socket match): a dead nodedns is a
    /// DNS outage for pods using a ClusterIP it serves.
    Always,
}

/// Errors from running the firewall tools.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A backend name that is none of "iptables", "nftables", "none".
    #[error("unknown firewall backend {0:?} (expected \"iptables\", \"nftables\" or \"none\")")]
    UnknownBackend(String),
    /// The tool is not installed.
    #[error("`{binary}` not found in PATH; install the Debian package `{package}`")]
    MissingBinary {
        /// The command that was run.
        binary: &'static str,
        /// The Debian package that ships it.
        package: &'static str,
    },
    /// Another process holds the xtables lock (kube-proxy, the CNI...) for longer than we wait.
    #[error("`{binary}`: another process is holding the xtables lock: {detail}")]
    Lock {
        /// The command that was run.
        binary: &'static str,
        /// The tool's message.
        detail: String,
    },
    /// The tool refused for lack of privilege.
    #[error(
        "`{binary}`: permission denied; nodedns needs CAP_NET_ADMIN (and CAP_NET_RAW for iptables)"
    )]
    PermissionDenied {
        /// The command that was run.
        binary: &'static str,
    },
    /// The tool failed for another reason.
    #[error("`{binary}` failed ({status}): {stderr}")]
    Command {
        /// The command that was run.
        binary: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Spawning or talking to the tool failed.
    #[error("`{binary}`: {source}")]
    Io {
        /// The command that was run.
        binary: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Teardown deleted our rules but they were still there afterwards.
    #[error("rules still present after teardown: {0}")]
    Stuck(String),
}

impl FirewallError {
    /// Label for the setup-errors metric: `iptables_lock` for lock contention (as node-cache),
    /// otherwise the backend (`iptables` or `nftables`), or `config` for bad input.
    pub fn kind(&self) -> &'static str {
        match self {
            FirewallError::Lock { .. } => "iptables_lock",
            FirewallError::UnknownBackend(_) => "config",
            FirewallError::MissingBinary { binary, .. }
            | FirewallError::PermissionDenied { binary }
            | FirewallError::Command { binary, .. }
            | FirewallError::Io { binary, .. } => {
                if binary.starts_with("nft") {
                    "nftables"
                } else {
                    "iptables"
                }
            }
            FirewallError::Stuck(_) => "iptables",
        }
    }
}

/// The configured backend with its rules.
#[derive(Debug, Clone)]
pub enum Firewall {
    /// See [`iptables`].
    Iptables(iptables::Iptables),
    /// See [`nft`].
    Nftables(nft::Nftables),
    /// Does nothing.
    None,
}

impl Firewall {
    /// The firewall for `backend` programming `rules`.
    pub fn new(backend: Backend, rules: Rules) -> Self {
        match backend {
            Backend::Iptables => Firewall::Iptables(iptables::Iptables::new(rules)),
            Backend::Nftables => Firewall::Nftables(nft::Nftables::new(rules)),
            Backend::None => Firewall::None,
        }
    }

    /// Installs whatever is missing; returns a description of each rule it (re)added, so the
    /// caller can log repairs. Empty when everything was in place.
    pub fn ensure(&self) -> Result<Vec<String>, FirewallError> {
        match self {
            Firewall::Iptables(f) => f.ensure(),
            Firewall::Nftables(f) => f.ensure(),
            Firewall::None => Ok(Vec::new()),
        }
    }

    /// Whether the kernel has the socket match `backend` needs for [`Intercept::WhileListening`]
    /// (for iptables, in every family of `rules`): loads a rule using it into a chain no hook
    /// reaches (no traffic passes it) and removes it again.
    pub fn socket_match_supported(backend: Backend, rules: &Rules) -> Result<(), FirewallError> {
        match backend {
            Backend::Iptables => iptables::probe_socket_match(rules),
            Backend::Nftables => nft::probe_socket_match(),
            Backend::None => Ok(()),
        }
    }

    /// Removes every rule nodedns installed (also duplicates and leftovers from a crashed run)
    /// and nothing else.
    pub fn teardown(&self) -> Result<(), FirewallError> {
        match self {
            Firewall::Iptables(f) => f.teardown(),
            Firewall::Nftables(f) => f.teardown(),
            Firewall::None => Ok(()),
        }
    }
}

/// Runs `binary args...` with `stdin` and returns its stdout, mapping failures to errors.
pub(crate) fn run(
    binary: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, FirewallError> {
    let io = |source| FirewallError::Io { binary, source };
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Tools print their messages in the C locale, which the error classification expects.
        .env("LC_ALL", "C")
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FirewallError::MissingBinary { binary, package },
            _ => io(e),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(io)?;
        // Dropping the pipe closes it, so the tool sees EOF.
    }
    let out = child.wait_with_output().map_err(io)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(classify(binary, out.status, stderr))
}

fn classify(
    binary: &'static str,
    status: std::process::ExitStatus,
    stderr: String,
) -> FirewallError {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("xtables lock") {
        FirewallError::Lock {
            binary,
            detail: stderr,
        }
    } else if lower.contains("permission denied")
        || lower.contains("operation not permitted")
        || lower.contains("must be root")
    {
        FirewallError::PermissionDenied { binary }
    } else {
        FirewallError::Command {
            binary,
            status,
            stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn backend_parses() {
        assert_eq!("iptables".parse::<Backend>().ok(), Some(Backend::Iptables));
        assert_eq!("nftables".parse::<Backend>().ok(), Some(Backend::Nftables));
        assert_eq!("none".parse::<Backend>().ok(), Some(Backend::None));
        assert!("nft".parse::<Backend>().is_err());
    }

    #[test]
    fn errors_are_classified() {
        let st = std::process::ExitStatus::from_raw(4 << 8);
        let lock = classify(
            "iptables-restore",
            st,
            "Another app is currently holding the xtables lock. Perhaps you want to use the -w option?".into(),
        );
        assert_eq!(lock.kind(), "iptables_lock");
        let perm = classify(
            "iptables-restore",
            st,
            "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)".into(),
        );
        assert!(matches!(perm, FirewallError::PermissionDenied { .. }));
        assert!(perm.to_string().contains("CAP_NET_ADMIN"));
        let other = classify("nft", st, "Error: syntax error".into());
        assert_eq!(other.kind(), "nftables");
    }

    #[test]
    fn missing_binary_names_package() {
        let err = run("nodedns-no-such-tool", "iptables", &[], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nodedns-no-such-tool"), "{err}");
        assert!(err.contains("Debian package `iptables`"), "{err}");
    }

    #[test]
    fn none_backend_does_nothing() {
        let fw = Firewall::new(
            Backend::None,
            Rules {
                addrs: vec![],
                health_port: None,
                intercept: Intercept::Always,
            },
        );
        assert!(fw.ensure().map(|v| v.is_empty()).unwrap_or(false));
        assert!(fw.teardown().is_ok());
    }
}
