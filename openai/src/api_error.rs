//! A [`RouterError`] as the OpenAI API answers it: an HTTP status and
//! `{"error": {"message", "type", "param", "code"}}`. The one place that picks them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::openai::{ErrorBody, ErrorDetail};
use crate::error::RouterError;

/// An error in OpenAI's shape, with the HTTP status that goes with it.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    /// OpenAI's `type`.
    pub(super) kind: &'static str,
    pub(super) message: String,
    /// The request field at fault, when one is.
    pub(super) param: Option<&'static str>,
}

impl From<RouterError> for ApiError {
    fn from(error: RouterError) -> Self {
        use RouterError as E;
        let (status, kind) = match &error {
            E::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            E::QueueFull { .. } | E::KvBudget => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            E::NoPlacement
            | E::SchedulerStopped
            | E::TokenizerClosed
            | E::DispatchFailed(_)
            | E::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            E::Deadline | E::DrainTimedOut => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            E::ModelNotFound { .. }
            | E::RouteNotFound
            | E::NodeNotFound(_)
            | E::RouterNotFound(_)
            | E::ResponseNotFound(_) => (StatusCode::NOT_FOUND, "not_found_error"),
            E::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "authentication_error"),
            E::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_error"),
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            E::Upstream { code, .. } => of_code(*code),
        };
        let param = match &error {
            E::Invalid { param, .. } => *param,
            E::ModelNotFound { .. } => Some("model"),
            _ => None,
        };
        Self {
            status,
            kind,
            message: error.to_string(),
            param,
        }
    }
}

/// The HTTP status and OpenAI `type` of a gRPC code (a router's answer through a gateway).
fn of_code(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code as C;
    match code {
        C::InvalidArgument | C::OutOfRange | C::FailedPrecondition => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        C::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        C::Unavailable | C::Aborted => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
        C::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        C::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        C::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        C::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

impl ApiError {
    pub(super) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.map(str::to_string),
                code: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    /// Every variant: its gRPC code, its HTTP status and OpenAI `type`, and the `param` named.
    #[test]
    fn every_error_has_one_grpc_code_and_one_http_answer() {
        let cases = [
            (
                RouterError::invalid("temperature", "temperature must be >= 0, got -1"),
                Code::InvalidArgument,
                400,
                "invalid_request_error",
                Some("temperature"),
            ),
            (
                RouterError::unnamed("invalid JSON body: EOF"),
                Code::InvalidArgument,
                400,
                "invalid_request_error",
                None,
            ),
            (
                RouterError::QueueFull { limit: 4 },
                Code::ResourceExhausted,
                429,
                "rate_limit_error",
                None,
            ),
            (
                RouterError::KvBudget,
                Code::ResourceExhausted,
                429,
                "rate_limit_error",
                None,
            ),
            (
                RouterError::NoPlacement,
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
            (
                RouterError::SchedulerStopped,
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
            (
                RouterError::TokenizerClosed,
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
            (
                RouterError::DispatchFailed("node n1 failed".into()),
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
            (
                RouterError::Store("etcd unreachable: refused".into()),
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
            (
                RouterError::Deadline,
                Code::DeadlineExceeded,
                504,
                "timeout",
                None,
            ),
            (
                RouterError::DrainTimedOut,
                Code::DeadlineExceeded,
                504,
                "timeout",
                None,
            ),
            (
                RouterError::ModelNotFound {
                    requested: "x".into(),
                    served: "m".into(),
                },
                Code::NotFound,
                404,
                "not_found_error",
                Some("model"),
            ),
            (
                RouterError::RouteNotFound,
                Code::NotFound,
                404,
                "not_found_error",
                None,
            ),
            (
                RouterError::NodeNotFound("n1".into()),
                Code::NotFound,
                404,
                "not_found_error",
                None,
            ),
            (
                RouterError::Unauthenticated("a valid API key is required"),
                Code::Unauthenticated,
                401,
                "authentication_error",
                None,
            ),
            (
                RouterError::PermissionDenied("an admin key is required"),
                Code::PermissionDenied,
                403,
                "permission_error",
                None,
            ),
            (
                RouterError::Internal("tokenizing failed".into()),
                Code::Internal,
                500,
                "internal_error",
                None,
            ),
            // A router's refusals, passed on by a gateway: the same code, message and status.
            (
                tonic::Status::invalid_argument("max_new_tokens must be at least 1").into(),
                Code::InvalidArgument,
                400,
                "invalid_request_error",
                None,
            ),
            (
                tonic::Status::resource_exhausted("4 requests are already waiting").into(),
                Code::ResourceExhausted,
                429,
                "rate_limit_error",
                None,
            ),
            (
                tonic::Status::unavailable("no router could take the request").into(),
                Code::Unavailable,
                503,
                "service_unavailable",
                None,
            ),
        ];
        for (error, code, http, kind, param) in cases {
            let message = error.to_string();
            let status = tonic::Status::from(error.clone());
            assert_eq!(
                (status.code(), status.message()),
                (code, message.as_str()),
                "{error:?}"
            );
            let api = ApiError::from(error);
            assert_eq!(
                (api.status.as_u16(), api.kind, api.param),
                (http, kind, param),
                "{message}"
            );
            assert_eq!(api.message, message);
        }
    }

    #[test]
    fn messages_are_the_ones_clients_are_told() {
        for (error, message) in [
            (
                RouterError::QueueFull { limit: 4 },
                "4 requests are already waiting (the limit)",
            ),
            (
                RouterError::KvBudget,
                "the request needs more KV cache than the router's whole budget",
            ),
            (
                RouterError::Deadline,
                "the request ran past its deadline (--request-timeout-ms)",
            ),
            (
                RouterError::DispatchFailed("x".into()),
                "expert dispatch failed: x",
            ),
            (
                RouterError::ModelNotFound {
                    requested: "x".into(),
                    served: "m".into(),
                },
                "the model `x` does not exist; this server serves `m`",
            ),
            (
                RouterError::NodeNotFound("n1".into()),
                "no live node \"n1\"",
            ),
        ] {
            assert_eq!(error.to_string(), message);
        }
    }
}
