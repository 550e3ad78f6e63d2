//! A CoreDNS Corefile, as the NodeLocal DNSCache addon writes it, read into a [`Model`].
//!
//! Only what a node-local forwarding cache means is accepted: server blocks of plain DNS zones
//! with `cache`, `forward`, `bind`, `health`, `ready`, `prometheus`, `reload`, `loop`, `errors` and
//! `log`. Everything else is an error with its `file:line` rather than being ignored, because a
//! silently dropped plugin is a behaviour change nobody asked for.
//!
//! Deliberate differences from CoreDNS:
//! - an unset `{$VAR}` is an error naming the variable (CoreDNS substitutes an empty string,
//!   which turns a missing variable into a confusing error far away, or none at all);
//! - a `{` or `}` glued to a word (`cache{`) is an error instead of part of the word;
//! - `forward` without `force_tcp`/`prefer_udp` means [`Transport::PreferUdp`]: CoreDNS follows
//!   the client's transport, nodedns always starts on UDP and retries over TCP on a truncated
//!   reply, which answers every client CoreDNS answers;
//! - nodedns serves every zone on every listener, so all blocks must share one port and one set
//!   of `bind` addresses, and there is one `health`/`ready`/`prometheus` endpoint per file;
//! - a block's cache TTL floor is clamped to its cap, which is what CoreDNS's arithmetic does
//!   (the cap is applied last), written down once here instead of at every lookup.
//!
//! nodedns's own additions (CoreDNS has no such option): `policy fastest` in `forward`, and
//! `file PATH [INTERVAL]` in `cache`, the warm-restart cache file (`--cache-file`). One cache
//! serves every zone, so blocks that name a file must name the same one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::common::{self, MAX_UPSTREAMS};
use super::model::{
    CacheFile, CachePolicy, ForwardOptions, Health, LoopDetect, Model, ModelError, Origin, Policy,
    Prefetch, ServeStale, Sources, Transport, Zone, normalize_zone,
};

/// Deepest `{}` nesting accepted (server block, plugin block, and one spare), so a hostile file
/// cannot exhaust the stack.
const MAX_DEPTH: usize = 3;

/// Parses a Corefile. `file` names it in errors; resolv.conf files named by `forward` are read
/// through `src` and listed in [`Model::inputs`] (the Corefile itself is the caller's to add,
/// since it was handed over as text).
pub fn parse(text: &str, file: &str, src: &dyn Sources) -> Result<Model, ModelError> {
    let tokens = lex(text, file, src)?;
    let blocks = tree(&tokens, file)?;
    Builder::new(file, src).build(&blocks)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Word,
    Open,
    Close,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    text: String,
    line: usize,
}

fn err(file: &str, line: usize, reason: impl Into<String>) -> ModelError {
    ModelError::new(Origin::at(file, line), reason)
}

/// Splits the text into words, quoted strings and braces, with environment variables
/// substituted. A quoted string is always a word, even `"{"`.
fn lex(text: &str, file: &str, src: &dyn Sources) -> Result<Vec<Token>, ModelError> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == '\n' {
            line += 1;
            chars.next();
            continue;
        }
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '#' {
            while chars.peek().is_some_and(|&c| c != '\n') {
                chars.next();
            }
            continue;
        }
        let start = line;
        if c == '"' {
            chars.next();
            let mut s = String::new();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' if matches!(chars.peek(), Some('"' | '\\')) => {
                        if let Some(n) = chars.next() {
                            s.push(n);
                        }
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\n' => {
                        line += 1;
                        s.push('\n');
                    }
                    c => s.push(c),
                }
            }
            if !closed {
                return Err(err(file, start, "unterminated quoted string"));
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(err(
                    file,
                    start,
                    "text glued to a quoted string (put a space after the closing quote)",
                ));
            }
            let text = substitute(&s, true, file, start, src)?;
            out.push(Token {
                kind: Kind::Word,
                text,
                line: start,
            });
            continue;
        }
        let mut w = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            if c == '"' {
                return Err(err(
                    file,
                    line,
                    format!("quote inside the word {w:?} (quote whole words only)"),
                ));
            }
            w.push(c);
            chars.next();
        }
        let (kind, text) = match w.as_str() {
            "{" => (Kind::Open, w),
            "}" => (Kind::Close, w),
            _ => (Kind::Word, substitute(&w, false, file, line, src)?),
        };
        out.push(Token { kind, text, line });
    }
    Ok(out)
}

