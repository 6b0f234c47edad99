//! What involves other pods: asking placement where a model goes and doing what it says
//! ([`placer`]), forwarding requests ([`forward`]) over shared connections ([`peers`]), this pod's
//! instance and placement records ([`instance`]), copies ([`copies`]), drain ([`drain`]), the
//! chores only the leader does (vmodel transitions, repository sync, minimum copies), and every
//! vmodel's status across the mesh as it changes ([`vmodel_watch`]).

pub mod copies;
pub mod drain;
pub mod forward;
pub mod instance;
pub mod leader;
pub mod min_copies;
pub mod peers;
pub mod placer;
pub mod repository;
pub mod vmodel_watch;
pub mod vmodels;
pub mod wire;
