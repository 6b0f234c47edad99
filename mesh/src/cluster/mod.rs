//! What involves other pods: asking placement where a model goes and doing what it says
//! ([`placer`]), forwarding requests ([`forward`]) over shared connections ([`peers`]), this pod's
//! instance and placement records ([`instance`]), copies ([`copies`]), drain ([`drain`]), and the
//! chores only the leader does (vmodel transitions, repository sync).

pub mod copies;
pub mod drain;
pub mod forward;
pub mod instance;
pub mod leader;
pub mod peers;
pub mod placer;
pub mod repository;
pub mod vmodels;