/// Replaces `{$VAR}` and `{%VAR%}` through `src.env`. Outside quotes (`braces_ok` false) any other
/// brace is an error: CoreDNS needs spaces around `{` and `}`, and `cache{` read as a word would
/// silently become an unknown plugin or a zone.
fn substitute(
    s: &str,
    braces_ok: bool,
    file: &str,
    line: usize,
    src: &dyn Sources,
) -> Result<String, ModelError> {
    let mut out = String::new();
    let mut rest = s;
    loop {
        let Some(i) = rest.find(['{', '}']) else {
            out.push_str(rest);
            return Ok(out);
        };
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let closer = if tail.starts_with("{$") {
            Some("}")
        } else if tail.starts_with("{%") {
            Some("%}")
        } else {
            None
        };
        match closer {
            Some(closer) => {
                let body = tail.get(2..).unwrap_or("");
                let Some(end) = body.find(closer) else {
                    return Err(err(
                        file,
                        line,
                        format!("unclosed environment variable in {s:?}"),
                    ));
                };
                let (name, after) = body.split_at(end);
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(err(
                        file,
                        line,
                        format!("bad environment variable name {name:?} in {s:?}"),
                    ));
                }
                let Some(value) = src.env(name) else {
                    return Err(err(
                        file,
                        line,
                        format!("environment variable {name} is not set"),
                    ));
                };
                out.push_str(&value);
                rest = after.get(closer.len()..).unwrap_or("");
            }
            None if braces_ok => {
                let (b, after) = tail.split_at(1);
                out.push_str(b);
                rest = after;
            }
            None => {
                return Err(err(
                    file,
                    line,
                    format!("brace glued to a word in {s:?} (put spaces around {{ and }})"),
                ));
            }
        }
    }
}

/// A plugin line and its optional block.
#[derive(Debug)]
struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Option<Vec<Directive>>,
}

#[derive(Debug)]
struct Block {
    keys: Vec<(String, usize)>,
    directives: Vec<Directive>,
}

/// Groups tokens into server blocks and directives: a directive is the words on one line, plus a
/// block when its line ends with `{`.
fn tree(tokens: &[Token], file: &str) -> Result<Vec<Block>, ModelError> {
    let mut blocks = Vec::new();
    let mut i = 0;
    while let Some(t) = tokens.get(i) {
        match t.kind {
            Kind::Close => return Err(err(file, t.line, "unbalanced }: no block is open")),
            Kind::Open => return Err(err(file, t.line, "{ without server block keys")),
            Kind::Word => {}
        }
        let line = t.line;
        let mut keys = Vec::new();
        while let Some(k) = tokens.get(i) {
            if k.line != line || k.kind != Kind::Word {
                break;
            }
            keys.push((k.text.clone(), k.line));
            i += 1;
        }
        let first = keys.first().map(|(k, _)| k.as_str()).unwrap_or("");
        if first == "import" {
            return Err(err(file, line, "import is not supported"));
        }
        if first.starts_with('(') {
            return Err(err(
                file,
                line,
                format!("snippets are not supported ({first})"),
            ));
        }
        match tokens.get(i) {
            Some(o) if o.kind == Kind::Open && o.line == line => i += 1,
            _ => {
                let words: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
                return Err(err(
                    file,
                    line,
                    format!(
                        "\"{}\" is not a server block: expected {{ at the end of the line \
                         (directives belong inside a block)",
                        words.join(" ")
                    ),
                ));
            }
        }
        let (directives, next) = directives(tokens, i, line, 1, file)?;
        i = next;
        blocks.push(Block { keys, directives });
    }
    Ok(blocks)
}

/// Reads directives from `i` up to the `}` closing the block opened on `open_line`; returns them
/// and the index after that `}`.
fn directives(
    tokens: &[Token],
    mut i: usize,
    open_line: usize,
    depth: usize,
    file: &str,
) -> Result<(Vec<Directive>, usize), ModelError> {
    let mut out = Vec::new();
    loop {
        let Some(t) = tokens.get(i) else {
            return Err(err(
                file,
                open_line,
                "unbalanced {: the block opened here is never closed",
            ));
        };
        match t.kind {
            Kind::Close => {
                if let Some(n) = tokens.get(i + 1)
                    && n.line == t.line
                    && n.kind == Kind::Word
                {
                    return Err(err(
                        file,
                        t.line,
                        format!("unexpected {:?} after }}", n.text),
                    ));
                }
                return Ok((out, i + 1));
            }
            Kind::Open => return Err(err(file, t.line, "unexpected {")),
            Kind::Word => {}
        }
        let line = t.line;
        let name = t.text.clone();
        i += 1;
        let mut args = Vec::new();
        let mut block = None;
        while let Some(a) = tokens.get(i) {
            if a.line != line {
                break;
            }
            match a.kind {
                Kind::Word => {
                    args.push(a.text.clone());
                    i += 1;
                }
                Kind::Close => break,
                Kind::Open => {
                    if depth >= MAX_DEPTH {
                        return Err(err(file, a.line, "blocks nested too deeply"));
                    }
                    let (inner, next) = directives(tokens, i + 1, a.line, depth + 1, file)?;
                    i = next;
                    block = Some(inner);
                    break;
                }
            }
        }
        out.push(Directive {
            name,
            args,
            line,
            block,
        });
    }
}

