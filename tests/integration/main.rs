//! End-to-end tests for nodedns: the real binary against in-process fake upstreams.
//!
//! One test binary; modules share the harness (`harness`) and the fake upstream (`fake_upstream`).

mod cli;
mod cluster;
mod config_e2e;
mod core_e2e;
mod deploy;
mod dig;
mod edge_e2e;
mod fake_selftest;
mod fake_upstream;
mod fault_e2e;
mod handover;
mod harness;
mod lifecycle;
mod loop_e2e;
mod metrics_e2e;
mod netns_e2e;
mod poison_e2e;
mod resilience;
mod robustness;
mod stale_e2e;
mod tcp_limits;
mod warm_e2e;
