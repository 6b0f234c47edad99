//! A model the SPI runtime holds: inference through its KServe V2 `ModelInfer`, unload on drop.
//!
//! Calls carry the model id in the `mm-model-id` header (and in `model_name`), as ModelMesh forwards
//! them to V2 runtimes. A NOT_FOUND answer for a model that loaded means the runtime no longer holds it
//! (its process restarted and, by the SPI's contract, came back empty): that is [`Error::Lost`], so the
//! mesh loads it again instead of failing requests until eviction.

use std::sync::Arc;

use densemesh_runtime_core::{Error, InferRequest, LoadedModel, ModelMetadata, Passthrough, Result, Tensor};
use tokio::sync::Semaphore;
use tonic::Code;

use crate::bridge::Cancelled;
use crate::call::{Failure, outgoing, within};
use crate::runtime::Shared;
use densemesh_runtime_core::v2;

/// One loaded model; dropping it sends `unloadModel` in the background.
pub(crate) struct SpiModel {
    model_id: String,
    shared: Arc<Shared>,
    metadata: ModelMetadata,
    size_bytes: u64,
    /// The runtime's `maxConcurrency` for this model, when it asked the mesh to enforce it
    /// (`limitModelConcurrency`); requests beyond it wait, within their deadline.
    slots: Option<Arc<Semaphore>>,
}

impl SpiModel {
    pub(crate) fn new(
        model_id: String,
        shared: Arc<Shared>,
        metadata: ModelMetadata,
        size_bytes: u64,
        slots: Option<Arc<Semaphore>>,
    ) -> Self {
        Self { model_id, shared, metadata, size_bytes, slots }
    }
}

impl LoadedModel for SpiModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn runtime(&self) -> &str {
        &self.shared.config.name
    }

    fn infer(&self, infer: InferRequest) -> Result<Vec<Tensor>> {
        let shared = &self.shared;
        let span =
            tracing::debug_span!("spi_infer", model_id = %self.model_id, runtime = %shared.config.name);
        let _entered = span.enter();
        let timeout = shared.config.timeouts.infer;
        let message = v2::to_request(&self.model_id, infer)
            .map_err(|e| Error::InvalidInput(format!("model {}: {e}", self.model_id).into()))?;
        let mut client = shared.inference.clone();
        let slots = self.slots.clone();
        let id = self.model_id.clone();
        let call = async move {
            let _slot = match slots {
                Some(slots) => Some(slots.acquire_owned().await),
                None => None,
            };
            client.model_infer(outgoing(message, timeout, Some(&id))).await
        };
        let answer = shared
            .bridge
            .run(within(timeout, call))
            .map_err(|Cancelled| Error::Inference(shared.cancelled("ModelInfer", &self.model_id).into()))?;
        match answer {
            Ok(answer) => v2::from_response(answer).map_err(|e| {
                Error::Inference(
                    format!("model {}: the runtime's answer is malformed: {e}", self.model_id).into(),
                )
            }),
            Err(Failure::Status(status)) if status.code() == Code::NotFound => {
                tracing::warn!(message = status.message(), "the runtime no longer holds the model");
                Err(Error::Lost {
                    model_id: self.model_id.clone(),
                    reason: format!(
                        "spi runtime {} answered NOT_FOUND ({}); it has likely restarted",
                        shared.config.name,
                        status.message()
                    ),
                })
            }
            Err(Failure::Status(status)) if status.code() == Code::InvalidArgument => {
                Err(Error::InvalidInput(
                    shared.failed("ModelInfer", &self.model_id, Failure::Status(status)).into(),
                ))
            }
            Err(failure) => {
                Err(Error::Inference(shared.failed("ModelInfer", &self.model_id, failure).into()))
            }
        }
    }

    fn passthrough(&self) -> Option<&Passthrough> {
        Some(&self.shared.passthrough)
    }
}

impl Drop for SpiModel {
    /// Hands `unloadModel` to the crate's runtime and returns at once: the mesh drops models on its
    /// eviction path, which must not wait on another process.
    fn drop(&mut self) {
        self.shared.unload_in_background(&self.model_id);
    }
}
