//! `/openapi.json`, generated from the handlers and types.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::app::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "transfer-ledger", description = "System of record for personal data transferred between a telecom platform and its carriers."),
    paths(
        super::transfers::create, super::transfers::create_batch, super::transfers::list, super::transfers::show,
        super::consents::create, super::consents::show, super::consents::change_status,
        super::reports::processing, super::retention::policy, super::retention::run_sweep,
        super::retention::list_sweeps, super::reconciliation::reconcile, super::subject_requests::create, super::subject_requests::list,
        super::subject_requests::show, super::subject_requests::extend, super::subject_requests::download, super::holds::place, super::holds::release, super::holds::list,
        super::audit::list, super::audit::verify, super::audit::head, super::keys::export_signing,
        super::keys::rotate, super::keys::rotate_signing, super::keys::status, super::keys::reload_policies,
        super::health::healthz, super::health::readyz, super::metrics, openapi_json,
    ),
    components(schemas(crate::error::Problem, crate::error::FieldError)),
    modifiers(&BearerAuth, &ProblemResponses)
)]
pub struct ApiDoc;

/// Errors as the service sends them: `application/problem+json` with the
/// `Problem` schema (the handlers' annotations say `application/json`), and
/// the statuses every operation of a kind can answer (docs/api.md): 401 and
/// 403 where a token is required, 400 where a JSON body or `X-Access-Reason`
/// is read, 422 where a body or query parameters are validated.
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use crate::error::PROBLEM_JSON;
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};
        let problem = || Content::new(Some(Ref::from_schema_name("Problem")));
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let has_body = op.request_body.is_some();
                let has_query = op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| p.parameter_in == ParameterIn::Query);
                let has_reason = op.parameters.iter().flatten().any(|p| {
                    p.parameter_in == ParameterIn::Header
                        && p.name.eq_ignore_ascii_case("X-Access-Reason")
                });
                let wanted = [
                    (
                        secured,
                        "401",
                        "no bearer token, or one that is invalid, expired or not accepted",
                    ),
                    (
                        secured,
                        "403",
                        "the caller's role or carrier may not do this",
                    ),
                    (
                        has_body || has_reason,
                        "400",
                        "a body that is not JSON or not sent as application/json, or X-Access-Reason missing or malformed where it is required",
                    ),
                    (
                        has_body || has_query,
                        "422",
                        "invalid fields or parameters, each named in `errors`",
                    ),
                ];
                for (_, status, description) in wanted.into_iter().filter(|w| w.0) {
                    op.responses
                        .responses
                        .entry(status.into())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(description)
                                .content(PROBLEM_JSON, problem())
                                .build()
                                .into()
                        });
                }
                for (status, response) in op.responses.responses.iter_mut() {
                    let RefOr::T(r) = response else { continue };
                    if !(status.starts_with('4') || status.starts_with('5')) {
                        continue;
                    }
                    let content = r
                        .content
                        .shift_remove("application/json")
                        .unwrap_or_else(problem);
                    r.content.insert(PROBLEM_JSON.into(), content);
                }
            }
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 document of this service")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// A transfer as submitted (documentation of the request body; the service
/// validates field by field and names every bad one).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct TransferInput {
    carrier_id: String,
    #[schema(example = "platform_to_carrier")]
    direction: crate::domain::Direction,
    category: crate::domain::Category,
    purpose: crate::domain::Purpose,
    legal_basis: crate::domain::LegalBasis,
    consent: Option<ConsentRefInput>,
    #[schema(example = "FR")]
    jurisdiction: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    /// Fields per category: number_assignment {phone_number, sip_uri, customer_tenant_id, action, effective_at};
    /// call_detail_record {call_id, caller, callee, start_time, end_time, duration_seconds, call_direction, disconnect_reason};
    /// call_quality {call_id, caller, callee, mos, jitter_ms, packet_loss_pct, round_trip_ms, codec};
    /// call_duration {call_id, caller, callee, start_time, duration_seconds}.
    payload: serde_json::Value,
    /// May shorten, never extend, the policy maximum.
    retention_days: Option<u32>,
    idempotency_key: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ConsentRefInput {
    reference: String,
    granted_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct BatchInput {
    transfers: Vec<TransferInput>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SubjectInput {
    phone_number: Option<String>,
    sip_uri: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ConsentInput {
    reference: String,
    kind: crate::domain::consent::ConsentKind,
    carrier_id: String,
    /// customer_operator consents only.
    customer_tenant_id: Option<String>,
    /// data_subject consents only.
    subject: Option<SubjectInput>,
    countries: Vec<String>,
    granted_at: chrono::DateTime<chrono::Utc>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SubjectRequestInput {
    /// `access` or `erasure`.
    kind: String,
    carrier_id: String,
    subject: SubjectInput,
    /// en, fr, ru, pt-BR, it or zh-TW; else Accept-Language; else en.
    language: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ReasonInput {
    reason: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SweepInput {
    /// Count what would go, change nothing.
    dry_run: Option<bool>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct HoldInput {
    carrier_id: Option<String>,
    subject: Option<SubjectInput>,
    category: Option<crate::domain::Category>,
    reason: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct StatusInput {
    status: crate::domain::consent::ConsentStatus,
}
