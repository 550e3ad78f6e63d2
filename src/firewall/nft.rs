//! nftables backend: one table of our own, `table inet nodedns`.
//!
//! Why a table of our own: nothing else lives in it, so ensure can replace it wholesale in one
//! transaction and teardown is "delete the table", never touching other rules. One `inet` table
//! covers IPv4 and IPv6. NOTRACK happens in chains at `raw` priority (-300), before conntrack;
//! the ACCEPT chains run at `filter` priority. Caveat: an accept in our table does not override a
//! drop in another table or in iptables' filter table (every base chain on a hook must accept);
//! the NOTRACK part works regardless.
//!
//! Presence is checked by comparing `nft list table inet nodedns` with the generated text: the
//! rules are written in the form nft prints them back (checked against nft 1.0.6).

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{FirewallError, Intercept, Rules, run};

/// Name of our table (family `inet`).
pub const TABLE: &str = "nodedns";

/// One base chain of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: &'static str,
    /// Netfilter hook.
    pub hook: &'static str,
    /// Priority keyword: `raw` (-300) or `filter` (0).
    pub priority: &'static str,
    /// Rule lines, as nft prints them.
    pub rules: Vec<String>,
}

impl Chain {
    fn header(&self) -> String {
        format!(
            "type filter hook {} priority {}; policy accept;",
            self.hook, self.priority
        )
    }
}

fn matcher(ip: IpAddr, dir: &str) -> String {
    let fam = match ip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    };
    format!("{fam} {dir} {ip}")
}

/// The chains for `r` (the same 12 rules per IP as the iptables backend).
pub fn chains(r: &Rules) -> Vec<Chain> {
    let mut pre = Vec::new();
    let mut out_raw = Vec::new();
    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for &a in &r.addrs {
        if !seen.insert(a) {
            continue;
        }
        let (ip, dns) = (a.ip(), a.port());
        let (d, s) = (matcher(ip, "daddr"), matcher(ip, "saddr"));
        // Incoming queries skip conntrack only while a socket would receive them (`transparent
        // 0` holds for any socket found, request sockets of a TCP handshake included; `wildcard
        // 0` does not: it breaks on those, so a handshake's ACK was tracked and DNATed away).
        // Unlike iptables' match this counts a wildcard-bound socket too. Not in output: there
        // the packet's socket is its sender's, so the match would always hold.
        let socket = match r.intercept {
            Intercept::WhileListening => " socket transparent 0",
            Intercept::Always => "",
        };
        for proto in ["tcp", "udp"] {
            pre.push(format!("{d} {proto} dport {dns}{socket} notrack"));
            input.push(format!("{d} {proto} dport {dns} accept"));
            out_raw.push(format!("{s} {proto} sport {dns} notrack"));
            output.push(format!("{s} {proto} sport {dns} accept"));
        }
        for proto in ["tcp", "udp"] {
            out_raw.push(format!("{d} {proto} dport {dns} notrack"));
        }
        if let Some(hp) = r.health_port {
            out_raw.push(format!("{d} tcp dport {hp} notrack"));
            out_raw.push(format!("{s} tcp sport {hp} notrack"));
        }
    }
    vec![
        Chain {
            name: "raw-prerouting",
            hook: "prerouting",
            priority: "raw",
            rules: pre,
        },
        Chain {
            name: "raw-output",
            hook: "output",
            priority: "raw",
            rules: out_raw,
        },
        Chain {
            name: "filter-input",
            hook: "input",
            priority: "filter",
            rules: input,
        },
        Chain {
            name: "filter-output",
            hook: "output",
            priority: "filter",
            rules: output,
        },
    ]
}

/// The table definition, formatted as `nft list table` prints it.
pub fn table_text(chains: &[Chain]) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    for (i, c) in chains.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "\tchain {} {{", c.name);
        let _ = writeln!(out, "\t\t{}", c.header());
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

/// The `nft -f -` script that replaces our table atomically. The leading empty `table`
/// statement makes the `delete` valid when the table does not exist yet (the standard idiom).
pub fn apply_script(chains: &[Chain]) -> String {
    format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{}",
        table_text(chains)
    )
}

/// Table the socket-match probe creates and deletes.
const PROBE_TABLE: &str = "nodedns-probe";

/// The `nft -f -` script that checks the kernel has the socket expression: a regular chain (no
/// hook, so no traffic passes it) in a table of its own, deleted in the same transaction.
pub fn probe_script() -> String {
    format!(
        "table inet {PROBE_TABLE} {{\n\tchain probe {{\n\t\tudp dport 53 socket transparent 0 accept\n\t}}\n}}\ndelete table inet {PROBE_TABLE}\n"
    )
}

