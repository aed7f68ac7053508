//! Everything that speaks to the local Consul agent: the typed client, the serde mirror of its
//! JSON, and the generic blocking-query loop.

pub mod api;
mod client;
mod error;
pub mod watch;

pub use client::{Blocking, ConsulClient, Indexed, blocking_timeout};
pub use error::ConsulError;
