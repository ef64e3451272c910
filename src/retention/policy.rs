//! `policies/retention.toml`: a maximum retention per category, with
//! per-jurisdiction overrides. Validated on load; an invalid file is refused
//! with the line at fault.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::domain::{Category, Country};

pub const DEFAULT_RETENTION: &str = include_str!("../../policies/retention.toml");

/// Longest retention the service accepts anywhere: 10 years.
const MAX_DAYS: i64 = 3650;

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct RetentionPolicy {
    /// Maximum days per category.
    pub categories: BTreeMap<String, u32>,
    /// Per jurisdiction, the categories whose maximum differs there.
    pub jurisdictions: BTreeMap<String, BTreeMap<String, u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    categories: BTreeMap<Spanned<String>, Spanned<i64>>,
    #[serde(default)]
    jurisdictions: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<i64>>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl RetentionPolicy {
    /// Parses and validates; errors name the file line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            format!("retention.toml line {line}: {}", e.message())
        })?;
        let at = |span: std::ops::Range<usize>, msg: String| {
            format!("retention.toml line {}: {msg}", line_of(text, span.start))
        };
        let days = |v: &Spanned<i64>| -> Result<u32, String> {
            let d = *v.get_ref();
            if d <= 0 || d > MAX_DAYS {
                Err(at(
                    v.span(),
                    format!("retention must be from 1 to {MAX_DAYS} days, not {d}"),
                ))
            } else {
                Ok(d as u32)
            }
        };
        let category = |k: &Spanned<String>| -> Result<Category, String> {
            k.get_ref().parse::<Category>().map_err(|_| {
                at(
                    k.span(),
                    format!(
                        "unknown category {:?}; expected one of: {}",
                        k.get_ref(),
                        Category::expected()
                    ),
                )
            })
        };

        let mut categories = BTreeMap::new();
        for (k, v) in &raw.categories {
            categories.insert(category(k)?.as_str().to_string(), days(v)?);
        }
        for c in Category::ALL {
            if !categories.contains_key(c.as_str()) {
                return Err(format!(
                    "retention.toml: [categories] has no maximum for {c}"
                ));
            }
        }
        let mut jurisdictions = BTreeMap::new();
        for (j, overrides) in &raw.jurisdictions {
            let country = Country::parse(j.get_ref())
                .map_err(|e| at(j.span(), format!("jurisdiction {:?} {e}", j.get_ref())))?;
            let mut map = BTreeMap::new();
            for (k, v) in overrides {
                map.insert(category(k)?.as_str().to_string(), days(v)?);
            }
            jurisdictions.insert(country.to_string(), map);
        }
        Ok(Self {
            categories,
            jurisdictions,
        })
    }

    pub fn default_policy() -> Self {
        Self::parse(DEFAULT_RETENTION).expect("the compiled-in retention policy is valid")
    }

    /// The maximum in force for a category in a jurisdiction.
    pub fn max_days(&self, category: Category, jurisdiction: &Country) -> u32 {
        self.jurisdictions
            .get(jurisdiction.as_str())
            .and_then(|o| o.get(category.as_str()))
            .or_else(|| self.categories.get(category.as_str()))
            .copied()
            .expect("validated: every category has a maximum")
    }

    /// `retain_until` for a transfer; `requested` may shorten, never extend.
    pub fn retain_until(
        &self,
        category: Category,
        jurisdiction: &Country,
        occurred_at: DateTime<Utc>,
        requested: Option<u32>,
    ) -> Result<DateTime<Utc>, String> {
        let max = self.max_days(category, jurisdiction);
        let days = match requested {
            Some(d) if d > max => {
                return Err(format!(
                    "may only shorten retention: the maximum for {category} in {jurisdiction} is {max} days"
                ))
            }
            Some(d) => d,
            None => max,
        };
        Ok(occurred_at + Duration::days(days.into()))
    }

    /// A human summary of the erasure time limits for a category, for the
    /// record of processing.
    pub fn describe(&self, category: Category) -> String {
        let mut s = format!(
            "{} days after the transfer",
            self.categories[category.as_str()]
        );
        let overrides: Vec<_> = self
            .jurisdictions
            .iter()
            .filter_map(|(j, o)| o.get(category.as_str()).map(|d| format!("{j}: {d} days")))
            .collect();
        if !overrides.is_empty() {
            s.push_str(&format!(" ({})", overrides.join(", ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_is_valid_and_overrides_apply() {
        let p = RetentionPolicy::default_policy();
        let us = Country::parse("US").unwrap();
        let fr = Country::parse("FR").unwrap();
        assert!(
            p.max_days(Category::CallDetailRecord, &us)
                > p.max_days(Category::CallDetailRecord, &fr)
        );
    }

    #[test]
    fn requested_retention_only_shortens() {
        let p = RetentionPolicy::default_policy();
        let fr = Country::parse("FR").unwrap();
        let t = Utc::now();
        assert_eq!(
            p.retain_until(Category::CallQuality, &fr, t, Some(1))
                .unwrap(),
            t + Duration::days(1)
        );
        assert!(p
            .retain_until(Category::CallQuality, &fr, t, Some(100_000))
            .is_err());
    }

    #[test]
    fn errors_name_the_line() {
        let text = "[categories]\nnumber_assignment = 10\ncall_detail_record = 10\ncall_quality = 0\ncall_duration = 5\n";
        let e = RetentionPolicy::parse(text).unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        let text = "[categories]\nnumber_assignment = 10\ncall_detail_record = 10\ncall_quality = 1\ncall_duration = 5\n[jurisdictions.XX]\ncall_quality = 1\n";
        let e = RetentionPolicy::parse(text).unwrap_err();
        assert!(e.contains("line 6"), "{e}");
        let e = RetentionPolicy::parse("[categories]\nvoicemail = 3\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("voicemail"), "{e}");
    }
}