/// A server block's `forward`.
struct Forward {
    servers: Vec<SocketAddr>,
    transport: Transport,
    policy: Policy,
    options: ForwardOptions,
    except: Vec<(String, usize)>,
}

/// One server block, read.
struct Server {
    zones: Vec<(String, usize)>,
    port: u16,
    key_line: usize,
    bind: Option<(Vec<IpAddr>, usize)>,
    cache: CachePolicy,
    forward: Forward,
}

/// The file-wide settings and what was read, while blocks are read one by one.
struct Builder<'a> {
    file: &'a str,
    src: &'a dyn Sources,
    port_given: bool,
    health: Option<(Health, usize)>,
    ready: Option<(SocketAddr, usize)>,
    metrics: Option<(SocketAddr, usize)>,
    reload: Option<(Duration, usize)>,
    log_queries: bool,
    loop_detect: LoopDetect,
    /// `cache { file PATH [INTERVAL] }` and its line.
    cache_file: Option<(CacheFile, usize)>,
    inputs: Vec<PathBuf>,
}

impl<'a> Builder<'a> {
    fn new(file: &'a str, src: &'a dyn Sources) -> Self {
        Builder {
            file,
            src,
            port_given: false,
            health: None,
            ready: None,
            metrics: None,
            reload: None,
            log_queries: false,
            loop_detect: LoopDetect::Off,
            cache_file: None,
            inputs: Vec::new(),
        }
    }

    fn err(&self, line: usize, reason: impl Into<String>) -> ModelError {
        err(self.file, line, reason)
    }

    fn build(mut self, blocks: &[Block]) -> Result<Model, ModelError> {
        let mut servers = Vec::new();
        for b in blocks {
            servers.push(self.server(b)?);
        }
        let Some(first) = servers.first() else {
            return Err(self.err(1, "no server blocks"));
        };
        let port = first.port;
        let first_bind = servers.iter().find_map(|s| s.bind.as_ref());
        for s in &servers {
            if s.port != port {
                return Err(self.err(
                    s.key_line,
                    format!(
                        "port {} differs from port {port} of the block at line {} (nodedns serves \
                         every zone on every listener)",
                        s.port, first.key_line
                    ),
                ));
            }
            if let Some((ips, bind_line)) = first_bind {
                let set = |v: &[IpAddr]| {
                    let mut v = v.to_vec();
                    v.sort();
                    v.dedup();
                    v
                };
                match &s.bind {
                    Some((mine, line)) if set(mine) != set(ips) => {
                        return Err(self.err(
                            *line,
                            format!(
                                "bind addresses differ from those at line {bind_line} (nodedns \
                                 serves every zone on every listener)"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        return Err(self.err(
                            s.key_line,
                            format!(
                                "this block has no bind but the one at line {bind_line} has \
                                 (nodedns serves every zone on every listener)"
                            ),
                        ));
                    }
                }
            }
        }
        let mut listen: Vec<SocketAddr> = Vec::new();
        if let Some((ips, _)) = first_bind {
            for ip in ips {
                let a = SocketAddr::new(*ip, port);
                if !listen.contains(&a) {
                    listen.push(a);
                }
            }
        }

        let mut zones: Vec<Zone> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for s in servers {
            let f = &s.forward;
            let mut add = |name: &str, line: usize, servers: &[SocketAddr]| {
                if let Some(prev) = seen.get(name) {
                    return Err(err(
                        self.file,
                        line,
                        format!("zone {name} is defined twice (lines {prev} and {line})"),
                    ));
                }
                seen.insert(name.to_string(), line);
                zones.push(Zone {
                    name: name.to_string(),
                    servers: servers.to_vec(),
                    transport: f.transport,
                    policy: f.policy,
                    forward: f.options,
                    cache: s.cache,
                    origin: Origin::at(self.file, line),
                });
                Ok(())
            };
            for (name, line) in &s.zones {
                add(name, *line, &f.servers)?;
            }
            for (name, line) in &f.except {
                add(name, *line, &[])?;
            }
        }
        Ok(Model {
            port: if listen.is_empty() && self.port_given {
                Some(port)
            } else {
                None
            },
            listen,
            zones,
            health: self.health.map(|h| h.0),
            ready: self.ready.map(|r| r.0),
            metrics: self.metrics.map(|m| m.0),
            reload: self.reload.map(|r| r.0),
            log_queries: self.log_queries,
            loop_detect: self.loop_detect,
            cache_file: self.cache_file.map(|c| c.0),
            inputs: self.inputs,
        })
    }

    /// `zone[:port]`, optionally `dns://`.
    fn key(&mut self, raw: &str, line: usize) -> Result<(String, u16), ModelError> {
        let k = raw.trim_end_matches(',');
        let k = match k.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("dns") => rest,
            Some((scheme, _)) => {
                return Err(self.err(
                    line,
                    format!(
                        "server block {raw}: {scheme}:// is not supported (nodedns serves plain DNS)"
                    ),
                ));
            }
            None => k,
        };
        let (host, port) = match k.rsplit_once(':') {
            Some((host, port)) => {
                let p = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        self.err(line, format!("server block {raw}: bad port {port:?}"))
                    })?;
                self.port_given = true;
                (host, p)
            }
            None => (k, 53),
        };
        let zone = if host.is_empty() {
            ".".to_string()
        } else {
            normalize_zone(host).map_err(|e| self.err(line, format!("server block {raw}: {e}")))?
        };
        Ok((zone, port))
    }

