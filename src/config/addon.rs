//! The NodeLocal DNSCache addon's runtime step: node-cache renders the ConfigMap's Corefile
//! template (`Corefile.base`) with the cluster DNS address, the upstreams and the stub domains of
//! the kube-dns ConfigMap, then CoreDNS reads the result. [`render`] does the same substitutions,
//! so the addon's ConfigMap works unchanged; [`super::corefile::parse`] reads the result.
//!
//! Differences from node-cache, both where node-cache produces a Corefile CoreDNS refuses or
//! silently wrong:
//! - a placeholder that cannot be filled (no `*_SERVICE_HOST`, no Prometheus address, no local IP)
//!   is an error with the template line; node-cache writes `<nil>` and CoreDNS fails later;
//! - `__PILLAR__LOCAL__DNS__` glued to more text (`__PILLAR__LOCAL__DNS__:8080`, the `health`
//!   line) becomes the first local IP only: the space-joined list node-cache writes there is a
//!   `health` with several arguments, which CoreDNS rejects;
//! - with custom upstreams, `force_tcp` is dropped from the `forward` of
//!   `__PILLAR__UPSTREAM__SERVERS__` whatever the indentation (node-cache matches the text of its
//!   own block exactly), and the line is blanked rather than removed so errors keep the
//!   template's line numbers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::common;
use super::model::{ModelError, Origin, Sources, normalize_zone};
use crate::config::service_env_prefix;

/// The parts of the kube-dns ConfigMap node-cache uses. Its `federations` key is ignored, as
/// node-cache does (federation is long gone from Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeDns {
    /// Domain → servers, sorted by domain (node-cache's order is Go's random map order).
    pub stub_domains: Vec<(String, Vec<SocketAddr>)>,
    pub upstream_nameservers: Vec<SocketAddr>,
}

/// Reads `dir/stubDomains` (a JSON object: domain → list of `IP` or `IP:PORT`) and
/// `dir/upstreamNameservers` (a JSON list), as the mounted kube-dns ConfigMap has them. A missing
/// key is empty, like an absent ConfigMap (the addon mounts it optional).
pub fn read_kube_dns(dir: &Path, src: &dyn Sources) -> Result<KubeDns, ModelError> {
    let mut out = KubeDns::default();
    let stub_path = dir.join("stubDomains");
    let stub_file = stub_path.display().to_string();
    if let Some(text) = read_optional(&stub_path, src)? {
        let map: BTreeMap<String, Vec<String>> =
            serde_json::from_str(&text).map_err(|e| json_error(&stub_file, &e))?;
        for (domain, servers) in map {
            let at = Origin::at(
                &stub_file,
                common::line_of_str(&text, &format!("\"{domain}\"")),
            );
            let zone = normalize_zone(&domain)
                .map_err(|e| ModelError::new(at.clone(), format!("stubDomains: {e}")))?;
            if servers.is_empty() {
                return Err(ModelError::new(
                    at,
                    format!("stubDomains: {domain} has no servers"),
                ));
            }
            let servers = addresses(&text, &stub_file, "stubDomains", &servers)?;
            if out.stub_domains.iter().any(|(z, _)| *z == zone) {
                return Err(ModelError::new(
                    at,
                    format!("stubDomains: {zone} is given twice"),
                ));
            }
            out.stub_domains.push((zone, servers));
        }
        out.stub_domains.sort();
    }
    let up_path = dir.join("upstreamNameservers");
    let up_file = up_path.display().to_string();
    if let Some(text) = read_optional(&up_path, src)? {
        let list: Vec<String> =
            serde_json::from_str(&text).map_err(|e| json_error(&up_file, &e))?;
        out.upstream_nameservers = addresses(&text, &up_file, "upstreamNameservers", &list)?;
    }
    Ok(out)
}

/// A ConfigMap key: `None` when absent or blank.
fn read_optional(path: &Path, src: &dyn Sources) -> Result<Option<String>, ModelError> {
    match src.read(path) {
        Ok(t) if t.trim().is_empty() => Ok(None),
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::new(
            Origin::at(path.display().to_string(), 0),
            format!("cannot read: {e}"),
        )),
    }
}

