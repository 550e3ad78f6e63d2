//! Any TOML text through nodedns's config loader: no panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nodedns::config::model::Sources;
use nodedns::config::toml_file;

struct Fixed;
impl Sources for Fixed {
    fn env(&self, _: &str) -> Option<String> {
        Some("10.0.0.10".into())
    }
    fn read(&self, _: &Path) -> std::io::Result<String> {
        Ok("nameserver 10.0.0.2\n".into())
    }
    fn is_local_ip(&self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = toml_file::parse(text, "nodedns.toml", &Fixed);
});
