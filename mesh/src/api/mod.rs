//! The surfaces clients and operators call: KServe V2 gRPC ([`service`]), ModelMesh's management API
//! ([`management`]), densemesh's Admin API ([`admin_service`]), the HTTP admin endpoints ([`http`]) with
//! the live [`dashboard`], KServe V2 REST ([`rest`]), and runtimes' own methods passed through by model id
//! ([`passthrough`]), and inference graphs run on the V2 service's path ([`graph`]). The gRPC port's
//! HTTP/2 server ([`grpc_server`]) hands each call to them.
//! They translate the wire into calls on the cluster and node rooms and never hold policy of their own.

pub mod admin_service;
pub mod auth;
pub mod dashboard;
pub mod front;
pub mod graph;
pub mod grpc_server;
pub mod http;
pub(crate) mod inject;
pub mod management;
pub mod passthrough;
pub mod rest;
mod runtime_conn;
pub use runtime_conn::read_whole;
pub mod service;