    fn server(&mut self, b: &Block) -> Result<Server, ModelError> {
        let mut zones: Vec<(String, usize)> = Vec::new();
        let mut port = None;
        let key_line = b.keys.first().map_or(1, |k| k.1);
        for (raw, line) in &b.keys {
            if raw == "," {
                continue;
            }
            let (zone, p) = self.key(raw, *line)?;
            if port.is_some_and(|q| q != p) {
                return Err(self.err(*line, "keys of one server block must share a port"));
            }
            port = Some(p);
            if !zones.iter().any(|(z, _)| *z == zone) {
                zones.push((zone, *line));
            }
        }
        let names: Vec<String> = zones.iter().map(|z| z.0.clone()).collect();
        let mut cache: Option<(CachePolicy, usize)> = None;
        let mut forward: Option<(Forward, usize)> = None;
        let mut bind: Option<(Vec<IpAddr>, usize)> = None;
        for d in &b.directives {
            let line = d.line;
            let no_block = |s: &Self| match d.block {
                Some(_) => Err(s.err(line, format!("{} takes no block", d.name))),
                None => Ok(()),
            };
            let dup = |s: &Self, prev: Option<usize>| match prev {
                Some(p) => Err(s.err(
                    line,
                    format!("{} given twice in one block (lines {p} and {line})", d.name),
                )),
                None => Ok(()),
            };
            match d.name.as_str() {
                "cache" => {
                    dup(self, cache.as_ref().map(|c| c.1))?;
                    cache = Some((self.cache(d, &names)?, line));
                    for o in d.block.iter().flatten().filter(|o| o.name == "file") {
                        let f = self.cache_file(o)?;
                        self.cache_file = Some(self.once_file(f, o.line)?);
                    }
                }
                "forward" => {
                    dup(self, forward.as_ref().map(|f| f.1))?;
                    forward = Some((self.forward(d, &names)?, line));
                }
                "bind" => {
                    no_block(self)?;
                    dup(self, bind.as_ref().map(|b| b.1))?;
                    bind = Some((self.bind(d)?, line));
                }
                "health" => self.health(d)?,
                "ready" => {
                    no_block(self)?;
                    let a = self.addr(d, ":8181")?;
                    self.ready = Some(self.once("ready", self.ready, a, line)?);
                }
                "prometheus" => {
                    no_block(self)?;
                    let a = self.addr(d, ":9153")?;
                    self.metrics = Some(self.once("prometheus", self.metrics, a, line)?);
                }
                "reload" => {
                    no_block(self)?;
                    let r = self.reload_interval(d)?;
                    self.reload = Some(self.once("reload", self.reload, r, line)?);
                }
                "loop" => {
                    no_block(self)?;
                    // CoreDNS's `loop` takes nothing (and always exits on a loop); nodedns's
                    // default keeps the other zones serving, `loop fatal` exits as CoreDNS.
                    let mode = match d.args.as_slice() {
                        [] => LoopDetect::On,
                        [a] if a == "fatal" => LoopDetect::Fatal,
                        _ => {
                            return Err(self.err(line, "loop takes no argument or `fatal`"));
                        }
                    };
                    // Several blocks: the strictest wins (the check covers every zone).
                    if mode == LoopDetect::Fatal || self.loop_detect == LoopDetect::Off {
                        self.loop_detect = mode;
                    }
                }
                "errors" => {
                    if !d.args.is_empty() {
                        return Err(self.err(line, "errors takes no arguments"));
                    }
                    for o in d.block.iter().flatten() {
                        if o.name != "consolidate" {
                            return Err(
                                self.err(o.line, format!("unknown errors option {}", o.name))
                            );
                        }
                    }
                }
                "log" => self.log_queries = true,
                "import" => return Err(self.err(line, "import is not supported")),
                other => return Err(self.err(line, format!("unknown plugin {other}"))),
            }
        }
        let Some((forward, _)) = forward else {
            let list: Vec<&str> = names.iter().map(String::as_str).collect();
            return Err(self.err(
                key_line,
                format!(
                    "zone {} has no forward (nodedns only forwards)",
                    list.join(" ")
                ),
            ));
        };
        Ok(Server {
            zones,
            port: port.unwrap_or(53),
            key_line,
            bind,
            cache: cache.map_or(CachePolicy::OFF, |c| c.0),
            forward,
        })
    }

