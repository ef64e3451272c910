//! Field-by-field reading of a JSON object that collects every problem
//! instead of stopping at the first, so a 422 can name each bad field.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::FieldError;

#[derive(Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A view of one JSON object at `path` (e.g. `payload`).
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// How an error names a field or parameter the service does not know: by
/// its name when that is shaped like one (`call_id`, `x-trace`), else as
/// `?`. A client that keys a map by phone number would otherwise get the
/// number back in the error, and errors never carry personal data.
pub fn unknown_name(key: &str) -> &str {
    let mut chars = key.chars();
    let named = key.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if named {
        key
    } else {
        "?"
    }
}

impl<'a> Obj<'a> {
    /// `None` (with an error recorded) when `value` is not an object.
    pub fn new(value: &'a Value, path: &str, errs: &mut Errors) -> Option<Self> {
        match value {
            Value::Object(map) => Some(Self {
                map,
                path: path.to_string(),
            }),
            _ => {
                errs.add(
                    if path.is_empty() { "body" } else { path },
                    "must be a JSON object",
                );
                None
            }
        }
    }

    pub fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Records every key not in `allowed`.
    pub fn deny_unknown(&self, allowed: &[&str], errs: &mut Errors) {
        for key in self.map.keys() {
            if !allowed.contains(&key.as_str()) {
                errs.add(self.path(unknown_name(key)), "unknown field");
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn required(&self, key: &str, errs: &mut Errors) -> Option<&'a Value> {
        let v = self.get(key);
        if v.is_none() {
            errs.add(self.path(key), "is required");
        }
        v
    }

    pub fn str(&self, key: &str, required: bool, errs: &mut Errors) -> Option<&'a str> {
        let v = if required {
            self.required(key, errs)?
        } else {
            self.get(key)?
        };
        match v.as_str() {
            Some(s) => Some(s),
            None => {
                errs.add(self.path(key), "must be a string");
                None
            }
        }
    }

    /// A string of 1..=max characters from a conservative identifier alphabet.
    pub fn ident(
        &self,
        key: &str,
        max: usize,
        required: bool,
        errs: &mut Errors,
    ) -> Option<String> {
        let s = self.str(key, required, errs)?;
        match check_ident(s, max) {
            Ok(()) => Some(s.to_string()),
            Err(msg) => {
                errs.add(self.path(key), msg);
                None
            }
        }
    }

    /// Free text of 1..=max characters without control characters.
    pub fn text(&self, key: &str, max: usize, required: bool, errs: &mut Errors) -> Option<String> {
        let s = self.str(key, required, errs)?;
        let len = s.chars().count();
        if len == 0 || len > max || s.chars().any(char::is_control) || s.trim().is_empty() {
            errs.add(
                self.path(key),
                format!("must be 1 to {max} characters of text"),
            );
            return None;
        }
        Some(s.to_string())
    }

    pub fn time(&self, key: &str, required: bool, errs: &mut Errors) -> Option<DateTime<Utc>> {
        let s = self.str(key, required, errs)?;
        match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => {
                errs.add(
                    self.path(key),
                    "must be an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z",
                );
                None
            }
        }
    }

    pub fn parse<T: std::str::FromStr>(
        &self,
        key: &str,
        required: bool,
        errs: &mut Errors,
        expected: &str,
    ) -> Option<T> {
        let s = self.str(key, required, errs)?;
        match s.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                errs.add(self.path(key), format!("must be one of: {expected}"));
                None
            }
        }
    }

    /// A whole number within `min..=max`.
    pub fn uint(
        &self,
        key: &str,
        min: u64,
        max: u64,
        required: bool,
        errs: &mut Errors,
    ) -> Option<u64> {
        let v = if required {
            self.required(key, errs)?
        } else {
            self.get(key)?
        };
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ if min == 0
                && (v.as_i64().is_some_and(|n| n < 0) || v.as_f64().is_some_and(|n| n < 0.0)) =>
            {
                errs.add(self.path(key), "must not be negative");
                None
            }
            _ => {
                errs.add(
                    self.path(key),
                    format!("must be a whole number from {min} to {max}"),
                );
                None
            }
        }
    }

    /// A finite number within `min..=max`.
    pub fn number(
        &self,
        key: &str,
        min: f64,
        max: f64,
        required: bool,
        errs: &mut Errors,
    ) -> Option<f64> {
        let v = if required {
            self.required(key, errs)?
        } else {
            self.get(key)?
        };
        match v.as_f64() {
            Some(n) if n.is_finite() && n >= min && n <= max => Some(n),
            Some(n) if n < 0.0 && min >= 0.0 => {
                errs.add(self.path(key), "must not be negative");
                None
            }
            _ => {
                errs.add(
                    self.path(key),
                    format!("must be a number from {min} to {max}"),
                );
                None
            }
        }
    }

    pub fn object(&self, key: &str, required: bool, errs: &mut Errors) -> Option<Obj<'a>> {
        let v = if required {
            self.required(key, errs)?
        } else {
            self.get(key)?
        };
        Obj::new(v, &self.path(key), errs)
    }
}

pub fn check_ident(s: &str, max: usize) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {max} characters of A-Z, a-z, 0-9, '-', '_', '.', ':' or '@'"
        ))
    }
}