/// See [`super::Firewall::socket_match_supported`].
pub fn probe_socket_match() -> Result<(), FirewallError> {
    run("nft", "nftables", &["-f", "-"], Some(&probe_script())).map(drop)
}

/// The `nft -f -` script that removes our table, whether or not it exists.
pub fn delete_script() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

/// Differences between the wanted chains and a `nft list table inet nodedns` listing:
/// descriptions of what is missing (to be re-added) and of what is there but unwanted.
pub fn drift(chains: &[Chain], listing: &str) -> (Vec<String>, Vec<String>) {
    // chain name -> (header, rules) as listed; handles (`# handle N`) are stripped.
    let mut listed: Vec<(String, Vec<String>)> = Vec::new();
    for line in listing.lines() {
        let line = line.split(" # handle").next().unwrap_or(line).trim();
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix('{'))
        {
            listed.push((name.trim().to_string(), Vec::new()));
        } else if line.is_empty() || line == "}" || line.starts_with("table ") {
            continue;
        } else if let Some((_, lines)) = listed.last_mut() {
            lines.push(line.to_string());
        }
    }
    let mut missing = Vec::new();
    let mut unexpected = Vec::new();
    for c in chains {
        let Some((_, got)) = listed.iter().find(|(n, _)| n == c.name) else {
            missing.push(format!("nft chain inet {TABLE} {}", c.name));
            missing.extend(
                c.rules
                    .iter()
                    .map(|r| format!("nft rule inet {TABLE} {} {r}", c.name)),
            );
            continue;
        };
        if !got.contains(&c.header()) {
            missing.push(format!("nft chain inet {TABLE} {} {}", c.name, c.header()));
        }
        for r in &c.rules {
            if !got.contains(r) {
                missing.push(format!("nft rule inet {TABLE} {} {r}", c.name));
            }
        }
        for g in got {
            if *g != c.header() && !c.rules.contains(g) {
                unexpected.push(format!("nft rule inet {TABLE} {} {g}", c.name));
            }
        }
    }
    for (name, _) in &listed {
        if !chains.iter().any(|c| c.name == name) {
            unexpected.push(format!("nft chain inet {TABLE} {name}"));
        }
    }
    (missing, unexpected)
}

/// The nftables backend.
#[derive(Debug, Clone)]
pub struct Nftables {
    chains: Vec<Chain>,
}

impl Nftables {
    /// Backend for `r`.
    pub fn new(r: Rules) -> Self {
        Nftables { chains: chains(&r) }
    }

