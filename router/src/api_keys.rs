//! API and admin keys live in `moe-cluster`, shared with the gateway (a refused admin call
//! becomes a `RouterError` in `moe-openai`).

pub use moe_cluster::api_keys::{AccessDenied, AdminAccess, ApiKeys, KeyFileArgs, KeyFileError};
