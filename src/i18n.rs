//! Plain-language explanations in the languages exports are offered in,
//! from the Project Fluent catalogs in `locales/`, compiled into the binary.

use std::collections::HashMap;

use fluent_bundle::concurrent::FluentBundle;
use fluent_bundle::{FluentArgs, FluentResource};
use unic_langid::LanguageIdentifier;

/// The offered languages, `en` first (the fallback).
pub const LANGUAGES: &[(&str, &str)] = &[
    ("en", include_str!("../locales/en/ledger.ftl")),
    ("fr", include_str!("../locales/fr/ledger.ftl")),
    ("ru", include_str!("../locales/ru/ledger.ftl")),
    ("pt-BR", include_str!("../locales/pt-BR/ledger.ftl")),
    ("it", include_str!("../locales/it/ledger.ftl")),
    ("zh-TW", include_str!("../locales/zh-TW/ledger.ftl")),
];

pub struct Catalogs {
    bundles: HashMap<&'static str, FluentBundle<FluentResource>>,
}

impl Catalogs {
    pub fn load() -> anyhow::Result<Self> {
        let mut bundles = HashMap::new();
        for (tag, source) in LANGUAGES {
            let resource = FluentResource::try_new(source.to_string()).map_err(|(_, errs)| {
                anyhow::anyhow!("locales/{tag}/ledger.ftl does not parse: {errs:?}")
            })?;
            let lang: LanguageIdentifier = tag.parse()?;
            let mut bundle = FluentBundle::new_concurrent(vec![lang]);
            // Identifiers and dates are inserted as-is, without bidi isolation marks.
            bundle.set_use_isolating(false);
            bundle
                .add_resource(resource)
                .map_err(|e| anyhow::anyhow!("locales/{tag}: {e:?}"))?;
            bundles.insert(*tag, bundle);
        }
        Ok(Self { bundles })
    }

    /// The message `id` in `lang`, falling back to English.
    pub fn message(&self, lang: &str, id: &str, args: &[(&str, &str)]) -> String {
        let bundle = self.bundles.get(lang).unwrap_or(&self.bundles["en"]);
        let Some(pattern) = bundle.get_message(id).and_then(|m| m.value()) else {
            return if lang == "en" {
                id.to_string()
            } else {
                self.message("en", id, args)
            };
        };
        let mut fargs = FluentArgs::new();
        for (k, v) in args {
            fargs.set(*k, v.to_string());
        }
        let mut errors = Vec::new();
        bundle
            .format_pattern(pattern, Some(&fargs), &mut errors)
            .into_owned()
    }

    /// Message ids present in `lang`.
    pub fn ids(&self, lang: &str) -> Vec<String> {
        let source = LANGUAGES
            .iter()
            .find(|(t, _)| *t == lang)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        let resource = FluentResource::try_new(source.to_string()).unwrap_or_else(|(r, _)| r);
        let mut ids: Vec<String> = resource
            .entries()
            .filter_map(|e| match e {
                fluent_syntax::ast::Entry::Message(m) => Some(m.id.name.to_string()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }
}

/// Picks an offered language from a requested tag or an `Accept-Language`
/// list, most preferred first (`q` weights, RFC 9110 §12.5.4; `q=0` means
/// "not this one"): exact match, then the same primary language, else `en`.
pub fn negotiate(requested: &str) -> &'static str {
    // (tag, weight); a weight that does not parse leaves the tag out.
    let weighed: Vec<(&str, f32)> = requested
        .split(',')
        .filter_map(|part| {
            let mut fields = part.split(';');
            let tag = fields.next().unwrap_or_default().trim();
            let q = match fields
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            {
                None => 1.0,
                Some((_, v)) => v.trim().parse::<f32>().ok()?,
            };
            (!tag.is_empty() && tag != "*").then_some((tag, q.clamp(0.0, 1.0)))
        })
        .collect();
    let offered = |tag: &str| LANGUAGES.iter().find(|(t, _)| t.eq_ignore_ascii_case(tag));
    let primary = |tag: &str| {
        tag.split(['-', '_'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let same_language = |tag: &str| LANGUAGES.iter().find(|(t, _)| primary(t) == primary(tag));
    let matching = |tag: &str| offered(tag).or_else(|| same_language(tag)).map(|(t, _)| *t);
    // `q=0` rules a language out, whichever way it would match.
    let excluded: Vec<&str> = weighed
        .iter()
        .filter(|w| w.1 == 0.0)
        .filter_map(|w| matching(w.0))
        .collect();
    let mut ranked: Vec<(&str, f32)> = weighed.into_iter().filter(|w| w.1 > 0.0).collect();
    // Stable: equal weights keep the client's order.
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (tag, _) in ranked {
        if let Some(t) = matching(tag).filter(|t| !excluded.contains(t)) {
            return t;
        }
    }
    "en"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_every_message() {
        let c = Catalogs::load().unwrap();
        let en = c.ids("en");
        assert!(en.len() >= 30, "{en:?}");
        for (lang, _) in LANGUAGES {
            assert_eq!(c.ids(lang), en, "{lang} differs from en");
            for id in &en {
                let text = c.message(
                    lang,
                    id,
                    &[
                        ("identifier", "+14255550100"),
                        ("carrier", "c-1"),
                        ("date", "2027-01-01"),
                    ],
                );
                assert!(!text.is_empty() && text != *id, "{lang}/{id} is empty");
                assert!(
                    !text.contains("{$") && !text.contains("{ $"),
                    "{lang}/{id} has an unresolved variable: {text}"
                );
            }
        }
    }

    #[test]
    fn languages_are_negotiated() {
        assert_eq!(negotiate("fr-CA,en;q=0.5"), "fr");
        assert_eq!(negotiate("pt"), "pt-BR");
        assert_eq!(negotiate("zh-Hant-TW"), "zh-TW");
        assert_eq!(negotiate("de, it;q=0.8"), "it");
        assert_eq!(negotiate("de"), "en");
        assert_eq!(negotiate(""), "en");
        // Weights order the list; q=0 rules a language out.
        assert_eq!(negotiate("fr;q=0, ru"), "ru");
        assert_eq!(negotiate("fr;q=0.5, ru"), "ru");
        assert_eq!(negotiate("it;q=0.9, fr;q=0.9"), "it");
        assert_eq!(negotiate("ru;q=0.2, zh-TW; q=0.7"), "zh-TW");
        assert_eq!(negotiate("fr;q=0"), "en");
        // An exclusion holds for every way of matching the language.
        assert_eq!(negotiate("pt-BR;q=0, pt"), "en");
        assert_eq!(negotiate("pt;q=0, pt-BR, it"), "it");
        // Weights out of range are clamped; one that does not parse leaves
        // its tag out.
        assert_eq!(negotiate("ru;q=5, it"), "ru");
        assert_eq!(negotiate("ru;q=high, it;q=0.1"), "it");
    }

    #[test]
    fn variables_are_filled_in() {
        let c = Catalogs::load().unwrap();
        assert!(c
            .message("fr", "export-subject", &[("identifier", "+33123456789")])
            .contains("+33123456789"));
    }
}
