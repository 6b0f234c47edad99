//! Where a model goes: the one decision every caller asks (a request, `ensureLoaded` and
//! `registerModel{loadNow}`, a vmodel target, a new copy, a drain hand-off). Callers only do the I/O
//! the answer asks for, so "why did model X go to pod Y?" is answered by reading [`route`].
//!
//! Only pods that offer the model's type count, at every step (ModelMesh's type constraints): a pod
//! that does not is never answered for a copy, a wait or a load, so a request reaching it goes on to
//! one that does.
//!
//! The rule, in order:
//! 1. A copy here (loaded, or loading: the request awaits that load) serves it, unless the goal is a
//!    copy elsewhere ([`Goal::AddCopy`]) or this pod is leaving ([`Goal::HandOff`]).
//! 2. Else a loaded copy on a live, non-draining peer that has not already failed this request: the one
//!    this pod has the fewest requests in flight to, pods that failed moments ago last ([`choose_copy`]).
//! 3. Else a peer already loading it: wait for that copy rather than load a second.
//! 4. Else nobody holds it: load it where [`choose_load_target`] says, among live pods that are not
//!    draining, not backing off from a failed load of it, and large enough for the predicted size:
//!    room first (least-used fraction, this pod on ties), else the coldest LRU in the cluster, but
//!    never by evicting a model used within the anti-churn age (ModelMesh's rule: refuse rather than
//!    thrash). A model too large for this pod but not for a peer goes to that peer.
//!    A model that asks for a GPU ([`Gpu`]) is placed among pods with device room first; one that
//!    requires a GPU never on a pod without a device that could hold it ([`crate::gpu::narrow`]).
//! 5. Else refuse, saying why: no live pod offers its type (named), it requires a GPU no pod has,
//!    larger than any pod, it would evict a recently used model (named), or no pod may load it now.
//!
//! For [`Goal::AddCopy`] only pods without a copy count, and the answer is always a load elsewhere.

use std::time::Duration;

pub use crate::choose::Refusal;
use crate::choose::{CopyHolder, LoadCandidate, choose_copy, choose_load_target};
use crate::gpu::{Gpu, narrow};

/// Why the caller asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// An inference (or metadata) request: it must be answered by some copy.
    Serve,
    /// `ensureLoaded`, `registerModel{loadNow}`, a vmodel target: some copy must exist.
    Ensure,
    /// The model is busy: one more copy, on a pod that has none.
    AddCopy,
    /// This pod is leaving: the model must live on somewhere else.
    HandOff,
}

/// One pod's copy of the model, as the asking pod knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    /// Loaded and serving; `in_flight` requests from the asking pod to it, `failed_recently` when it
    /// failed one moments ago (likely dead, its records not yet expired).
    Loaded { in_flight: usize, failed_recently: bool },
    /// A load is under way.
    Loading,
}

/// A copy of the model on one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOn {
    pub instance: String,
    pub copy: Copy,
}

/// Everything the decision reads, as plain data.
#[derive(Debug, Clone)]
pub struct RouteInput<'a> {
    /// The asking pod.
    pub this: &'a str,
    pub goal: Goal,
    /// Every live pod, this one included (with its state current to the instant), each with its back-off
    /// from a failed load of this model and whether it offers the model's type.
    pub pods: &'a [LoadCandidate],
    /// The model's type (its spec's format), named in the refusal when no pod offers it; `None` when
    /// the model is not registered, and then every pod counts as offering it.
    pub model_type: Option<&'a str>,
    /// The model's copies, on any pod (this one included).
    pub copies: &'a [CopyOn],
    /// Pods that already failed this request (failover): never chosen again for it.
    pub exclude: &'a [&'a str],
    /// What the model will take in memory: the spec's size hint, a size measured before, or the file
    /// size times the learned factor; 0 when nothing is known yet.
    pub predicted_bytes: u64,
    /// Milliseconds since the epoch, the clock of the pods' back-offs.
    pub now_ms: u64,
    /// A load never evicts a model used more recently than this (zero: off).
    pub anti_churn_age: Duration,
    /// What the model asks of GPUs (its spec's `gpu`): placement narrows the pods by it
    /// ([`crate::gpu::narrow`]).
    pub gpu: Option<Gpu>,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A copy here (loaded or loading) serves it.
    Here,
    /// Nobody holds it and this pod should load it.
    LoadHere,
    /// A loaded copy on this peer serves it.
    Copy(String),
    /// This peer is loading it; its copy will serve.
    WaitFor(String),
    /// Nobody holds it and this peer should load it.
    LoadOn(String),
    /// Nothing can serve it now.
    Refuse(Refusal),
}

