//! The cache file's I/O (`--cache-file`): load at start, merge an older instance's final write,
//! write periodically and at stop. The format and every check are in [`crate::persist`].
//!
//! Start: the listeners are bound first (answers never wait for the file), then the file is read in
//! a blocking task and every entry re-validated under the current zones. In a surge rollout the new
//! instance starts *before* the old one writes at exit, so for its first minute nodedns watches the
//! file and merges in, at each change, what it does not have yet. Writes are atomic (a temp file beside it,
//! fsync, rename), so a reader never sees half a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::persist;
use crate::server::Ctx;
use crate::wire;

/// How long a new instance watches the file for an older instance's final write.
const MERGE_WINDOW: Duration = Duration::from_secs(60);
const MERGE_POLL: Duration = Duration::from_secs(1);

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads `path` into the cache; `only_missing` keeps entries already present. A file longer than
/// `max_len` ([`persist::max_file_len`] of the cache's limits) is not read. Returns how many
/// entries were stored, or the one-line reason the file was ignored.
fn load(ctx: &Ctx, path: &Path, only_missing: bool, max_len: u64) -> Result<usize, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    f.take(max_len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max_len {
        return Err(format!(
            "the cache file is longer than this cache's budget can fill ({max_len} bytes; \
             written under larger --cache-bytes?)"
        ));
    }
    let upstreams = ctx.upstreams();
    let entries = persist::decode(&bytes, upstreams.fingerprint()).map_err(|e| e.to_string())?;
    let (wall, mono) = (SystemTime::now(), Instant::now());
    let cache = &ctx.handler.cache;
    let mut stored = 0;
    for s in &entries {
        let Some((q, r)) = persist::revive(s, |name| upstreams.policy_for(name), wall, mono) else {
            continue;
        };
        let Ok(view) = wire::scan_query(&q) else {
            continue;
        };
        let ok = if only_missing {
            cache.insert_if_absent(&view.key, r, mono)
        } else {
            cache.insert(&view.key, r, mono)
        };
        stored += usize::from(ok);
    }
    Ok(stored)
}

/// Writes the cache to `path` atomically.
fn save(ctx: &Ctx, path: &Path) -> std::io::Result<usize> {
    use std::io::Write;
    let entries = ctx.handler.cache.snapshot();
    let bytes = persist::encode(
        entries.iter(),
        ctx.upstreams().fingerprint(),
        SystemTime::now(),
        Instant::now(),
    );
    // Unique per write, not only per process: in a surge rollout two pods share the directory
    // and, each in its own PID namespace, may both be PID 1. `create_new`: never another's file.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let done = f
        .write_all(&bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        // A full disk must not leave a temp file per interval behind.
        let _ = std::fs::remove_file(&tmp);
    }
    done.map(|()| entries.len())
}

/// Loads, merges, and writes every `interval` and once more when `stop` flips. Runs on the control
/// runtime; the file work goes to blocking tasks.
pub async fn run(
    ctx: Arc<Ctx>,
    path: PathBuf,
    interval: Duration,
    max_len: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = modified(&path);
    let started = Instant::now();
    if seen.is_some() {
        let (c, p) = (ctx.clone(), path.clone());
        match tokio::task::spawn_blocking(move || load(&c, &p, false, max_len)).await {
            Ok(Ok(n)) => {
                tracing::info!(path = %path.display(), entries = n, "warm start from the cache file")
            }
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cache file ignored; cold start")
            }
            Err(_) => {}
        }
    }
    let mut next_save = tokio::time::Instant::now() + interval;
    loop {
        let watching = started.elapsed() < MERGE_WINDOW;
        let wake = if watching {
            (tokio::time::Instant::now() + MERGE_POLL).min(next_save)
        } else {
            next_save
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => break,
        }
        let now_seen = modified(&path);
        if watching && now_seen != seen {
            // Every change in the window, not only the first: the previous instance may write
            // periodically before its final write at exit, and the final one has the most.
            seen = now_seen;
            let (c, p) = (ctx.clone(), path.clone());
            if let Ok(Ok(n)) =
                tokio::task::spawn_blocking(move || load(&c, &p, true, max_len)).await
            {
                tracing::info!(path = %path.display(), entries = n, "merged the previous instance's cache file");
            }
        }
        if tokio::time::Instant::now() >= next_save {
            next_save = tokio::time::Instant::now() + interval;
            write(&ctx, &path).await;
            // Our own write is not the previous instance's.
            seen = modified(&path);
        }
    }
    write(&ctx, &path).await;
}

async fn write(ctx: &Arc<Ctx>, path: &Path) {
    let (c, p) = (ctx.clone(), path.to_path_buf());
    match tokio::task::spawn_blocking(move || save(&c, &p)).await {
        Ok(Ok(n)) => tracing::debug!(path = %path.display(), entries = n, "cache file written"),
        Ok(Err(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the cache file")
        }
        Err(_) => {}
    }
}