fn json_error(file: &str, e: &serde_json::Error) -> ModelError {
    ModelError::new(Origin::at(file, e.line()), format!("bad JSON: {e}"))
}

fn addresses(
    text: &str,
    file: &str,
    key: &str,
    list: &[String],
) -> Result<Vec<SocketAddr>, ModelError> {
    if list.len() > common::MAX_UPSTREAMS {
        return Err(ModelError::new(
            Origin::at(file, 1),
            format!(
                "{key}: {} servers, at most {}",
                list.len(),
                common::MAX_UPSTREAMS
            ),
        ));
    }
    let mut out = Vec::new();
    for s in list {
        let a = common::server(s).map_err(|e| {
            ModelError::new(
                Origin::at(file, common::line_of_str(text, &format!("\"{s}\""))),
                format!("{key}: {e}"),
            )
        })?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// What node-cache fills the template with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonInputs {
    /// node-cache's `-upstreamsvc`: the cluster DNS is `<NAME>_SERVICE_HOST[:_SERVICE_PORT]`.
    pub upstream_svc: String,
    /// node-cache's `-localip`.
    pub local_ips: Vec<IpAddr>,
    pub kube_dns: KubeDns,
    /// `-prometheus-listen-address`, for `__PROMETHEUS__ENDPOINT__` (kubernetes-sigs/node-local-dns).
    pub prometheus: Option<String>,
}

const CLUSTER_DNS: &str = "__PILLAR__CLUSTER__DNS__";
const UPSTREAM_SERVERS: &str = "__PILLAR__UPSTREAM__SERVERS__";
const LOCAL_DNS: &str = "__PILLAR__LOCAL__DNS__";
const DNS_SERVER: &str = "__PILLAR__DNS__SERVER__";
const PROMETHEUS: &str = "__PROMETHEUS__ENDPOINT__";

/// Renders the addon's Corefile template as node-cache does (see the module doc for the few
/// differences). `file` names the template in errors, with its line numbers; the stub domains
/// are appended after the template's last line.
pub fn render(
    template: &str,
    file: &str,
    inputs: &AddonInputs,
    src: &dyn Sources,
) -> Result<String, ModelError> {
    let err = |line: usize, reason: String| ModelError::new(Origin::at(file, line), reason);
    let custom = &inputs.kube_dns.upstream_nameservers;
    let upstreams = if custom.is_empty() {
        "/etc/resolv.conf".to_string()
    } else {
        join(custom)
    };
    let locals: Vec<String> = inputs.local_ips.iter().map(IpAddr::to_string).collect();
    let mut cluster: Option<String> = None;
    let mut out = String::with_capacity(template.len() + 256);
    // Inside the `{ }` of the upstream forward, when its force_tcp is to be dropped.
    let mut in_upstream_block = false;
    for (n, raw) in template.split_inclusive('\n').enumerate() {
        let line_no = n + 1;
        let mut line = raw.to_string();
        if in_upstream_block {
            if line.contains('}') {
                in_upstream_block = false;
            }
            line = drop_word(&line, "force_tcp");
        }
        if line.contains(UPSTREAM_SERVERS) {
            if !custom.is_empty() {
                // node-cache: custom upstreams are reached over plain UDP.
                let after = line.split(UPSTREAM_SERVERS).nth(1).unwrap_or("");
                if after.contains('{') && !after.contains('}') {
                    in_upstream_block = true;
                }
                line = drop_word(&line, "force_tcp");
            }
            line = line.replace(UPSTREAM_SERVERS, &upstreams);
        }
        if line.contains(CLUSTER_DNS) {
            if cluster.is_none() {
                cluster = Some(
                    cluster_dns(&inputs.upstream_svc, src)
                        .map_err(|e| err(line_no, format!("{CLUSTER_DNS}: {e}")))?,
                );
            }
            line = line.replace(CLUSTER_DNS, cluster.as_deref().unwrap_or(""));
        }
        if line.contains(LOCAL_DNS) {
            if inputs.local_ips.is_empty() {
                return Err(err(line_no, format!("{LOCAL_DNS}: no local IPs given")));
            }
            line = replace_local(&line, &inputs.local_ips);
        }
        line = line
            .replace(&format!(",{DNS_SERVER}"), "")
            .replace(DNS_SERVER, "");
        if line.contains(PROMETHEUS) {
            let Some(p) = &inputs.prometheus else {
                return Err(err(
                    line_no,
                    format!("{PROMETHEUS}: no Prometheus listen address given"),
                ));
            };
            line = line.replace(PROMETHEUS, p);
        }
        // A placeholder in a comment is harmless (the template's own notes name them).
        let code = line.split('#').next().unwrap_or("");
        if let Some(i) = code.find("__PILLAR__") {
            let tail = code.get(i..).unwrap_or("");
            let end = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            return Err(err(
                line_no,
                format!(
                    "placeholder {} is not filled in",
                    tail.get(..end).unwrap_or(tail)
                ),
            ));
        }
        out.push_str(&line);
    }
    if !inputs.kube_dns.stub_domains.is_empty() && locals.is_empty() {
        return Err(err(0, "stub domains need local IPs to bind".into()));
    }
    for (domain, servers) in &inputs.kube_dns.stub_domains {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!(
            "\n{domain}:53 {{\n    errors\n    cache 30\n    bind {}\n    forward . {}\n}}\n",
            locals.join(" "),
            join(servers)
        ));
    }
    Ok(out)
}

