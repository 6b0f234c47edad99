//! Leader election on a `coordination.k8s.io` Lease, so two controller replicas can run and only
//! one acts.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::info;

/// What to do about a lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// No one holds it, or its holder stopped renewing: take it.
    Take,
    /// Someone else holds it.
    Wait { holder: String },
}

/// Pure: who may hold `spec` at `now`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let holder = spec.and_then(|s| s.holder_identity.clone()).unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Take;
    }
    let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    let seconds = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(15);
    match renewed {
        Some(at) if at + SignedDuration::from_secs(i64::from(seconds)) > now => Decision::Wait { holder },
        _ => Decision::Take,
    }
}

pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderLease {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaderLease {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// One attempt to take or renew; `Ok(false)` while another replica holds it or won a race.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let now = Timestamp::now();
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now);
        let previous = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
        let spec = match &decision {
            Decision::Wait { .. } => return Ok(false),
            Decision::Renew => LeaseSpec { renew_time: Some(MicroTime(now)), ..previous },
            Decision::Take => LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(
                    previous.lease_transitions.unwrap_or(0) + i32::from(current.is_some()),
                ),
                ..Default::default()
            },
        };
        let result = match current {
            // The resourceVersion it was read at makes a racing replica's write fail with 409.
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(drop)
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await.map(drop)
            }
        };
        match result {
            Ok(()) => {
                if decision == Decision::Take {
                    info!(lease = self.name, identity = self.identity, "took the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) if !waiting_logged => {
                    info!(lease = self.name, "another replica leads; standing by");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(lease = self.name, error = %err, "cannot read the leader lease"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease until a renewal is late enough that another replica may have taken it;
    /// returns then, and the process must stop acting.
    pub async fn keep(&self) {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(true) => last = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(err) => {
                    tracing::warn!(lease = self.name, error = %err, "renewing the leader lease failed")
                }
            }
            if last.elapsed() >= self.duration {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    #[test]
    fn who_may_hold_the_lease() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Take);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", now), Decision::Take);
        assert_eq!(decide(Some(&held("a", 990)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&held("b", 990)), "a", now), Decision::Wait { holder: "b".into() });
        assert_eq!(decide(Some(&held("b", 980)), "a", now), Decision::Take, "b stopped renewing");
        assert_eq!(decide(Some(&held("a", 900)), "a", now), Decision::Renew, "ours even when late");
    }
}