    /// A file-wide setting given in several blocks (the addon repeats `prometheus :9253` in each):
    /// fine when equal, an error when not, as nodedns has one of each.
    fn once<T: PartialEq + Copy + std::fmt::Debug>(
        &self,
        name: &str,
        prev: Option<(T, usize)>,
        v: T,
        line: usize,
    ) -> Result<(T, usize), ModelError> {
        match prev {
            Some((p, l)) if p != v => Err(self.err(
                line,
                format!("{name} {v:?} differs from {p:?} at line {l} (nodedns has one)"),
            )),
            Some(p) => Ok(p),
            None => Ok((v, line)),
        }
    }

    /// `file PATH [INTERVAL]` inside `cache` (nodedns's own: CoreDNS's cache has no file).
    fn cache_file(&self, o: &Directive) -> Result<CacheFile, ModelError> {
        let line = o.line;
        let (path, interval) = match o.args.as_slice() {
            [p] => (p, None),
            [p, i] => (p, Some(i)),
            _ => return Err(self.err(line, "cache file takes PATH [INTERVAL]")),
        };
        if path.trim().is_empty() {
            return Err(self.err(line, "cache file: the path is empty"));
        }
        if path.chars().any(char::is_control) {
            return Err(self.err(line, "cache file: control character in the path"));
        }
        let interval = interval
            .map(|i| {
                let d = self.duration(i, line, "cache file interval")?;
                if d < Duration::from_secs(1) {
                    return Err(self.err(line, "cache file interval must be at least 1s"));
                }
                Ok(d)
            })
            .transpose()?;
        Ok(CacheFile {
            path: PathBuf::from(path),
            interval,
        })
    }

    /// The cache file named in several blocks: one cache serves every zone, so they must agree.
    fn once_file(&self, f: CacheFile, line: usize) -> Result<(CacheFile, usize), ModelError> {
        match &self.cache_file {
            Some((p, l)) if *p != f => Err(self.err(
                line,
                format!(
                    "cache file {} differs from cache file {} at line {l} (nodedns has one cache \
                     for every zone)",
                    describe_file(&f),
                    describe_file(p)
                ),
            )),
            Some(p) => Ok(p.clone()),
            None => Ok((f, line)),
        }
    }

    fn addr(&self, d: &Directive, default: &str) -> Result<SocketAddr, ModelError> {
        match d.args.as_slice() {
            [] => common::listen_addr(default),
            [a] => common::listen_addr(a),
            _ => return Err(self.err(d.line, format!("{} takes at most one address", d.name))),
        }
        .map_err(|e| self.err(d.line, format!("{}: {e}", d.name)))
    }

    fn health(&mut self, d: &Directive) -> Result<(), ModelError> {
        if let Some((_, prev)) = self.health {
            return Err(self.err(
                d.line,
                format!("health given twice (lines {prev} and {})", d.line),
            ));
        }
        let addr = self.addr(d, ":8080")?;
        let mut lameduck = Duration::ZERO;
        for o in d.block.iter().flatten() {
            match (o.name.as_str(), o.args.as_slice()) {
                ("lameduck", [dur]) if o.block.is_none() => {
                    lameduck = self.duration(dur, o.line, "health lameduck")?;
                }
                ("lameduck", _) => {
                    return Err(self.err(o.line, "health lameduck takes one duration"));
                }
                (other, _) => {
                    return Err(self.err(o.line, format!("unknown health option {other}")));
                }
            }
        }
        self.health = Some((Health { addr, lameduck }, d.line));
        Ok(())
    }

