//! iptables backend: node-cache's rules, each tagged with a `nodedns: ...` comment.
//!
//! Rules are written in the exact form `iptables-save` prints them, so presence is a plain line
//! comparison against `iptables-save -t raw|filter`. Changes go through
//! `iptables-restore --noflush -w 5`: one process per family and pass (instead of one `iptables`
//! call per rule), and `--noflush` leaves every other rule alone. The wait is bounded so that
//! lock contention (kube-proxy, Calico) becomes a reportable [`FirewallError::Lock`] rather than
//! a hang, which node-cache users hit on shutdown (kubernetes/dns#394).

use std::net::IpAddr;

use super::{FirewallError, Intercept, Rules, run};

/// Comment on the NOTRACK rules for DNS.
pub const COMMENT_NOTRACK: &str = "nodedns: skip conntrack";
/// Comment on the ACCEPT rules.
pub const COMMENT_ACCEPT: &str = "nodedns: allow DNS";
/// Comment on the NOTRACK rules for the health port.
pub const COMMENT_HEALTH: &str = "nodedns: skip conntrack for health";

/// How every nodedns comment starts in `iptables-save` output; teardown matches on it.
const OURS: &str = "-m comment --comment \"nodedns: ";

/// Seconds `iptables-restore` waits for the xtables lock.
const LOCK_WAIT_SECS: &str = "5";

/// IP family, which decides the tool (`iptables` or `ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4: `iptables-*`.
    V4,
    /// IPv6: `ip6tables-*`.
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// The tables nodedns writes to.
pub const TABLES: [&str; 2] = ["raw", "filter"];

/// One rule, in `iptables-save` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which tool.
    pub family: Family,
    /// `raw` or `filter`.
    pub table: &'static str,
    /// Chain, e.g. `PREROUTING`.
    pub chain: &'static str,
    /// Everything after `-A CHAIN`, exactly as `iptables-save` prints it.
    pub spec: String,
}

impl Rule {
    /// The line `iptables-save` prints for this rule (without the table header).
    pub fn save_line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }

    /// Human-readable description, as an `iptables` command line.
    pub fn describe(&self) -> String {
        let tool = match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{tool} -t {} {}", self.table, self.save_line())
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The rules for `r`, in node-cache's order: per IP, 12 rules with a health port, 10 without.
pub fn rules(r: &Rules) -> Vec<Rule> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for &a in &r.addrs {
        if !seen.insert(a) {
            continue;
        }
        let (ip, dns) = (a.ip(), a.port());
        let family = Family::of(ip);
        let h = host(ip);
        let socket = r.intercept == Intercept::WhileListening;
        let mut push = |table, chain, dir: &str, proto: &str, port: u16, comment, target| {
            let (addr_flag, port_flag) = match dir {
                "dst" => ("-d", "--dport"),
                _ => ("-s", "--sport"),
            };
            // Incoming queries skip conntrack only while a socket is bound to this address and
            // port (xt_socket ignores wildcard-bound ones). The match exists for PREROUTING and
            // INPUT only: in OUTPUT a packet's socket is its sender's, so nothing there can tell
            // whether nodedns listens.
            let m = if socket && chain == "PREROUTING" {
                " -m socket"
            } else {
                ""
            };
            out.push(Rule {
                family,
                table,
                chain,
                spec: format!(
                    "{addr_flag} {h} -p {proto} -m {proto} {port_flag} {port}{m} -m comment --comment \"{comment}\" -j {target}"
                ),
            });
        };
        for proto in ["tcp", "udp"] {
            push(
                "raw",
                "PREROUTING",
                "dst",
                proto,
                dns,
                COMMENT_NOTRACK,
                "NOTRACK",
            );
        }
        for proto in ["tcp", "udp"] {
            push(
                "filter",
                "INPUT",
                "dst",
                proto,
                dns,
                COMMENT_ACCEPT,
                "ACCEPT",
            );
        }
        for proto in ["tcp", "udp"] {
            push(
                "raw",
                "OUTPUT",
                "src",
                proto,
                dns,
                COMMENT_NOTRACK,
                "NOTRACK",
            );
        }
        for proto in ["tcp", "udp"] {
            push(
                "filter",
                "OUTPUT",
                "src",
                proto,
                dns,
                COMMENT_ACCEPT,
                "ACCEPT",
            );
        }
        for proto in ["tcp", "udp"] {
            push(
                "raw",
                "OUTPUT",
                "dst",
                proto,
                dns,
                COMMENT_NOTRACK,
                "NOTRACK",
            );
        }
        if let Some(hp) = r.health_port {
            push("raw", "OUTPUT", "dst", "tcp", hp, COMMENT_HEALTH, "NOTRACK");
            push("raw", "OUTPUT", "src", "tcp", hp, COMMENT_HEALTH, "NOTRACK");
        }
    }
    out
}

