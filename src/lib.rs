//! nodedns: a node-local DNS cache agent for Kubernetes.
//!
//! The crate is split by concern. `wire`, `cache` and `handler` are sans-IO (they take `now` as an
//! argument and touch no sockets); `upstream`, `server`, `netif`, `firewall` and `admin` are the edges.

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
#[allow(unsafe_code)]
mod batch;
pub mod cache;
pub mod config;
pub mod exchange;
pub mod firewall;
pub mod handler;
pub mod health;
pub mod logging;
pub mod loopdetect;
pub mod metrics;
pub mod netif;
pub mod node;
pub mod persist;
pub mod reload;
pub mod server;
pub mod upstream;
pub mod warm;
pub mod wire;
