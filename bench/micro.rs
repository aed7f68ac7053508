//! Micro-benchmarks of what every inbound connection pays for outside TLS: the authorization
//! decision (goal: under 1 us with 1,000 intentions), SPIFFE parsing, and reading the identity
//! from a certificate. Run: `cargo bench --bench micro`.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;

use consul_proxy::authz::{DefaultPolicy, Intentions, authorize};
use consul_proxy::consul::api::Intention;
use consul_proxy::spiffe::SpiffeId;
use consul_proxy::tls::{first_cert, peer};
use criterion::{Criterion, criterion_group, criterion_main};

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn intention(source: &str, action: &str, precedence: u32) -> Intention {
    Intention {
        source_ns: "default".into(),
        source_name: source.into(),
        destination_ns: "default".into(),
        destination_name: "db".into(),
        source_type: "consul".into(),
        action: action.into(),
        precedence,
        ..Default::default()
    }
}

/// 1,000 intentions for db: 999 exact sources, then a wildcard deny, in agent order.
fn thousand() -> Intentions {
    let mut list: Vec<Intention> = (0..999)
        .map(|i| intention(&format!("svc-{i:04}"), "allow", 9))
        .collect();
    list.push(intention("*", "deny", 8));
    Intentions::from_api("db", list)
}

fn authz(c: &mut Criterion) {
    let ixns = thousand();
    assert_eq!(ixns.len(), 1000);
    let last_exact = SpiffeId::new(TD, "", "", "dc1", "svc-0998");
    let first_exact = SpiffeId::new(TD, "", "", "dc1", "svc-0000");
    let unmatched = SpiffeId::new(TD, "", "", "dc1", "stranger");
    let none = Intentions::from_api("db", Vec::new());
    let mut g = c.benchmark_group("authorize (1000 intentions)");
    g.bench_function("exact match, last rule", |b| {
        b.iter(|| {
            authorize(
                black_box(&ixns),
                black_box(&last_exact),
                Some(DefaultPolicy::Deny),
            )
        })
    });
    g.bench_function("exact match, first rule", |b| {
        b.iter(|| {
            authorize(
                black_box(&ixns),
                black_box(&first_exact),
                Some(DefaultPolicy::Deny),
            )
        })
    });
    g.bench_function("wildcard match after 999 others", |b| {
        b.iter(|| {
            authorize(
                black_box(&ixns),
                black_box(&unmatched),
                Some(DefaultPolicy::Deny),
            )
        })
    });
    g.finish();
    c.bench_function("authorize (no intentions, default)", |b| {
        b.iter(|| {
            authorize(
                black_box(&none),
                black_box(&unmatched),
                Some(DefaultPolicy::Allow),
            )
        })
    });
}

fn identity(c: &mut Criterion) {
    let uri = format!("spiffe://{TD}/ns/default/dc/dc1/svc/web");
    c.bench_function("SpiffeId::parse", |b| {
        b.iter(|| SpiffeId::parse(black_box(&uri)))
    });
    let ap = format!("spiffe://{TD}/ap/finance/ns/billing/dc/dc2/svc/ledger%2Dv2");
    c.bench_function("SpiffeId::parse (partition, escapes)", |b| {
        b.iter(|| SpiffeId::parse(black_box(&ap)))
    });
    // A real Consul leaf (recorded from Consul 1.14.11).
    let leaf: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/consul-1.14.11/leaf.json")).unwrap();
    let cert = first_cert(leaf["CertPEM"].as_str().unwrap()).unwrap();
    c.bench_function("identity from a Consul leaf certificate", |b| {
        b.iter(|| peer::identity(black_box(&cert)))
    });
}

criterion_group!(benches, authz, identity);
criterion_main!(benches);
