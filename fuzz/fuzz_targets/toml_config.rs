//! Any TOML text through nodedns's config loader: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodedns::config::toml_file;

#[path = "common/fixed.rs"]
mod fixed;
use fixed::Fixed;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = toml_file::parse(text, "nodedns.toml", &Fixed);
});
