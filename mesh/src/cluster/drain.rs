//! Leaving without a cold start for anyone: on SIGTERM a pod marks itself draining, then has each
//! recently used model that no other pod holds loaded where placement says, before it stops serving.

use std::time::Duration;

use densemesh_placement::route::Goal;
use tokio::time::Instant;

use crate::cluster::placer::{Ensured, LastUsed, Placer};
use crate::node::cache::ModelCache;

/// Models used within this window are handed off; colder ones just go.
pub const RECENT: Duration = Duration::from_secs(600);

/// Loads this pod's recently used, otherwise unheld models on other pods, warmest first, within
/// `deadline`. Placement answers for each ([`Goal::HandOff`]: never this pod, nothing to do when a peer
/// holds it), and each load is waited for, so the next choice sees the capacity it took.
pub async fn hand_off(placer: &Placer, cache: &ModelCache, deadline: Instant) {
    let mut models = cache.resident();
    models.sort_by_key(|m| m.idle_for);
    for model in models.into_iter().filter(|m| m.idle_for < RECENT) {
        let ensured = placer.ensure(&model.id, Goal::HandOff, true, LastUsed::Now);
        match tokio::time::timeout_at(deadline, ensured).await {
            Err(_) => {
                tracing::warn!("drain deadline reached; remaining models are not handed off");
                return;
            }
            Ok(Ok(Ensured::On(to))) => {
                tracing::info!(model_id = %model.id, to = %to, "handed off before leaving")
            }
            Ok(Ok(Ensured::Here)) => {}
            Ok(Err(e)) => tracing::warn!(model_id = %model.id, error = %e, "could not hand the model off"),
        }
    }
}
