//! The `meshd` node: KServe V2 gRPC in front of a byte-bounded cache of loaded models, one pod of a
//! mesh that places, routes and forwards by model id.
//!
//! Three rooms, dependencies pointing one way (api → cluster → node):
//! - [`api`]: the gRPC and HTTP surfaces;
//! - [`cluster`]: what involves other pods (forwarding, instance records, copies, drain, leader chores);
//! - [`node`]: one pod's machinery (cache and loader, V2 codec, router, worker, limits).
//!
//! [`server`] wires them together with graceful shutdown; [`config`] is `meshd serve`'s flags; [`tls`]
//! is TLS on every listener and every call to a peer.
#![forbid(unsafe_code)]

pub mod api;
pub mod bytesize;
pub mod cluster;
pub mod config;
pub mod error;
#[cfg(all(test, feature = "failpoints"))]
mod fault_tests;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod metrics;
pub mod node;
pub mod server;
#[cfg(test)]
mod test_support;
pub mod tls;

pub use error::{CacheError, MeshError};
pub use node::cache::{CacheConfig, Lease, ModelCache};
pub use server::{ServeConfig, ServeError, run};
