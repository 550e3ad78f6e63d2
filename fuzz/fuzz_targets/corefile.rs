//! Any Corefile text: parsing must not panic; what parses must print as TOML that parses back to the
//! same model (the Corefile → model → TOML → model identity).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nodedns::config::model::Sources;
use nodedns::config::{corefile, toml_file};

/// Environment and files for the fuzzer: every variable and file exists, with fixed content.
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
    if let Ok(m) = corefile::parse(text, "Corefile", &Fixed) {
        let printed = toml_file::to_toml(&m);
        let back = toml_file::parse(&printed, "printed.toml", &Fixed)
            .unwrap_or_else(|e| panic!("printed TOML does not parse: {e}\n{printed}"));
        assert_eq!(back.without_origins(), m.without_origins(), "{printed}");
    }
});
