//! Environment and files for the config fuzzers: every variable and file exists, with fixed
//! content; loopback is the only local address.

use std::path::Path;

use nodedns::config::model::Sources;

pub struct Fixed;

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