/// Chain the socket-match probe uses (no hook jumps to it).
const PROBE_CHAIN: &str = "NODEDNS-PROBE";

/// The `iptables-restore --noflush` scripts that add a socket-match rule to a chain of its own in
/// the raw table, and remove that chain.
pub fn probe_scripts() -> (String, String) {
    (
        format!(
            "*raw\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} -p udp -m socket -j RETURN\nCOMMIT\n"
        ),
        format!("*raw\n-F {PROBE_CHAIN}\n-X {PROBE_CHAIN}\nCOMMIT\n"),
    )
}

/// See [`super::Firewall::socket_match_supported`].
pub fn probe_socket_match(r: &Rules) -> Result<(), FirewallError> {
    let (add, remove) = probe_scripts();
    let mut families: Vec<Family> = r.addrs.iter().map(|a| Family::of(a.ip())).collect();
    families.sort();
    families.dedup();
    for family in families {
        let added = Iptables::restore(family, &add);
        // A leftover chain from a crash would make the add fail: remove it either way.
        let removed = Iptables::restore(family, &remove);
        added?;
        removed?;
    }
    Ok(())
}

/// The `-A` lines of one table in `iptables-save -t <table>` output.
fn appended<'a>(saved: &'a str, table: &str) -> Vec<&'a str> {
    let mut current = None;
    let mut lines = Vec::new();
    for line in saved.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t);
        } else if line.starts_with("-A ") && current == Some(table) {
            lines.push(line);
        }
    }
    lines
}

/// The rules of `wanted` that `saved` (output of `iptables-save` for the rules' family, any
/// tables) lacks.
pub fn missing<'a>(wanted: &'a [Rule], saved: &str) -> Vec<&'a Rule> {
    wanted
        .iter()
        .filter(|r| !appended(saved, r.table).contains(&r.save_line().as_str()))
        .collect()
}

/// `(table, line)` for every nodedns rule in `saved`, duplicates included.
pub fn ours(saved: &str) -> Vec<(&'static str, &str)> {
    TABLES
        .iter()
        .flat_map(|t| {
            appended(saved, t)
                .into_iter()
                .filter(|l| l.contains(OURS))
                .map(move |l| (*t, l))
        })
        .collect()
}

/// An `iptables-restore --noflush` script inserting `rules` at the top of their chains.
pub fn insert_script(rules: &[&Rule]) -> String {
    script(
        rules
            .iter()
            .map(|r| (r.table, format!("-I {} 1 {}", r.chain, r.spec))),
    )
}

