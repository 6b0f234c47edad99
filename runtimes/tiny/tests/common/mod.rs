//! Helpers shared by the integration tests and the density bench.

pub mod mlp;
