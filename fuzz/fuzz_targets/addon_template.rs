//! Any template text and kube-dns ConfigMap content through the addon's rendering and the Corefile
//! parser: no panic. The input is split at the first NUL: template, then `stubDomains` JSON.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nodedns::config::addon::{self, AddonInputs};
use nodedns::config::corefile;
use nodedns::config::model::Sources;

struct Files<'a> {
    stub: &'a str,
}
impl Sources for Files<'_> {
    fn env(&self, _: &str) -> Option<String> {
        Some("10.0.0.10".into())
    }
    fn read(&self, p: &Path) -> std::io::Result<String> {
        if p.ends_with("stubDomains") {
            Ok(self.stub.to_string())
        } else if p.ends_with("upstreamNameservers") {
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            Ok("nameserver 10.0.0.2\n".into())
        }
    }
    fn is_local_ip(&self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, stub) = text.split_once('\0').unwrap_or((text, "{}"));
    let src = Files { stub };
    let Ok(kube_dns) = addon::read_kube_dns(Path::new("/etc/kube-dns"), &src) else {
        return;
    };
    let inputs = AddonInputs {
        upstream_svc: "kube-dns-upstream".into(),
        local_ips: vec![
            "169.254.20.10"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        ],
        kube_dns,
        prometheus: Some(":9253".into()),
    };
    if let Ok(rendered) = addon::render(template, "Corefile.base", &inputs, &src) {
        let _ = corefile::parse(&rendered, "Corefile.base", &src);
    }
});
