//! Integration tests: one binary (one link step). Each module is one area of behaviour.

mod support;

// Flags, usage errors, help and version.
mod cli;
// Two proxies carrying traffic: -proxy-id, -sidecar-for, big and many connections.
mod mesh;
// The public listener's security decisions: certificates, identities, intentions.
mod inbound;
// The upstream side: endpoint choice, server identity checks, prepared queries.
mod outbound;
// TLS session resumption: only between consul-proxy peers, never around authorization.
mod resumption;
// Certificate and root rotation without restarts.
mod rotation;
// The agent failing: down, unreachable at start, 403, 404, 500, garbage.
mod agent_faults;
// Live enforcement and reconfiguration: open connections and listeners follow changes.
mod live;
// SIGTERM: stop accepting, drain, exit 0.
mod shutdown;
// The fake agent's JSON against responses recorded from a real agent.
mod fixtures;
// Against a real Consul agent, including interop with `consul connect proxy`.
mod real_consul;
// What operators rely on: unix-socket apps and upstreams, exit 1 on a taken port, /ready
// while draining, handshake metrics.
mod operations;
