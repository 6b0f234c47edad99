//! The `meshd` node: KServe V2 gRPC in front of a byte-bounded cache of loaded models.
//!
//! A request names a model ([`router`]), leases it from the [`cache`] (loading it on a miss), is
//! validated against the model's interface ([`v2`]) and runs on the [`worker`]. [`server`] wires it
//! together with the admin HTTP endpoints and graceful shutdown.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_service;
pub mod bytesize;
pub mod cache;
pub mod config;
pub mod copies;
pub mod drain;
pub mod error;
pub mod forward;
pub mod instance;
pub mod limits;
pub mod loadgen;
pub mod management;
pub mod metrics;
pub mod repository;
pub mod router;
pub mod server;
pub mod service;
#[cfg(test)]
mod test_support;
pub mod v2;
pub mod vmodels;
pub mod worker;

pub use cache::{CacheConfig, Lease, ModelCache};
pub use error::{CacheError, MeshError};
pub use server::{ServeConfig, ServeError, run};
