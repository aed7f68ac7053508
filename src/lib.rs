//! consul-proxy: an L4 sidecar proxy for the Consul service mesh (Connect).
//!
//! # Layout
//!
//! ```text
//! cli, config      flags + environment -> one validated Config
//! app              lifecycle: registration -> watches -> ready -> listeners -> drain
//! consul/          typed agent client, serde mirror of its JSON, blocking-query loop
//! watchers         one blocking loop per piece of agent state -> watch channels
//! proxy_config     agent registration -> typed listeners (public, upstreams)
//! discovery        -sidecar-for: pick the single sidecar registration
//! tls/             rustls configs from roots + leaf; verifiers; peer identity
//! spiffe           SpiffeId parsing
//! authz            pure intention evaluation
//! authorizer       authz over the cached snapshot + the agent's default policy
//! endpoints        health entries -> dialable endpoints + expected identities
//! inbound          mTLS accept -> identity -> authorize -> dial app -> splice
//! outbound         local accept -> pick endpoint -> mTLS dial -> verify server -> splice
//! forward          the byte splice with half-close
//! conns            registries of live inbound and upstream connections (peer, bytes, close handle)
//! enforce          re-checks live connections when intentions, default or roots change
//! reconcile        desired listeners vs running ones: start, update, retire
//! metrics, admin   counters; /ready, /metrics, /status
//! net              local TCP/unix sockets, the accept loop
//! workers          -threads N: connections handed to N single-threaded runtimes
//! memcpy_tune      AMD CPUs: re-exec once with glibc's rep movsb threshold raised
//! notify, signal, telemetry   systemd readiness, signals, logging
//! ```
//!
//! Rules of the house: the accept loop only accepts; every slow step runs in the connection's
//! task under its own timeout; decisions are pure functions over snapshots; connections clone
//! `Arc`s, never configs; one cancellation token and one task tracker drive shutdown.

pub mod admin;
pub mod app;
pub mod authorizer;
pub mod authz;
pub mod cli;
pub mod config;
pub mod conns;
pub mod consul;
pub mod discovery;
pub mod endpoints;
pub mod enforce;
pub mod forward;
pub mod inbound;
pub mod memcpy_tune;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod outbound;
pub mod proxy_config;
pub mod reconcile;
pub mod signal;
pub mod spiffe;
pub mod telemetry;
pub mod tls;
pub mod watchers;
pub mod workers;