fn join(servers: &[SocketAddr]) -> String {
    servers
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The cluster DNS from the kubelet's service variables: `IP`, or `IP:PORT` when the service
/// port is not 53.
fn cluster_dns(svc: &str, src: &dyn Sources) -> Result<String, String> {
    // `-upstreamsvc 10.0.0.10,10.0.0.11`: the servers themselves (kubernetes/dns#596).
    if let Some(list) = crate::config::upstream_ip_list(svc) {
        return list.map(|servers| {
            servers
                .iter()
                .map(|a| {
                    if a.port() == 53 {
                        a.ip().to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        });
    }
    let prefix = service_env_prefix(svc);
    let host_var = format!("{prefix}_SERVICE_HOST");
    let host = src
        .env(&host_var)
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| format!("environment variable {host_var} is not set"))?;
    let ip: IpAddr = host
        .trim()
        .parse()
        .map_err(|_| format!("{host_var}={host:?} is not an IP address"))?;
    let port_var = format!("{prefix}_SERVICE_PORT");
    let port = match src.env(&port_var).filter(|p| !p.trim().is_empty()) {
        Some(p) => p
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port_var}={p:?} is not a port"))?,
        None => 53,
    };
    Ok(if port == 53 {
        ip.to_string()
    } else {
        SocketAddr::new(ip, port).to_string()
    })
}

/// Removes the whitespace-separated `word` from a line, keeping its indentation and newline.
fn drop_word(line: &str, word: &str) -> String {
    if !line.split_whitespace().any(|w| w == word) {
        return line.to_string();
    }
    let indent: String = line
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect();
    let kept: Vec<&str> = line.split_whitespace().filter(|w| *w != word).collect();
    let nl = if line.ends_with('\n') { "\n" } else { "" };
    if kept.is_empty() {
        nl.to_string()
    } else {
        format!("{indent}{}{nl}", kept.join(" "))
    }
}

/// `__PILLAR__LOCAL__DNS__` as a word of its own → every local IP; glued to more text (an
/// address like `__PILLAR__LOCAL__DNS__:8080`) → the first (see the module doc).
fn replace_local(line: &str, ips: &[IpAddr]) -> String {
    let all = ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find(LOCAL_DNS) {
        let (head, tail) = rest.split_at(i);
        let after = tail.get(LOCAL_DNS.len()..).unwrap_or("");
        let alone_before = head.chars().last().is_none_or(char::is_whitespace);
        let alone_after = after.chars().next().is_none_or(char::is_whitespace);
        out.push_str(head);
        if alone_before && alone_after {
            out.push_str(&all);
        } else {
            match ips.first() {
                Some(IpAddr::V6(v6)) if after.starts_with(':') => out.push_str(&format!("[{v6}]")),
                Some(ip) => out.push_str(&ip.to_string()),
                None => {}
            }
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) mod tests;
