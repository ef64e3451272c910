//! The service's own extractors, so that every rejection is problem+json.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts};
use serde_json::Value;

use crate::error::AppError;

/// A JSON request body, parsed to a value for field-by-field validation.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(&req) {
            return Err(not_json());
        }
        parse(&read(req, state).await?).map(JsonBody)
    }
}

/// A JSON request body that may be left out: no body at all reads as `{}`,
/// for requests whose every field is optional (`POST /v1/retention/sweeps`).
pub struct OptionalJsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for OptionalJsonBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let empty = || Self(Value::Object(Default::default()));
        if !is_json(&req) {
            // Without a JSON content type only an empty body is accepted,
            // judged from the headers, before anything is read.
            let h = req.headers();
            let declared = h.contains_key(header::TRANSFER_ENCODING)
                || h.get(header::CONTENT_LENGTH).is_some_and(|v| v != "0");
            return if declared {
                Err(not_json())
            } else {
                Ok(empty())
            };
        }
        let bytes = read(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(empty());
        }
        parse(&bytes).map(Self)
    }
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

fn not_json() -> AppError {
    AppError::BadRequest("the body must be JSON, sent with Content-Type: application/json".into())
}

async fn read<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, AppError> {
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge("the request body is larger than the service accepts".into())
        } else {
            AppError::BadRequest("the request body could not be read".into())
        }
    })
}

fn parse(bytes: &[u8]) -> Result<Value, AppError> {
    serde_json::from_slice::<NoRepeatedKeys>(bytes)
        .map(|v| v.0)
        .map_err(|e| {
            // Positions only, never the content.
            let what = if e.to_string().starts_with(REPEATED_KEY) {
                "the body repeats a key within one object"
            } else {
                "the body is not valid JSON"
            };
            AppError::BadRequest(format!("{what}: line {}, column {}", e.line(), e.column()))
        })
}

const REPEATED_KEY: &str = "repeated key";

/// A JSON value in which no object names a key twice. `{"carrier_id": "a",
/// "carrier_id": "b"}` is ambiguous: serde keeps the last, a proxy or an
/// auditing tool in front of the service may read the first, so the
/// request is refused rather than read one way.
struct NoRepeatedKeys(Value);

impl<'de> serde::Deserialize<'de> for NoRepeatedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoRepeatedKeysVisitor).map(Self)
    }
}

struct NoRepeatedKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoRepeatedKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(NoRepeatedKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(REPEATED_KEY));
            }
            let NoRepeatedKeys(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// `X-Access-Reason`: why a privacy officer decrypts personal data.
pub struct AccessReason(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for AccessReason {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get("x-access-reason") {
            None => Ok(Self(None)),
            Some(v) => {
                let s = v
                    .to_str()
                    .map_err(|_| {
                        AppError::ReasonRequired(
                            "X-Access-Reason must be visible ASCII text".into(),
                        )
                    })?
                    .trim();
                if s.is_empty() || s.len() > 500 {
                    return Err(AppError::ReasonRequired(
                        "X-Access-Reason must be 1 to 500 characters".into(),
                    ));
                }
                Ok(Self(Some(s.to_string())))
            }
        }
    }
}

/// Query parameters, checked against the names a route accepts.
pub struct Params {
    pairs: Vec<(String, String)>,
    /// By parameter, its value with each `+` read as itself rather than as
    /// a space, where it had one (see [`Params::parse`]).
    literal: Vec<(String, String)>,
    errors: Vec<crate::error::FieldError>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or_default();
        let mut pairs = Vec::new();
        let mut literal = Vec::new();
        for p in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = url_decode(k, true).map_err(|why| {
                AppError::BadRequest(format!(
                    "the query string is not valid URL encoding: a parameter name {why}"
                ))
            })?;
            let bad_value = |why| {
                AppError::BadRequest(format!(
                    "the query string is not valid URL encoding: the value of `{}` {why}",
                    crate::domain::fields::unknown_name(&k)
                ))
            };
            if v.contains('+') {
                literal.push((k.clone(), url_decode(v, false).map_err(bad_value)?));
            }
            let v = url_decode(v, true).map_err(bad_value)?;
            pairs.push((k, v));
        }
        Ok(Self {
            pairs,
            literal,
            errors: Vec::new(),
        })
    }
}

