//! `/v1/reports`: the record of processing.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::extract::Params;
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{AppError, Result};
use crate::ledger::reports;

pub fn router() -> Router<AppState> {
    Router::new().route("/reports/processing", get(processing))
}

/// The GDPR Art. 30 record of processing, from the ledger.
#[utoipa::path(get, path = "/v1/reports/processing", tag = "reports",
    params(("from" = Option<String>, Query), ("to" = Option<String>, Query),
           ("format" = Option<String>, Query, description = "`json` (default) or `csv`")),
    responses((status = 200, body = reports::ProcessingReport)),
    security(("bearer" = [])))]
pub async fn processing(
    State(state): State<AppState>,
    who: Principal,
    mut p: Params,
) -> Result<Response> {
    p.allow(&["from", "to", "format"]);
    let (from, to) = p.period();
    let csv = match p.get("format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => {
            p.error("format", "must be one of: json, csv");
            false
        }
    };
    p.finish()?;
    let report = reports::processing(&state, &who, from, to).await?;
    if csv {
        let body = reports::to_csv(&report).map_err(AppError::Internal)?;
        Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"record-of-processing.csv\"",
                ),
            ],
            body,
        )
            .into_response())
    } else {
        Ok(Json(report).into_response())
    }
}