/// The decision; see the module documentation for the rule.
pub fn route(input: &RouteInput<'_>) -> Route {
    let pod = |name: &str| input.pods.iter().find(|p| p.instance == name);
    let usable = |name: &str| {
        !input.exclude.contains(&name) && pod(name).is_some_and(|p| !p.draining && p.offers_type)
    };
    // This pod is among `pods` as callers build them; were it missing, its copy would still serve.
    let this_offers = pod(input.this).is_none_or(|p| p.offers_type);
    let here = input.copies.iter().find(|c| c.instance == input.this);
    if matches!(input.goal, Goal::Serve | Goal::Ensure) && here.is_some() && this_offers {
        return Route::Here;
    }
    let elsewhere = |c: &&CopyOn| c.instance != input.this && usable(&c.instance);
    if matches!(input.goal, Goal::Serve | Goal::Ensure | Goal::HandOff) {
        let holders: Vec<CopyHolder> = input
            .copies
            .iter()
            .filter(elsewhere)
            .filter_map(|c| match c.copy {
                Copy::Loaded { in_flight, failed_recently } => {
                    Some(CopyHolder { instance: c.instance.clone(), in_flight, failed_recently })
                }
                Copy::Loading => None,
            })
            .collect();
        if let Some(peer) = choose_copy(&holders, input.exclude) {
            return Route::Copy(peer.to_owned());
        }
        if let Some(loading) = input.copies.iter().filter(elsewhere).find(|c| c.copy == Copy::Loading) {
            return Route::WaitFor(loading.instance.clone());
        }
    }
    if let Some(model_type) = input.model_type
        && !input.pods.iter().any(|p| p.offers_type)
    {
        return Route::Refuse(Refusal::NoPodOffers { model_type: model_type.to_owned() });
    }
    let holds = |name: &str| input.copies.iter().any(|c| c.instance == name);
    let candidates: Vec<LoadCandidate> = input
        .pods
        .iter()
        .filter(|p| !input.exclude.contains(&p.instance.as_str()))
        .filter(|p| match input.goal {
            Goal::Serve | Goal::Ensure => true,
            Goal::AddCopy => !holds(&p.instance),
            Goal::HandOff => p.instance != input.this,
        })
        .cloned()
        .collect();
    let groups = match narrow(candidates, input.gpu, input.predicted_bytes) {
        Ok(groups) => groups,
        Err(largest_device_bytes) => {
            return Route::Refuse(Refusal::NoGpu {
                predicted_bytes: input.predicted_bytes,
                largest_device_bytes,
            });
        }
    };
    // The first group with a pod that can take it wins; the refusal of the widest group explains.
    let mut target = Err(Refusal::NoPod);
    for group in &groups {
        target =
            choose_load_target(group, input.this, input.predicted_bytes, input.now_ms, input.anti_churn_age);
        if target.is_ok() {
            break;
        }
    }
    match target {
        Ok(name) if name == input.this => Route::LoadHere,
        Ok(name) => Route::LoadOn(name.to_owned()),
        Err(refusal) => Route::Refuse(refusal),
    }
}

#[cfg(test)]
mod tests;
