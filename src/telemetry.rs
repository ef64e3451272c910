//! Logging set-up and the request id that ties a log line to a response.

use axum::{extract::Request, middleware::Next, response::Response};
use tracing_subscriber::{fmt, EnvFilter};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served on this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Runs `fut` as part of the request `id` (a task spawned for a request
/// keeps its id).
pub async fn with_request_id<F: std::future::Future>(id: Option<String>, fut: F) -> F::Output {
    REQUEST_ID.scope(id.unwrap_or_default(), fut).await
}

/// Makes the request id (set by `SetRequestIdLayer`) visible to error
/// rendering, which has no access to the request.
pub async fn scope_request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    REQUEST_ID.scope(id, next.run(req)).await
}

/// Keeps a client's `X-Request-Id` only if it is plain: 1 to 128 visible
/// ASCII characters. Otherwise it is dropped and the service makes one, so
/// that logs, problem bodies and audit entries carry no more than that of
/// what a client puts in the header (still client text: see
/// docs/threat-model.md).
pub async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = req.headers().get("x-request-id").map(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic)
    });
    if usable == Some(false) {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// JSON logs when `LEDGER_LOG_FORMAT=json`, human-readable for `text` or
/// when unset; level from `RUST_LOG` (default `info` for the service, and
/// `warn` for `quiet` commands, whose output is their own). A value it cannot
/// use is an error naming the variable: an operator who asked for JSON logs
/// and misspelt it would otherwise ship text to a collector that drops it.
pub fn init(quiet: bool) -> Result<(), String> {
    let json = match std::env::var("LEDGER_LOG_FORMAT") {
        Err(std::env::VarError::NotPresent) => false,
        Ok(v) => log_format_is_json(&v)?,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("LEDGER_LOG_FORMAT: expected `json` or `text`".into())
        }
    };
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Err(std::env::VarError::NotPresent) if quiet => EnvFilter::new("warn"),
        Err(std::env::VarError::NotPresent) => EnvFilter::new("info,sqlx=warn,tower_http=info"),
        Ok(v) => EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG: {e}"))?,
        Err(std::env::VarError::NotUnicode(_)) => return Err("RUST_LOG: not valid UTF-8".into()),
    };
    // Colours only on a terminal: escape codes in a log file or a log
    // collector are noise.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

fn log_format_is_json(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "json" => Ok(true),
        "text" | "" => Ok(false),
        _ => Err(format!(
            "LEDGER_LOG_FORMAT: expected `json` or `text`, got {v:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats() {
        assert_eq!(log_format_is_json("json"), Ok(true));
        assert_eq!(log_format_is_json(" JSON "), Ok(true));
        assert_eq!(log_format_is_json("text"), Ok(false));
        assert_eq!(log_format_is_json(""), Ok(false));
        let e = log_format_is_json("jsno").unwrap_err();
        assert!(e.contains("LEDGER_LOG_FORMAT") && e.contains("jsno"), "{e}");
    }
}