    fn reload_interval(&self, d: &Directive) -> Result<Duration, ModelError> {
        let (interval, jitter) = match d.args.as_slice() {
            [] => return Ok(Duration::from_secs(30)),
            [i] => (i, None),
            [i, j] => (i, Some(j)),
            _ => return Err(self.err(d.line, "reload takes at most INTERVAL and JITTER")),
        };
        let interval = self.duration(interval, d.line, "reload interval")?;
        if interval < Duration::from_secs(2) {
            return Err(self.err(d.line, "reload interval must be at least 2s"));
        }
        if let Some(j) = jitter {
            // The jitter only spreads CoreDNS's polls; nodedns keeps the interval.
            let j = self.duration(j, d.line, "reload jitter")?;
            if j > interval {
                return Err(self.err(d.line, "reload jitter must not exceed the interval"));
            }
        }
        Ok(interval)
    }

    fn bind(&self, d: &Directive) -> Result<Vec<IpAddr>, ModelError> {
        if d.args.is_empty() {
            return Err(self.err(d.line, "bind needs at least one address"));
        }
        let mut out = Vec::new();
        for a in &d.args {
            let t = a.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = t.parse().map_err(|_| {
                self.err(
                    d.line,
                    format!("bind {a:?} is not an IP address (interface names are not supported)"),
                )
            })?;
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    fn duration(&self, s: &str, line: usize, what: &str) -> Result<Duration, ModelError> {
        common::duration(s).map_err(|e| self.err(line, format!("{what}: {e}")))
    }

    /// A cache TTL cap: seconds or a duration, above zero (CoreDNS reserves 0).
    fn ttl(&self, s: &str, line: usize, what: &str) -> Result<Duration, ModelError> {
        let d = self.duration(s, line, what)?;
        if d.is_zero() {
            return Err(self.err(line, format!("{what} must be above zero")));
        }
        Ok(d)
    }

    fn capacity(&self, s: &str, line: usize, what: &str) -> Result<usize, ModelError> {
        let n: usize = s
            .parse()
            .map_err(|_| self.err(line, format!("{what} capacity {s:?} is not a number")))?;
        if n == 0 || n > 100_000_000 {
            return Err(self.err(
                line,
                format!("{what} capacity {n} is out of range (1 to 100000000)"),
            ));
        }
        Ok(n)
    }

    /// Zone arguments of `cache`/`disable` must cover the whole block: nodedns keeps one cache
    /// policy per zone, so a policy for part of a zone cannot be expressed.
    fn covers(&self, args: &[String], block: &[String], line: usize) -> Result<(), ModelError> {
        if args.is_empty() {
            return Ok(());
        }
        let mut zs = Vec::new();
        for a in args {
            zs.push(normalize_zone(a).map_err(|e| self.err(line, e))?);
        }
        for b in block {
            if !zs.iter().any(|z| common::is_within(b, z)) {
                return Err(self.err(
                    line,
                    format!(
                        "cache for zones narrower than the server block ({}) is not supported",
                        args.join(" ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn cache(&self, d: &Directive, block: &[String]) -> Result<CachePolicy, ModelError> {
        let mut c = CachePolicy::COREDNS;
        let mut args = d.args.as_slice();
        // The first argument is the TTL when it reads as one (CoreDNS: a number), else a zone
        // (`10.in-addr.arpa`); a digit-led word without a dot is a mistyped TTL.
        if let Some((first, rest)) = args.split_first()
            && (common::duration(first).is_ok()
                || first.starts_with(|c: char| c.is_ascii_digit()) && !first.contains('.'))
        {
            let ttl = self.ttl(first, d.line, "cache TTL")?;
            c.max_ttl = ttl;
            c.max_negative_ttl = ttl;
            args = rest;
        }
        self.covers(args, block, d.line)?;
        for o in d.block.iter().flatten() {
            let line = o.line;
            if o.block.is_some() {
                return Err(self.err(line, format!("cache {} takes no block", o.name)));
            }
            let a = o.args.as_slice();
            match o.name.as_str() {
                "success" | "denial" => {
                    let what = format!("cache {}", o.name);
                    let (cap, ttl, min) = match a {
                        [cap] => (cap, None, None),
                        [cap, ttl] => (cap, Some(ttl), None),
                        [cap, ttl, min] => (cap, Some(ttl), Some(min)),
                        _ => {
                            return Err(
                                self.err(line, format!("{what} takes CAPACITY [TTL [MINTTL]]"))
                            );
                        }
                    };
                    let cap = self.capacity(cap, line, &what)?;
                    let ttl = ttl
                        .map(|t| self.ttl(t, line, &format!("{what} TTL")))
                        .transpose()?;
                    let min = min
                        .map(|m| self.duration(m, line, &format!("{what} MINTTL")))
                        .transpose()?;
                    let (c_cap, c_ttl, c_min) = if o.name == "success" {
                        (&mut c.success_capacity, &mut c.max_ttl, &mut c.min_ttl)
                    } else {
                        (
                            &mut c.denial_capacity,
                            &mut c.max_negative_ttl,
                            &mut c.min_negative_ttl,
                        )
                    };
                    *c_cap = cap;
                    if let Some(t) = ttl {
                        *c_ttl = t;
                    }
                    if let Some(m) = min {
                        *c_min = m;
                    }
                }
                "prefetch" => {
                    let (amount, dur, pct) = match a {
                        [n] => (n, None, None),
                        [n, d] => (n, Some(d), None),
                        [n, d, p] => (n, Some(d), Some(p)),
                        _ => {
                            return Err(
                                self.err(line, "cache prefetch takes AMOUNT [DURATION [PCT%]]")
                            );
                        }
                    };
                    let amount: u32 = amount.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        self.err(
                            line,
                            format!("cache prefetch amount {amount:?} is not a positive number"),
                        )
                    })?;
                    let duration = match dur {
                        Some(d) => self.ttl(d, line, "cache prefetch duration")?,
                        None => Duration::from_secs(60),
                    };
                    let percent = match pct {
                        Some(p) => p
                            .strip_suffix('%')
                            .unwrap_or(p)
                            .parse::<u8>()
                            .ok()
                            .filter(|p| (10..=90).contains(p))
                            .ok_or_else(|| {
                                self.err(
                                    line,
                                    format!("cache prefetch percentage {p:?} is not 10% to 90%"),
                                )
                            })?,
                        None => 10,
                    };
                    c.prefetch = Some(Prefetch {
                        amount,
                        duration,
                        percent,
                    });
                }
                "serve_stale" => {
                    let (dur, mode) = match a {
                        [] => (None, None),
                        [d] => (Some(d), None),
                        [d, m] => (Some(d), Some(m)),
                        _ => {
                            return Err(self.err(
                                line,
                                "cache serve_stale takes [DURATION] [immediate|verify]",
                            ));
                        }
                    };
                    let duration = match dur {
                        Some(d) => self.duration(d, line, "cache serve_stale duration")?,
                        None => Duration::from_secs(3600),
                    };
                    let verify = match mode.map(String::as_str) {
                        None | Some("immediate") => false,
                        Some("verify") => true,
                        Some(m) => {
                            return Err(self.err(
                                line,
                                format!("cache serve_stale mode {m:?} is not immediate or verify"),
                            ));
                        }
                    };
                    c.serve_stale = Some(ServeStale { duration, verify });
                }
                "servfail" => {
                    let [d] = a else {
                        return Err(self.err(line, "cache servfail takes one duration"));
                    };
                    let d = self.duration(d, line, "cache servfail")?;
                    if d > Duration::from_secs(300) {
                        return Err(self.err(line, "cache servfail is at most 5m"));
                    }
                    c.servfail_ttl = d;
                }
                "disable" => {
                    let Some((what, zones)) = a.split_first() else {
                        return Err(self.err(line, "cache disable takes success|denial [ZONES]"));
                    };
                    self.covers(zones, block, line)?;
                    match what.as_str() {
                        "success" => c.success = false,
                        "denial" => c.denial = false,
                        w => {
                            return Err(self
                                .err(line, format!("cache disable {w:?}: use success or denial")));
                        }
                    }
                }
                // Read by `server` into the file-wide setting (see `cache_file`).
                "file" => {}
                "keepttl" => {
                    return Err(self.err(line, "cache keepttl is not supported"));
                }
                other => return Err(self.err(line, format!("unknown cache option {other}"))),
            }
        }
        // CoreDNS applies the floor, then the cap: a floor above the cap is the cap.
        c.min_ttl = c.min_ttl.min(c.max_ttl);
        c.min_negative_ttl = c.min_negative_ttl.min(c.max_negative_ttl);
        Ok(c)
    }

    fn forward(&mut self, d: &Directive, block: &[String]) -> Result<Forward, ModelError> {
        let line = d.line;
        let Some((from, to)) = d.args.split_first().filter(|(_, to)| !to.is_empty()) else {
            return Err(self.err(line, "forward needs FROM and at least one server"));
        };
        let from_zone = normalize_zone(from.strip_prefix("dns://").unwrap_or(from))
            .map_err(|e| self.err(line, format!("forward: {e}")))?;
        let single = match block {
            [z] => Some(z.as_str()),
            _ => None,
        };
        if from_zone != "." && Some(from_zone.as_str()) != single {
            return Err(self.err(
                line,
                format!("forward {from}: FROM must be . or the server block's zone"),
            ));
        }
        let mut servers: Vec<SocketAddr> = Vec::new();
        for t in to {
            let found = if t.starts_with('/') || t.starts_with('.') {
                common::read_resolv_conf(
                    t,
                    &Origin::at(self.file, line),
                    self.src,
                    &mut self.inputs,
                )?
            } else {
                vec![common::server(t).map_err(|e| self.err(line, format!("forward: {e}")))?]
            };
            for s in found {
                if !servers.contains(&s) {
                    servers.push(s);
                }
            }
        }
        if servers.len() > MAX_UPSTREAMS {
            return Err(self.err(
                line,
                format!(
                    "forward has {} upstreams, at most {MAX_UPSTREAMS}",
                    servers.len()
                ),
            ));
        }
        let mut f = Forward {
            servers,
            transport: Transport::PreferUdp,
            policy: Policy::Random,
            options: ForwardOptions::default(),
            except: Vec::new(),
        };
        let mut force_tcp = false;
        for o in d.block.iter().flatten() {
            let ol = o.line;
            if o.block.is_some() {
                return Err(self.err(ol, format!("forward {} takes no block", o.name)));
            }
            let a = o.args.as_slice();
            let one = |what: &str| match a {
                [v] => Ok(v.as_str()),
                _ => Err(self.err(ol, format!("forward {what} takes one value"))),
            };
            match o.name.as_str() {
                "force_tcp" | "prefer_udp" if !a.is_empty() => {
                    return Err(self.err(ol, format!("forward {} takes no arguments", o.name)));
                }
                "force_tcp" => force_tcp = true,
                "prefer_udp" => {}
                "policy" => {
                    f.policy = match one("policy")? {
                        "random" => Policy::Random,
                        "round_robin" => Policy::RoundRobin,
                        "sequential" => Policy::Sequential,
                        // nodedns's own: CoreDNS has no such policy (see the README).
                        "fastest" => Policy::Fastest,
                        p => {
                            return Err(self.err(
                                ol,
                                format!(
                                    "forward policy {p:?}: use random, round_robin, sequential or fastest"
                                ),
                            ));
                        }
                    }
                }
                "max_fails" => {
                    let v = one("max_fails")?;
                    f.options.max_fails = v.parse().map_err(|_| {
                        self.err(ol, format!("forward max_fails {v:?} is not a number"))
                    })?;
                }
                "health_check" => {
                    let Some((dur, rest)) = a.split_first() else {
                        return Err(self.err(
                            ol,
                            "forward health_check takes DURATION [no_rec] [domain NAME]",
                        ));
                    };
                    f.options.health_check = self.ttl(dur, ol, "forward health_check")?;
                    // no_rec and domain change the probe, not the schedule: accepted and
                    // checked, nodedns probes with its own query.
                    let mut rest = rest.iter();
                    while let Some(w) = rest.next() {
                        match w.as_str() {
                            "no_rec" => {}
                            "domain" => {
                                let Some(n) = rest.next() else {
                                    return Err(
                                        self.err(ol, "forward health_check domain needs a name")
                                    );
                                };
                                normalize_zone(n).map_err(|e| self.err(ol, e))?;
                            }
                            w => {
                                return Err(
                                    self.err(ol, format!("forward health_check: unexpected {w:?}"))
                                );
                            }
                        }
                    }
                }
                "expire" => {
                    f.options.expire = self.ttl(one("expire")?, ol, "forward expire")?;
                }
                "max_concurrent" => {
                    let v = one("max_concurrent")?;
                    let n: usize = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        self.err(
                            ol,
                            format!("forward max_concurrent {v:?} is not a positive number"),
                        )
                    })?;
                    f.options.max_concurrent = Some(n);
                }
                "except" => {
                    if a.is_empty() {
                        return Err(self.err(ol, "forward except needs at least one name"));
                    }
                    for n in a {
                        let z = normalize_zone(n).map_err(|e| self.err(ol, e))?;
                        if !block.iter().any(|b| common::is_within(&z, b)) || block.contains(&z) {
                            return Err(self.err(
                                ol,
                                format!(
                                    "forward except {n}: not a name below the server block's zone"
                                ),
                            ));
                        }
                        if !f.except.iter().any(|(e, _)| *e == z) {
                            f.except.push((z, ol));
                        }
                    }
                }
                other => {
                    return Err(self.err(ol, format!("forward option {other} is not supported")));
                }
            }
        }
        // force_tcp wins over prefer_udp (CoreDNS); without either, PreferUdp (module doc).
        if force_tcp {
            f.transport = Transport::Tcp;
        }
        Ok(f)
    }
}

/// `PATH` or `PATH INTERVAL`, for an error message.
fn describe_file(f: &CacheFile) -> String {
    match f.interval {
        Some(i) => format!("{} {}", f.path.display(), common::format_duration(i)),
        None => f.path.display().to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
