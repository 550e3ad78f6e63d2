//! Small parsers the configuration sources share (durations, addresses, resolv.conf), so the
//! Corefile, the addon's ConfigMap and the TOML file accept exactly the same spellings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::model::{ModelError, Origin, Sources};
use crate::config::{parse_duration, parse_server};

/// Most upstreams a zone may have (CoreDNS's `forward` limit).
pub(crate) const MAX_UPSTREAMS: usize = 15;

/// A duration in our forms (`30`, `500ms`, `5s`, `1m`, `1h`) or Go's compound form (`1m30s`,
/// `1h0m0s`), because Corefiles written for CoreDNS use Go durations.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let first = match parse_duration(s) {
        Ok(d) => return Ok(d),
        Err(e) => e,
    };
    // Go's compound form: number+unit segments, summed.
    let mut total = Duration::ZERO;
    let mut segments = 0;
    let mut rest = s.trim();
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (_, after_num) = rest.split_at(num_end);
        let unit_len = after_num
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after_num.len());
        if num_end == 0 || unit_len == 0 {
            return Err(first);
        }
        let (seg, tail) = rest.split_at(num_end + unit_len);
        let d = parse_duration(seg).map_err(|_| first.clone())?;
        total = total.checked_add(d).ok_or_else(|| first.clone())?;
        segments += 1;
        rest = tail;
    }
    if segments < 2 {
        return Err(first);
    }
    Ok(total)
}

/// Prints a duration so that [`duration`] reads it back unchanged (for `check-config`).
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// An upstream: `IP`, `IP:PORT`, `[v6]:PORT`, optionally with `dns://`. Encrypted transports are
/// refused by name, since nodedns speaks plain DNS only.
pub(crate) fn server(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let t = match t.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("dns") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "upstream {s:?}: {scheme}:// is not supported (nodedns forwards plain DNS only)"
            ));
        }
        None => t,
    };
    let a = parse_server(t)?;
    if a.port() == 0 {
        return Err(format!("upstream {s:?}: port 0"));
    }
    Ok(a)
}

/// A listen address: `IP:PORT`, `[v6]:PORT` or `:PORT` (all IPv4 addresses, as CoreDNS).
pub(crate) fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let bad = || format!("invalid address {s:?} (use IP:PORT, [IPv6]:PORT or :PORT)");
    if let Some(port) = t.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    t.parse().map_err(|_| bad())
}

/// The 1-based line of byte `offset` in `text` (clamped to the text).
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).map_or(0, |t| t.matches('\n').count()) + 1
}

/// The line where `needle` first occurs (0 when it does not), to place errors found after a
/// parser (serde) has forgotten where a value was.
pub(crate) fn line_of_str(text: &str, needle: &str) -> usize {
    text.find(needle).map_or(0, |i| line_of(text, i))
}

/// The nameservers of a resolv.conf-style text: `nameserver IP` lines (a `%scope` is ignored),
/// `#`/`;` comments, port 53, duplicates dropped. Other options are ignored, like the resolver
/// does; a bad address is an error, so a typo does not silently drop an upstream.
pub(crate) fn resolv_conf(text: &str, file: &str) -> Result<Vec<SocketAddr>, ModelError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(ip) = words.next() else {
            return Err(ModelError::new(
                Origin::at(file, n + 1),
                "nameserver without an address",
            ));
        };
        let ip_only = ip.split('%').next().unwrap_or(ip);
        let ip: IpAddr = ip_only.parse().map_err(|_| {
            ModelError::new(
                Origin::at(file, n + 1),
                format!("nameserver {ip:?} is not an IP address"),
            )
        })?;
        let a = SocketAddr::new(ip, 53);
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(ModelError::new(Origin::at(file, 0), "no nameserver lines"));
    }
    Ok(out)
}

/// Reads a resolv.conf through `src` and notes it as an input (the reload poller watches it).
/// `at` is where the path was written, for a file that cannot be read.
pub(crate) fn read_resolv_conf(
    path: &str,
    at: &Origin,
    src: &dyn Sources,
    inputs: &mut Vec<PathBuf>,
) -> Result<Vec<SocketAddr>, ModelError> {
    let text = src.read(Path::new(path)).map_err(|e| {
        ModelError::new(
            at.clone(),
            format!("cannot read nameservers from {path}: {e}"),
        )
    })?;
    // A file without nameservers is reported where it was named (it has no line to blame).
    let servers = resolv_conf(&text, path).map_err(|e| match e.at.line {
        0 => ModelError::new(at.clone(), format!("{path}: {}", e.reason)),
        _ => e,
    })?;
    if !inputs.iter().any(|p| p == Path::new(path)) {
        inputs.push(PathBuf::from(path));
    }
    Ok(servers)
}

/// Whether `name` is `zone` or below it (both normalised).
pub(crate) fn is_within(name: &str, zone: &str) -> bool {
    zone == "."
        || name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
}

/// A fake [`Sources`] for tests: environment and files from maps.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct FakeSources {
    pub env: std::collections::HashMap<String, String>,
    pub files: std::collections::HashMap<PathBuf, String>,
    pub local_ips: Vec<std::net::IpAddr>,
}

#[cfg(test)]
impl FakeSources {
    pub fn with_env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    pub fn with_file(mut self, p: &str, text: &str) -> Self {
        self.files.insert(PathBuf::from(p), text.into());
        self
    }
    /// An address this fake machine has (beyond loopback).
    pub fn with_local_ip(mut self, ip: &str) -> Self {
        self.local_ips.push(ip.parse().expect("test IP"));
        self
    }
}

#[cfg(test)]
impl Sources for FakeSources {
    fn env(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
    fn is_local_ip(&self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback() || self.local_ips.contains(&ip)
    }
}
