//! One call to the runtime: a deadline on both sides and the model id in the `mm-model-id` header.
//!
//! The deadline travels as `grpc-timeout`, so the runtime can give up too, and is enforced here with a
//! tokio timer, so a runtime that dies mid-call (or never answers) fails the call instead of hanging it.

use std::future::Future;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue};

/// The header ModelMesh routes inference by, and sends to its runtimes with every call for a model.
pub const MODEL_ID_HEADER: &str = "mm-model-id";

/// How a call failed, before the runtime's and the model's names are attached.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The runtime (or tonic, when it could not reach it) answered with an error status.
    Status(tonic::Status),
    /// No answer before the deadline.
    Timeout(Duration),
}

/// `call` with its deadline enforced.
pub(crate) async fn within<T>(
    after: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Failure> {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(after, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        // The deadline also travels as grpc-timeout, which tonic enforces on its side (CANCELLED,
        // "Timeout expired") and the runtime on its own (DEADLINE_EXCEEDED); whichever side notices
        // first, it is the same timeout.
        Ok(Err(status))
            if status.code() == tonic::Code::DeadlineExceeded
                || (status.code() == tonic::Code::Cancelled && started.elapsed() >= after) =>
        {
            Err(Failure::Timeout(after))
        }
        Ok(Err(status)) => Err(Failure::Status(status)),
        Err(_) => Err(Failure::Timeout(after)),
    }
}

/// A request carrying its deadline and, for calls about one model's inference, its id.
pub(crate) fn outgoing<T>(message: T, timeout: Duration, model_id: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    if let Some(id) = model_id {
        let headers = request.metadata_mut();
        match AsciiMetadataValue::try_from(id) {
            Ok(value) => {
                headers.insert(MODEL_ID_HEADER, value);
            }
            // An id a plain header cannot carry goes in ModelMesh's binary variant.
            Err(_) => {
                headers.insert_bin("mm-model-id-bin", BinaryMetadataValue::from_bytes(id.as_bytes()));
            }
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_id_rides_in_the_header_modelmesh_uses() {
        let plain = outgoing((), Duration::from_secs(1), Some("m-1:v2"));
        assert_eq!(plain.metadata().get(MODEL_ID_HEADER).and_then(|v| v.to_str().ok()), Some("m-1:v2"));
        let odd = outgoing((), Duration::from_secs(1), Some("modèle\n"));
        assert!(odd.metadata().get(MODEL_ID_HEADER).is_none());
        let bin = odd.metadata().get_bin("mm-model-id-bin").and_then(|v| v.to_bytes().ok());
        assert_eq!(bin.as_deref(), Some("modèle\n".as_bytes()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_times_out() {
        let never = std::future::pending::<Result<tonic::Response<()>, tonic::Status>>();
        let failure = within(Duration::from_secs(3), never).await.expect_err("timeout");
        assert!(matches!(failure, Failure::Timeout(d) if d == Duration::from_secs(3)));
    }
}
