//! Helpers shared by the integration tests and the density bench.
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod mlp;