/// Decodes one `application/x-www-form-urlencoded` component strictly: a
/// `%` not followed by two hexadecimal digits, or an escape that decodes to
/// bytes that are not UTF-8, is an error (the lenient decoders keep the
/// first as text and replace the second, so `?subject=%FF` would be
/// searched for as `�`). Says what is wrong, never echoing the value.
/// `plus_is_space`: whether `+` stands for a space, as in HTML forms.
fn url_decode(s: &str, plus_is_space: bool) -> Result<String, &'static str> {
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err("has a % not followed by two hexadecimal digits");
        }
    }
    let spaced = if plus_is_space {
        s.replace('+', " ")
    } else {
        s.to_string()
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| "decodes to bytes that are not UTF-8")
}

impl Params {
    /// Records an error for every parameter not in `allowed` or repeated.
    pub fn allow(&mut self, allowed: &[&str]) {
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &self.pairs {
            if !allowed.contains(&k.as_str()) {
                self.errors.push(crate::error::FieldError::new(
                    crate::domain::fields::unknown_name(k),
                    "unknown query parameter",
                ));
            } else if !seen.insert(k.clone()) {
                self.errors.push(crate::error::FieldError::new(
                    k.clone(),
                    "given more than once",
                ));
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn error(&mut self, name: &str, message: impl Into<String>) {
        self.errors
            .push(crate::error::FieldError::new(name, message));
    }

    /// Parses `name` with `parse`, recording its error message.
    ///
    /// A value that does not parse with its `+` read as spaces is tried
    /// once more with them read as `+`: `?subject=+14255550100` and
    /// `?from=2026-01-31T12:00:00+01:00`, sent without escaping the `+`
    /// (as `curl` and hand-built URLs do), mean what they say; neither a
    /// phone number nor a date-time has a space where the `+` goes.
    pub fn parse<T>(&mut self, name: &str, parse: impl Fn(&str) -> Result<T, String>) -> Option<T> {
        let v = self.get(name)?.to_string();
        match parse(&v) {
            Ok(t) => Some(t),
            Err(m) => {
                let literal = self.literal.iter().find(|(k, _)| k == name);
                if let Some(Ok(t)) = literal.map(|(_, v)| parse(v)) {
                    return Some(t);
                }
                self.error(name, m);
                None
            }
        }
    }

    /// A boolean parameter: `true` or `false`.
    pub fn flag(&mut self, name: &str) -> Option<bool> {
        self.parse(name, |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("must be true or false".into()),
        })
    }

    /// `carrier_id`, a well-formed carrier id when given.
    pub fn carrier_id(&mut self) -> Option<String> {
        self.parse("carrier_id", |s| {
            crate::domain::CarrierId::parse(s).map(|c| c.to_string())
        })
    }

    /// `cursor`: where the previous page of `listing` ended.
    pub fn cursor(&mut self, listing: crate::storage::Listing) -> Option<(i64, uuid::Uuid)> {
        self.parse("cursor", |s| crate::storage::decode_cursor(listing, s))
    }

    /// `limit`: a page size from 1 to 1000, 100 when absent.
    pub fn limit(&mut self) -> i64 {
        self.parse("limit", |s| match s.parse::<i64>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err("must be a whole number from 1 to 1000".into()),
        })
        .unwrap_or(100)
    }

    /// `from` and `to` (RFC 3339); `to` must not be before `from`.
    pub fn period(
        &mut self,
    ) -> (
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let (from, to) = (self.time("from"), self.time("to"));
        if from.zip(to).is_some_and(|(f, t)| t < f) {
            self.error("to", "must not be before from");
        }
        (from, to)
    }

    pub fn time(&mut self, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.parse(name, |s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| "must be an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z".to_string())
        })
    }

    /// `Err` with every recorded problem, if any.
    pub fn finish(self) -> Result<(), AppError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(AppError::Validation(self.errors))
        }
    }
}

/// The RFC 8288 `Link` to the next page of a list answered as a bare JSON
/// array: `path` with the same filters and `cursor`. Filter values are
/// tokens this service validated and the cursor is URL-safe base64, so
/// nothing needs escaping.
pub fn next_link(path: &str, filters: &[(&str, String)], cursor: &str) -> axum::http::HeaderValue {
    let mut query: Vec<String> = filters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    query.push(format!("cursor={cursor}"));
    axum::http::HeaderValue::from_str(&format!("<{path}?{}>; rel=\"next\"", query.join("&")))
        .expect("ASCII tokens")
}
