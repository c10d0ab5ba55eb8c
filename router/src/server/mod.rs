//! gRPC handlers, one file per service.

pub mod admin;
pub mod inference;
pub mod openai;
