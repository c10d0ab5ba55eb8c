//! Why the router refuses or fails a request: one enum for every module, turned into a gRPC
//! status or an OpenAI HTTP error only at the edges. It lives in `moe-openai`, which the
//! gateway shares.

pub use moe_openai::error::RouterError;
