//! Any Corefile text: parsing must not panic; what parses must print as TOML that parses back to the
//! same model (the Corefile → model → TOML → model identity).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodedns::config::{corefile, toml_file};

#[path = "common/fixed.rs"]
mod fixed;
use fixed::Fixed;

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
