//! What involves other pods: routing and forwarding requests ([`forward`]), this pod's instance and
//! placement records ([`instance`]), copies ([`copies`]), drain ([`drain`]), and the chores only the
//! leader does (vmodel transitions, repository sync).

pub mod copies;
pub mod drain;
pub mod forward;
pub mod instance;
pub mod repository;
pub mod vmodels;
