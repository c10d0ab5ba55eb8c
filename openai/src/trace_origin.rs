//! Where a request's trace comes from: the client's W3C trace context, from gRPC metadata or
//! HTTP headers, passed to the router's request span (or, on a gateway, to its own).

/// The trace context a request arrived with, and what kind of call it is.
#[derive(Debug, Clone, Default)]
pub struct TraceOrigin {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// gen_ai operation name: `text_completion` or `chat`.
    pub operation: &'static str,
}

impl TraceOrigin {
    pub fn from_grpc(metadata: &tonic::metadata::MetadataMap, operation: &'static str) -> Self {
        Self::from_headers(
            |key| metadata.get(key).and_then(|v| v.to_str().ok()),
            operation,
        )
    }

    pub fn from_http(headers: &axum::http::HeaderMap, operation: &'static str) -> Self {
        Self::from_headers(
            |key| headers.get(key).and_then(|v| v.to_str().ok()),
            operation,
        )
    }

    fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>, operation: &'static str) -> Self {
        Self {
            traceparent: get("traceparent").map(str::to_string),
            tracestate: get("tracestate").map(str::to_string),
            operation,
        }
    }
}