/// An `iptables-restore --noflush` script deleting the given saved `-A` lines (one deletion per
/// line, so duplicates each get their own).
pub fn delete_script(lines: &[(&'static str, &str)]) -> String {
    script(lines.iter().map(|(table, line)| {
        let rest = line.strip_prefix("-A ").unwrap_or(line);
        (*table, format!("-D {rest}"))
    }))
}

fn script(cmds: impl Iterator<Item = (&'static str, String)>) -> String {
    let cmds: Vec<_> = cmds.collect();
    let mut out = String::new();
    for table in TABLES {
        let lines: Vec<&String> = cmds
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, l)| l)
            .collect();
        if lines.is_empty() {
            continue;
        }
        out.push('*');
        out.push_str(table);
        out.push('\n');
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The iptables backend.
#[derive(Debug, Clone)]
pub struct Iptables {
    rules: Vec<Rule>,
    families: Vec<Family>,
}

impl Iptables {
    /// Backend for `r`.
    pub fn new(r: Rules) -> Self {
        let rules = rules(&r);
        let mut families: Vec<Family> = rules.iter().map(|r| r.family).collect();
        families.sort();
        families.dedup();
        Iptables { rules, families }
    }

    /// The generated rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn save(family: Family) -> Result<String, FirewallError> {
        let mut all = String::new();
        for table in TABLES {
            all.push_str(&run(family.save(), "iptables", &["-t", table], None)?);
        }
        Ok(all)
    }

    fn restore(family: Family, script: &str) -> Result<(), FirewallError> {
        run(
            family.restore(),
            "iptables",
            &["--noflush", "-w", LOCK_WAIT_SECS],
            Some(script),
        )
        .map(drop)
    }

    /// See [`super::Firewall::ensure`].
    pub fn ensure(&self) -> Result<Vec<String>, FirewallError> {
        let mut added = Vec::new();
        for &family in &self.families {
            let wanted: Vec<Rule> = self
                .rules
                .iter()
                .filter(|r| r.family == family)
                .cloned()
                .collect();
            let saved = Self::save(family)?;
            let missing = missing(&wanted, &saved);
            if missing.is_empty() {
                continue;
            }
            Self::restore(family, &insert_script(&missing))?;
            added.extend(missing.iter().map(|r| r.describe()));
        }
        Ok(added)
    }

    /// See [`super::Firewall::teardown`]. Deletes every rule with a nodedns comment in the raw
    /// and filter tables of the configured families, then checks they are gone.
    pub fn teardown(&self) -> Result<(), FirewallError> {
        for &family in &self.families {
            // A second pass covers a rule re-added concurrently (e.g. by a reconcile racing us).
            for _ in 0..2 {
                let saved = Self::save(family)?;
                let lines = ours(&saved);
                if lines.is_empty() {
                    break;
                }
                Self::restore(family, &delete_script(&lines))?;
            }
            let saved = Self::save(family)?;
            if let Some((table, line)) = ours(&saved).first() {
                return Err(FirewallError::Stuck(format!("-t {table} {line}")));
            }
        }
        Ok(())
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

    #[test]
    fn golden_rules_v4() {
        let got: Vec<String> = rules(&r(&["169.254.20.10"], Some(8080)))
            .iter()
            .map(Rule::describe)
            .collect();
        let want = [
            r#"iptables -t raw -A PREROUTING -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t filter -A INPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t filter -A INPUT -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t raw -A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t filter -A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t filter -A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t raw -A OUTPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 8080 -m comment --comment "nodedns: skip conntrack for health" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 8080 -m comment --comment "nodedns: skip conntrack for health" -j NOTRACK"#,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn golden_rules_while_listening() {
        let mut rules_in = r(&["10.96.0.10", "fd00::10"], None);
        rules_in.intercept = Intercept::WhileListening;
        let got: Vec<String> = rules(&rules_in).iter().map(Rule::describe).collect();
        // Only the incoming NOTRACK rules change: OUTPUT has no socket match (the packet's
        // socket is its sender's), and the ACCEPTs are harmless with nothing listening.
        let want = [
            r#"iptables -t raw -A PREROUTING -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -m socket -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 53 -m socket -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t filter -A INPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t filter -A INPUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t raw -A OUTPUT -s 10.96.0.10/32 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -s 10.96.0.10/32 -p udp -m udp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t filter -A OUTPUT -s 10.96.0.10/32 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t filter -A OUTPUT -s 10.96.0.10/32 -p udp -m udp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"iptables -t raw -A OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"iptables -t raw -A OUTPUT -d 10.96.0.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t raw -A PREROUTING -d fd00::10/128 -p tcp -m tcp --dport 53 -m socket -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t raw -A PREROUTING -d fd00::10/128 -p udp -m udp --dport 53 -m socket -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t filter -A INPUT -d fd00::10/128 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"ip6tables -t filter -A INPUT -d fd00::10/128 -p udp -m udp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"ip6tables -t raw -A OUTPUT -s fd00::10/128 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t raw -A OUTPUT -s fd00::10/128 -p udp -m udp --sport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t filter -A OUTPUT -s fd00::10/128 -p tcp -m tcp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"ip6tables -t filter -A OUTPUT -s fd00::10/128 -p udp -m udp --sport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT"#,
            r#"ip6tables -t raw -A OUTPUT -d fd00::10/128 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
            r#"ip6tables -t raw -A OUTPUT -d fd00::10/128 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn probe_scripts_use_a_chain_of_their_own() {
        let (add, remove) = probe_scripts();
        assert_eq!(
            add,
            "*raw\n:NODEDNS-PROBE - [0:0]\n-A NODEDNS-PROBE -p udp -m socket -j RETURN\nCOMMIT\n"
        );
        assert_eq!(remove, "*raw\n-F NODEDNS-PROBE\n-X NODEDNS-PROBE\nCOMMIT\n");
    }

    #[test]
    fn counts_and_families() {
        let two = rules(&r(&["169.254.20.10", "10.96.0.10"], Some(8080)));
        assert_eq!(two.len(), 24, "node-cache installs 12 rules per IP");
        // Each address's rules use its own port.
        let mut mixed = r(&["169.254.20.10", "10.96.0.10"], None);
        mixed.addrs[1].set_port(5353);
        let mixed = rules(&mixed);
        assert!(mixed[..10].iter().all(|r| r.spec.contains(" 53 ")));
        assert!(mixed[10..].iter().all(|r| r.spec.contains(" 5353 ")));
        let no_health = rules(&r(&["fd00::10", "fd00::10"], None));
        assert_eq!(no_health.len(), 10, "duplicates collapse, no health rules");
        assert!(no_health.iter().all(|r| r.family == Family::V6));
        assert_eq!(
            no_health[0].describe(),
            r#"ip6tables -t raw -A PREROUTING -d fd00::10/128 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#
        );
    }

    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
-A PREROUTING -d 10.0.0.1/32 -p udp -m udp --dport 53 -m comment --comment "NodeLocal DNS Cache: skip conntrack" -j NOTRACK
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT
-A INPUT -j KUBE-FIREWALL
COMMIT
"#;

    #[test]
    fn missing_compares_per_table() {
        let wanted = rules(&r(&["169.254.20.10"], None));
        let miss: Vec<String> = missing(&wanted, SAVED)
            .iter()
            .map(|r| r.describe())
            .collect();
        assert_eq!(miss.len(), 8, "{miss:#?}");
        assert!(
            !miss
                .iter()
                .any(|m| m.contains("PREROUTING") && m.contains("udp"))
        );
        assert!(
            !miss
                .iter()
                .any(|m| m.contains("INPUT") && m.contains("tcp"))
        );
    }

    #[test]
    fn teardown_script_deletes_only_ours_including_duplicates() {
        let lines = ours(SAVED);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            delete_script(&lines),
            r#"*raw
-D PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
-D PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
COMMIT
*filter
-D INPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT
COMMIT
"#
        );
    }

    #[test]
    fn insert_script_prepends() {
        let wanted = rules(&r(&["169.254.20.10"], None));
        let picked = [&wanted[1], &wanted[2]];
        assert_eq!(
            insert_script(&picked),
            r#"*raw
-I PREROUTING 1 -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
COMMIT
*filter
-I INPUT 1 -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment "nodedns: allow DNS" -j ACCEPT
COMMIT
"#
        );
    }
}