    /// The generated chains.
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }

    fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        run("nft", "nftables", args, stdin)
    }

    /// Our table as listed, or "" when it does not exist.
    fn listing() -> Result<String, FirewallError> {
        match Self::nft(&["list", "table", "inet", TABLE], None) {
            Ok(s) => Ok(s),
            Err(FirewallError::Command { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(String::new())
            }
            Err(e) => Err(e),
        }
    }

    /// See [`super::Firewall::ensure`]. Any drift replaces the whole table atomically; the
    /// result lists the rules that were missing, then (prefixed "removed ") unwanted leftovers.
    pub fn ensure(&self) -> Result<Vec<String>, FirewallError> {
        let (missing, unexpected) = drift(&self.chains, &Self::listing()?);
        if missing.is_empty() && unexpected.is_empty() {
            return Ok(Vec::new());
        }
        Self::nft(&["-f", "-"], Some(&apply_script(&self.chains)))?;
        let mut changes = missing;
        changes.extend(unexpected.into_iter().map(|u| format!("removed {u}")));
        Ok(changes)
    }

    /// See [`super::Firewall::teardown`]: deletes our table.
    pub fn teardown(&self) -> Result<(), FirewallError> {
        Self::nft(&["-f", "-"], Some(&delete_script())).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addrs: &[&str], health: Option<u16>) -> Rules {
        Rules {
            addrs: addrs
                .iter()
                .map(|a| {
                    let ip: IpAddr = a.parse().expect("test literal");
                    std::net::SocketAddr::new(ip, 53)
                })
                .collect(),
            health_port: health,
            intercept: Intercept::Always,
        }
    }

    const GOLDEN: &str = "table inet nodedns {}
delete table inet nodedns
table inet nodedns {
\tchain raw-prerouting {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tip daddr 169.254.20.10 tcp dport 53 notrack
\t\tip daddr 169.254.20.10 udp dport 53 notrack
\t\tip6 daddr fd00::10 tcp dport 53 notrack
\t\tip6 daddr fd00::10 udp dport 53 notrack
\t}

\tchain raw-output {
\t\ttype filter hook output priority raw; policy accept;
\t\tip saddr 169.254.20.10 tcp sport 53 notrack
\t\tip saddr 169.254.20.10 udp sport 53 notrack
\t\tip daddr 169.254.20.10 tcp dport 53 notrack
\t\tip daddr 169.254.20.10 udp dport 53 notrack
\t\tip daddr 169.254.20.10 tcp dport 8080 notrack
\t\tip saddr 169.254.20.10 tcp sport 8080 notrack
\t\tip6 saddr fd00::10 tcp sport 53 notrack
\t\tip6 saddr fd00::10 udp sport 53 notrack
\t\tip6 daddr fd00::10 tcp dport 53 notrack
\t\tip6 daddr fd00::10 udp dport 53 notrack
\t\tip6 daddr fd00::10 tcp dport 8080 notrack
\t\tip6 saddr fd00::10 tcp sport 8080 notrack
\t}

\tchain filter-input {
\t\ttype filter hook input priority filter; policy accept;
\t\tip daddr 169.254.20.10 tcp dport 53 accept
\t\tip daddr 169.254.20.10 udp dport 53 accept
\t\tip6 daddr fd00::10 tcp dport 53 accept
\t\tip6 daddr fd00::10 udp dport 53 accept
\t}

\tchain filter-output {
\t\ttype filter hook output priority filter; policy accept;
\t\tip saddr 169.254.20.10 tcp sport 53 accept
\t\tip saddr 169.254.20.10 udp sport 53 accept
\t\tip6 saddr fd00::10 tcp sport 53 accept
\t\tip6 saddr fd00::10 udp sport 53 accept
\t}
}
";

    #[test]
    fn golden_script() {
        let c = chains(&r(&["169.254.20.10", "fd00::10"], Some(8080)));
        assert_eq!(apply_script(&c), GOLDEN);
        let total: usize = c.iter().map(|c| c.rules.len()).sum();
        assert_eq!(total, 24, "12 rules per IP, like the iptables backend");
    }

    #[test]
    fn golden_while_listening() {
        let mut rules_in = r(&["10.96.0.10", "fd00::10"], None);
        rules_in.intercept = Intercept::WhileListening;
        let c = chains(&rules_in);
        // Only raw-prerouting changes (see `chains`).
        assert_eq!(
            c[0].rules,
            vec![
                "ip daddr 10.96.0.10 tcp dport 53 socket transparent 0 notrack",
                "ip daddr 10.96.0.10 udp dport 53 socket transparent 0 notrack",
                "ip6 daddr fd00::10 tcp dport 53 socket transparent 0 notrack",
                "ip6 daddr fd00::10 udp dport 53 socket transparent 0 notrack",
            ]
        );
        let mut always = r(&["10.96.0.10", "fd00::10"], None);
        always.intercept = Intercept::Always;
        assert_eq!(c[1..], chains(&always)[1..]);
        assert_eq!(
            probe_script(),
            "table inet nodedns-probe {\n\tchain probe {\n\t\tudp dport 53 socket transparent 0 accept\n\t}\n}\ndelete table inet nodedns-probe\n"
        );
    }

    #[test]
    fn drift_detects_missing_and_unexpected() {
        let c = chains(&r(&["169.254.20.10"], None));
        let listing = table_text(&c);
        assert_eq!(drift(&c, &listing), (vec![], vec![]));
        // As `nft -a list` prints it, with handles.
        let with_handles = listing.replace(" notrack\n", " notrack # handle 7\n");
        assert_eq!(drift(&c, &with_handles), (vec![], vec![]));

        let broken = listing
            // The first occurrence is in raw-prerouting (raw-output has the same line).
            .replacen("\t\tip daddr 169.254.20.10 udp dport 53 notrack\n", "", 1)
            .replace(
                "\t\tip saddr 169.254.20.10 tcp sport 53 accept\n",
                "\t\tip saddr 10.0.0.1 tcp sport 53 accept\n",
            );
        let (missing, unexpected) = drift(&c, &broken);
        assert_eq!(
            missing,
            vec![
                "nft rule inet nodedns raw-prerouting ip daddr 169.254.20.10 udp dport 53 notrack",
                "nft rule inet nodedns filter-output ip saddr 169.254.20.10 tcp sport 53 accept",
            ]
        );
        assert_eq!(
            unexpected,
            vec!["nft rule inet nodedns filter-output ip saddr 10.0.0.1 tcp sport 53 accept"]
        );

        let (missing, _) = drift(&c, "");
        assert_eq!(
            missing.len(),
            4 + 10,
            "every chain and rule when the table is gone"
        );
    }

    #[test]
    fn delete_is_idempotent_idiom() {
        assert_eq!(
            delete_script(),
            "table inet nodedns {}\ndelete table inet nodedns\n"
        );
    }
}
