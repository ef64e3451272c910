//! The HTTP surface: one router per resource, merged here with the layers
//! every request passes through.

mod audit;
mod consents;
mod extract;
mod health;
mod holds;
mod keys;
mod openapi;
mod reconciliation;
mod reports;
mod retention;
pub mod server;
mod subject_requests;
mod transfers;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::audit::{self as trail, Event, Outcome};
use crate::auth::principal::PrincipalSlot;
use crate::error::{problem_response, AppError, ProblemDetail, PROBLEM_JSON};

pub use extract::{AccessReason, JsonBody};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let timeout = if state.config.request_timeout.is_zero() {
        Duration::from_secs(3600)
    } else {
        state.config.request_timeout
    };
    let body_limit = state.config.body_limit_bytes;
    let v1 = Router::new()
        .merge(transfers::router())
        .merge(consents::router())
        .merge(reports::router())
        .merge(retention::router())
        .merge(holds::router())
        .merge(reconciliation::router())
        .merge(subject_requests::router())
        .merge(audit::router())
        .merge(keys::router());
    Router::new()
        .nest("/v1", v1)
        .merge(health::router())
        .merge(openapi::router())
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { AppError::NotFound("no such route".into()) })
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(crate::telemetry::drop_unusable_request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    // The route template, never the path or its query: a
                    // path segment may be anything a client typed (a phone
                    // number as a consent reference or a record id), and
                    // every event of the request carries this span's fields.
                    let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched", |p| p.as_str());
                    tracing::info_span!("request", method = %req.method(), route = %route, request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(middleware::from_fn(crate::telemetry::scope_request_id))
                .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
                .layer(middleware::from_fn_with_state(state.clone(), audit_denials))
                .layer(middleware::from_fn(problem_for_every_error))
                .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub(crate) async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts and times requests by route template (never the raw path, which
/// may hold ids).
async fn record_metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.latency
        .with_label_values(&[&route, method])
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[&route, method, resp.status().as_str()])
        .inc();
    resp
}

/// The method as a metrics label: one of the standard methods, or `other`,
/// so that a client inventing methods cannot add series without end.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Every unauthenticated or forbidden request, and every decrypting read
/// refused for want of a stated reason, is audited as denied, with the
/// caller when the token was valid.
async fn audit_denials(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let slot = PrincipalSlot::default();
    req.extensions_mut().insert(slot.clone());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let denied = status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || resp.extensions().get::<crate::error::Denied>().is_some();
    if denied {
        let detail = resp
            .extensions()
            .get::<ProblemDetail>()
            .map(|d| d.0.clone());
        let target = serde_json::json!({"method": method, "route": route, "status": status.as_u16(), "detail": detail});
        match slot.get() {
            Some(who) => {
                // In a task of its own, like the anonymous ones: a client
                // that resets its connection does not cut the append short.
                let event = Event::new("request.denied", target).outcome(Outcome::Denied);
                let request_id = crate::telemetry::current_request_id();
                let task = trail::spawn_for_request(request_id, async move {
                    if let Err(e) = trail::record(&state, Some(&who), event).await {
                        tracing::error!(error = %e, "could not audit a denied request");
                    }
                });
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "auditing a denied request failed");
                }
            }
            None => {
                let route = format!("{method} {}", route.as_deref().unwrap_or("unmatched"));
                trail::record_anonymous_denial(&state, status.as_u16(), &route, target).await;
            }
        }
    }
    resp
}

/// Errors produced outside the handlers (timeouts, unmatched methods, body
/// limits) get the same problem+json shape as the handlers' own.
async fn problem_for_every_error(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if is_problem {
        return resp;
    }
    let detail = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route",
        StatusCode::REQUEST_TIMEOUT => "the request took too long and was abandoned",
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than the service accepts",
        StatusCode::NOT_FOUND => "no such route",
        _ => "the request failed",
    };
    let kind = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "-");
    let mut out = problem_response(status, &kind, Some(detail.into()), Vec::new());
    if let Some(allow) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out.into_response()
}
