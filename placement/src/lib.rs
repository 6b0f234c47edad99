//! The cluster model and the decisions made on it, as pure functions over plain data.
//!
//! Nothing here does I/O: the mesh gathers state, asks a function here what to do, and does it. That
//! keeps every decision unit-testable and lets a simulator replay the same logic.
#![forbid(unsafe_code)]

pub mod choose;
pub mod copies;
pub mod election;
pub mod eviction;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod gpu;
pub mod graph;
mod model_id;
pub mod registry;
pub mod route;
pub mod simulate;
pub mod spec;
pub mod status;
pub mod store;
pub mod view;

pub use model_id::{InvalidModelId, ModelId};
pub use registry::{Registry, RegistryError};
pub use spec::{InstanceRecord, ModelSpec, Placement, Source, VModelSpec, Weighted};
pub use store::{MemoryStore, Store, StoreError};
pub use view::ClusterView;
