//! Data-subject identifiers: phone numbers (E.164) and SIP URIs, normalized
//! so that any spelling of the same identifier has one blind index.

use std::fmt;

/// A possible phone number in E.164 form (`+14255550100`), with `;ext=N`
/// (RFC 3966) when it names an extension behind the number: an extension is
/// another line, often another person, so it is another data subject.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Accepts international formats (`+1 425-555-0100`, `tel:+1.425.555.0100`,
    /// `0033 1 23 45 67 89`, `+49 30/1234567`, fullwidth digits), of a
    /// length its country code's numbers have, with an extension as `;ext=N`, `x N` or
    /// `ext. N`. Letters (+1425555CALL) and a second `+` are refused: the
    /// numbering-plan parser would read them leniently as keypad digits.
    pub fn parse(input: &str) -> Result<Self, String> {
        // Most input is printable ASCII already: no copy for it.
        let input = input.trim();
        let ascii: std::borrow::Cow<str> =
            if input.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                input.into()
            } else {
                input.chars().map(ascii_form).collect::<String>().into()
            };
        let s = ascii.strip_prefix("tel:").unwrap_or(&ascii);
        let (number, ext) = split_extension(s)?;
        let number = number.trim();
        let s = match number.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => number.to_string(),
        };
        let Some(digits) = s.strip_prefix('+') else {
            return Err("must be an international phone number starting with + (E.164)".into());
        };
        if !digits
            .chars()
            .all(|c| c.is_ascii_digit() || " -.()/[]~".contains(c))
        {
            return Err(
                "may hold only digits after the leading +, with spaces, dots, hyphens, slashes or parentheses between them, and an extension (;ext=N)"
                    .into(),
            );
        }
        let e164 = Self::e164(s)?;
        Ok(Self(match ext {
            Some(x) => format!("{e164};ext={x}"),
            None => e164,
        }))
    }

    fn e164(s: String) -> Result<String, String> {
        // Parsing against the numbering plans is regex work, the costliest
        // step of validating a transfer, and the same subscribers' numbers
        // recur call after call: remember recent outcomes.
        if let Some(known) = parsed_numbers().get(&s) {
            return known.map_err(str::to_string);
        }
        let outcome = match phonenumber::parse(None, &s) {
            Err(_) => Err("is not a phone number"),
            Ok(n) if !phonenumber::is_valid(&n) && !possible(&n) => {
                Err("has a length no phone number of its country code has")
            }
            Ok(n) => Ok(n.format().mode(phonenumber::Mode::E164).to_string()),
        };
        parsed_numbers().insert(s, outcome.clone());
        outcome.map_err(str::to_string)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether some country of `n`'s calling code has subscriber numbers of its
/// length. A number the plan knows (`phonenumber::is_valid`: service
/// numbers such as Turkey's seven-digit 444 numbers too) passes anyway;
/// this lets through numbers of ranges the plan has not assigned: the plans
/// compiled into the binary lag the regulators', and a transfer of a number
/// from a range opened since would otherwise go unrecorded. Ranges set
/// aside for fiction and tests (+1 555 …) pass for the same reason.
fn possible(n: &phonenumber::PhoneNumber) -> bool {
    use phonenumber::Type;
    // The numbers of subscribers (not short codes, emergency or service
    // numbers: the plans list seven-digit Canadian UANs, for one).
    const SUBSCRIBERS: [Type; 7] = [
        Type::FixedLine,
        Type::Mobile,
        Type::TollFree,
        Type::PremiumRate,
        Type::SharedCost,
        Type::PersonalNumber,
        Type::Voip,
    ];
    let length = n.national().to_string().len() as u16;
    let countries = phonenumber::metadata::DATABASE.by_code(&n.code().value());
    countries.into_iter().flatten().any(|m| {
        let d = m.descriptors();
        SUBSCRIBERS.iter().filter_map(|&t| d.get(t)).any(|kind| {
            match kind.possible_length() {
                [] => d.general().possible_length(),
                lengths => lengths,
            }
            .contains(&length)
        })
    })
}

/// Recently parsed numbers and their outcome (E.164, or why not), about
/// 100 bytes each.
fn parsed_numbers() -> &'static quick_cache::sync::Cache<String, Result<String, &'static str>> {
    static CACHE: std::sync::OnceLock<
        quick_cache::sync::Cache<String, Result<String, &'static str>>,
    > = std::sync::OnceLock::new();
    CACHE.get_or_init(|| quick_cache::sync::Cache::new(50_000))
}

/// Fullwidth digits and signs (East Asian input methods), Unicode spaces
/// and dashes, read as their ASCII forms.
fn ascii_form(c: char) -> char {
    match c {
        '\u{ff10}'..='\u{ff19}' => char::from_digit(c as u32 - 0xff10, 10).unwrap_or(c),
        '\u{ff0b}' => '+',
        '\u{ff08}' => '(',
        '\u{ff09}' => ')',
        '\u{ff0e}' => '.',
        '\u{ff0f}' => '/',
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{ff0d}' => '-',
        c if c.is_whitespace() => ' ',
        c => c,
    }
}

/// Splits off an extension: RFC 3966 `;ext=N` (other `;` parameters do not
/// change the number and are dropped), or a trailing `x N`, `ext N` or
/// `ext. N`. An extension is 1 to 20 digits.
fn split_extension(s: &str) -> Result<(&str, Option<String>), String> {
    let bad = || "has an extension that is not 1 to 20 digits".to_string();
    let digits = |x: &str| {
        let x = x.trim();
        (!x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit()))
            .then(|| x.to_string())
    };
    let (number, params) = s.split_once(';').unwrap_or((s, ""));
    for p in params.split(';').map(str::trim) {
        if p.get(..4).is_some_and(|k| k.eq_ignore_ascii_case("ext=")) {
            return Ok((number, Some(digits(&p[4..]).ok_or_else(bad)?)));
        }
    }
    let lower = number.to_ascii_lowercase();
    for marker in ["ext.", "ext", "x"] {
        if let Some(at) = lower.rfind(marker) {
            let rest = number[at + marker.len()..].trim();
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                return Ok((&number[..at], Some(digits(rest).ok_or_else(bad)?)));
            }
        }
    }
    Ok((number, None))
}

/// A SIP URI, normalized to lower case without URI parameters or headers
/// (`sip:+14255550100@sbc.carrier.example`). Parameters such as
/// `;transport=tls` do not change who the URI identifies.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SipUri(String);

impl SipUri {
    pub fn parse(input: &str) -> Result<Self, String> {
        let lower = input.trim().to_ascii_lowercase();
        let (scheme, rest) = if let Some(r) = lower.strip_prefix("sips:") {
            ("sips", r)
        } else if let Some(r) = lower.strip_prefix("sip:") {
            ("sip", r)
        } else {
            return Err("must be a SIP URI starting with sip: or sips:".into());
        };
        // RFC 3261: `user;user-params@host:port;uri-params?headers`. The
        // user part may carry parameters of its own (RFC 3966 in a
        // telephone-subscriber user, `+14255551000;ext=1234;npdi`).
        let rest = rest.split('?').next().unwrap_or_default();
        let (user, hostport) = match rest.split_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let hostport = hostport.split(';').next().unwrap_or_default();
        let user = match user {
            Some(u) => Some(sip_user(u)?),
            None => None,
        };
        let (host, port, v6) = match hostport.strip_prefix('[') {
            // An IPv6 reference: `[2001:db8::1]` or `[2001:db8::1]:5060`.
            Some(rest) => {
                let Some((v6, after)) = rest.split_once(']') else {
                    return Err("has an invalid host".into());
                };
                let Ok(addr) = v6.parse::<std::net::Ipv6Addr>() else {
                    return Err("has an invalid host".into());
                };
                let host = &hostport[..v6.len() + 2];
                match (after, after.strip_prefix(':')) {
                    ("", _) => (host, None, Some(addr)),
                    (_, Some(p)) => (host, Some(p), Some(addr)),
                    _ => return Err("has an invalid host".into()),
                }
            }
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p), None),
                None => (hostport, None, None),
            },
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))
            && !host.starts_with(['-', '.'])
            && !host.ends_with(['-'])
            && (v6.is_some() || !host.contains([':', '[', ']']));
        if !host_ok {
            return Err("has an invalid host".into());
        }
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err("has an invalid port".into()),
            },
            None => None,
        };
        // One spelling per address: an IPv6 reference in its RFC 5952 form
        // (`[0:0::1]` is `[::1]`), a port without leading zeros.
        let host = match v6 {
            Some(addr) => format!("[{addr}]"),
            None => host.to_string(),
        };
        let hostport = match port {
            Some(n) => format!("{host}:{n}"),
            None => host,
        };
        Ok(Self(match user {
            Some(u) => format!("{scheme}:{u}@{hostport}"),
            None => format!("{scheme}:{hostport}"),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A SIP URI's user part, normalized. A global number (`+…`, an RFC 3966
/// telephone-subscriber) keeps the parameters that name another line
/// (`;ext=`, `;isub=`) and drops routing ones (number portability's
/// `;npdi`, `;rn=…`, `;cic=…`), which say nothing about who it is. Any other
/// user keeps its parameters: `;` is an ordinary character of a SIP user
/// (RFC 3261), and `;phone-context=` is part of a local number's identity.
fn sip_user(u: &str) -> Result<String, String> {
    const USER_CHARS: &str = "-_.!~*'()&=+$,/%";
    let (base, params) = u.split_once(';').unwrap_or((u, ""));
    let valid = |s: &str, extra: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || USER_CHARS.contains(c) || extra.contains(c))
    };
    if base.is_empty() || u.len() > 128 || !valid(base, "") || !valid(params, ";") {
        return Err("has an invalid user part".into());
    }
    let base = unescape_unreserved(base)?;
    if !base.starts_with('+') {
        return Ok(if params.is_empty() {
            base
        } else {
            format!("{base};{}", unescape_unreserved(params)?)
        });
    }
    let mut kept = Vec::new();
    for p in params.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        match key {
            "ext" => {
                if value.is_empty()
                    || value.len() > 20
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err("has an extension that is not 1 to 20 digits".into());
                }
                kept.push(format!("ext={value}"));
            }
            "isub" if !value.is_empty() => {
                kept.push(format!("isub={}", unescape_unreserved(value)?))
            }
            "isub" => return Err("has an empty subaddress (isub)".into()),
            _ => {}
        }
    }
    kept.sort();
    Ok(std::iter::once(base)
        .chain(kept)
        .collect::<Vec<_>>()
        .join(";"))
}

/// RFC 3261 §19.1.4: an escaped character that needs no escaping is the
/// character itself (`sip:%61lice@…` is `sip:alice@…`): such escapes are
/// decoded (and lower-cased, like the rest); escapes of characters with a
/// meaning in the URI stay escaped.
fn unescape_unreserved(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let hex = rest
            .get(at + 1..at + 3)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or("has a % not followed by two hexadecimal digits")?;
        let byte = u8::from_str_radix(hex, 16).expect("two hex digits");
        if byte.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&byte) {
            out.push(byte.to_ascii_lowercase() as char);
        } else {
            out.push('%');
            out.push_str(hex);
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Who a piece of personal data is about.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum SubjectId {
    Phone(PhoneNumber),
    Sip(SipUri),
}

impl SubjectId {
    /// A SIP URI if it has a SIP scheme, a phone number otherwise.
    pub fn parse(input: &str) -> Result<Self, String> {
        let t = input.trim_start().to_ascii_lowercase();
        if t.starts_with("sip:") || t.starts_with("sips:") {
            SipUri::parse(input).map(Self::Sip)
        } else {
            PhoneNumber::parse(input)
                .map(Self::Phone)
                .map_err(|e| format!("{e}, or a SIP URI"))
        }
    }

    /// The normalized value as it appears in payloads.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Phone(p) => p.as_str(),
            Self::Sip(s) => s.as_str(),
        }
    }

    /// The canonical bytes fed to the blind index; the kind prefix keeps a
    /// phone number and a SIP URI from ever colliding.
    pub fn canonical(&self) -> String {
        match self {
            Self::Phone(p) => format!("tel:{}", p.as_str()),
            Self::Sip(s) => s.as_str().to_string(),
        }
    }
}

// Identifiers are personal data: never print them by accident.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhoneNumber(<redacted>)")
    }
}
impl fmt::Debug for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SipUri(<redacted>)")
    }
}
impl fmt::Debug for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectId(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn phone_numbers_normalize_to_e164() {
        for input in [
            "+1 425-555-0100",
            "+14255550100",
            "tel:+1.425.555.0100",
            "tel:+1-425-555-0100;phone-context=example.com",
            "001 (425) 555 0100",
            "\u{ff0b}\u{ff11} \u{ff14}\u{ff12}\u{ff15} \u{ff15}\u{ff15}\u{ff15} \u{ff10}\u{ff11}\u{ff10}\u{ff10}",
            "+1\u{a0}425\u{2013}555\u{2013}0100",
        ] {
            assert_eq!(
                PhoneNumber::parse(input).unwrap().as_str(),
                "+14255550100",
                "{input}"
            );
        }
        assert_eq!(
            PhoneNumber::parse("+33 1 23 45 67 89").unwrap().as_str(),
            "+33123456789"
        );
        assert_eq!(
            PhoneNumber::parse("+49 30/2093 1234").unwrap().as_str(),
            "+493020931234"
        );
    }

    #[test]
    fn malformed_phone_numbers_are_refused() {
        for input in [
            "4255550100",
            "+1 425",
            "+999 1234",
            "hello",
            "",
            "+33 1 23",
            "+1425555CALL",
            "++14255550100",
            "+1-425-555-0100x",
            "+14255550100;ext=12a",
            "+14255550100 x123456789012345678901",
        ] {
            assert!(PhoneNumber::parse(input).is_err(), "{input}");
        }
    }

    #[test]
    fn numbers_of_unassigned_ranges_are_accepted_by_their_length() {
        // Area code 555 is not assigned; the numbers are still well formed.
        assert_eq!(
            PhoneNumber::parse("+1 555 123 4567").unwrap().as_str(),
            "+15551234567"
        );
        assert_eq!(
            PhoneNumber::parse("+1 555 555 0100").unwrap().as_str(),
            "+15555550100"
        );
        // Service numbers the plan knows pass as before.
        assert_eq!(
            PhoneNumber::parse("+90 444 1444").unwrap().as_str(),
            "+904441444"
        );
        // A local number (seven digits) is not an international one.
        for input in ["+1 555 1234", "+1 555 123 45678", "+33 6 12 34 56"] {
            assert!(PhoneNumber::parse(input).is_err(), "{input}");
        }
    }

    #[test]
    fn extensions_are_other_subjects() {
        for input in [
            "+1 425 555 0100;ext=12",
            "tel:+1-425-555-0100;ext=12",
            "+1 425 555 0100 x12",
            "+1 425 555 0100 ext. 12",
        ] {
            assert_eq!(
                PhoneNumber::parse(input).unwrap().as_str(),
                "+14255550100;ext=12",
                "{input}"
            );
        }
        assert_ne!(
            SubjectId::parse("+14255550100;ext=12").unwrap().canonical(),
            SubjectId::parse("+14255550100").unwrap().canonical()
        );
    }

    #[test]
    fn remembered_outcomes_equal_fresh_ones() {
        for input in [
            "+1 425-555-0100",
            "+999 1234",
            "+33 6 12 34 56 78",
            "+1 425",
        ] {
            let first = PhoneNumber::parse(input).map(|p| p.as_str().to_string());
            let again = PhoneNumber::parse(input).map(|p| p.as_str().to_string());
            assert_eq!(first, again, "{input}");
        }
    }

    #[test]
    fn sip_uris_normalize() {
        let a = SipUri::parse("SIP:+14255550100@SBC.Carrier.Example;transport=tls").unwrap();
        let b = SipUri::parse("  sip:+14255550100@sbc.carrier.example ").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "sip:+14255550100@sbc.carrier.example");
        assert!(SipUri::parse("sips:alice@example.com:5061").is_ok());
    }

    #[test]
    fn sip_escapes_of_plain_characters_are_the_characters() {
        let plain = SipUri::parse("sip:alice@pct.example").unwrap();
        assert_eq!(SipUri::parse("sip:%61lice@pct.example").unwrap(), plain);
        assert_eq!(SipUri::parse("sip:%41LICE@PCT.example").unwrap(), plain);
        // An escaped delimiter stays escaped: another user.
        assert_eq!(
            SipUri::parse("sip:a%3bb@pct.example").unwrap().as_str(),
            "sip:a%3bb@pct.example"
        );
        assert!(SipUri::parse("sip:al%zzice@pct.example").is_err());
        assert!(SipUri::parse("sip:alice%4@pct.example").is_err());
    }

    #[test]
    fn sip_hosts_may_be_ipv6_references() {
        for ok in [
            "sip:alice@[::1]",
            "sip:alice@[2001:db8::1]:5060",
            "sips:[2001:db8::1]",
        ] {
            assert!(SipUri::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            SipUri::parse("sip:alice@[0:0:0::1]:05060").unwrap(),
            SipUri::parse("sip:alice@[::1]:5060").unwrap()
        );
        assert_eq!(
            SipUri::parse("sip:alice@h.example:05060").unwrap().as_str(),
            "sip:alice@h.example:5060"
        );
        for bad in [
            "sip:alice@h.example:+5060",
            "sip:alice@[::1",
            "sip:alice@::1",
            "sip:alice@[nothost]",
            "sip:alice@[::1]x",
            "sip:alice@[::1]:99999",
        ] {
            assert!(SipUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sip_user_parameters_keep_only_an_extension() {
        let ext = SipUri::parse("sip:+14255551000;EXT=1234;npdi@sbc.example;user=phone").unwrap();
        assert_eq!(ext.as_str(), "sip:+14255551000;ext=1234@sbc.example");
        let ported =
            SipUri::parse("sip:+14255551000;npdi;rn=+14255559999@sbc.example:5060").unwrap();
        assert_eq!(ported.as_str(), "sip:+14255551000@sbc.example:5060");
        assert_ne!(ext, ported);
        // Other users keep their parameters: different local numbers,
        // different users.
        let local = |ctx: &str| {
            SipUri::parse(&format!("sip:1234;phone-context={ctx}@h.example"))
                .unwrap()
                .as_str()
                .to_string()
        };
        assert_ne!(local("a.example"), local("b.example"));
        assert_ne!(
            SipUri::parse("sip:bob;x@h.example").unwrap(),
            SipUri::parse("sip:bob;y@h.example").unwrap()
        );
        for bad in [
            "sip:+14255551000;ext=@sbc.example",
            "sip:+14255551000;ext=12a@sbc.example",
            "sip:;ext=1@sbc.example",
        ] {
            assert!(SipUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_sip_uris_are_refused() {
        for input in [
            "http://x",
            "sip:",
            "sip:@host",
            "sip:a b@host",
            "sip:alice@",
            "sip:alice@host:99999",
        ] {
            assert!(SipUri::parse(input).is_err(), "{input}");
        }
    }

    #[test]
    fn phone_and_sip_never_share_a_canonical_form() {
        let p = SubjectId::parse("+14255550100").unwrap();
        let s = SubjectId::parse("sip:+14255550100@x.example").unwrap();
        assert_ne!(p.canonical(), s.canonical());
    }

    #[test]
    fn debug_output_redacts() {
        let p = SubjectId::parse("+14255550100").unwrap();
        assert!(!format!("{p:?}").contains("555"));
    }

    proptest! {
        #[test]
        fn normalization_is_idempotent(area in 201u32..989, line in 0u32..10000) {
            let raw = format!("+1 {area} 555 {line:04}");
            if let Ok(p) = PhoneNumber::parse(&raw) {
                let again = PhoneNumber::parse(p.as_str()).unwrap();
                prop_assert_eq!(p, again);
            }
        }

        #[test]
        fn sip_parser_never_panics(s in "\\PC{0,60}") {
            let _ = SipUri::parse(&s);
            let _ = SubjectId::parse(&s);
        }

        #[test]
        fn sip_normalization_is_idempotent(
            user in "[a-zA-Z0-9+.-]{1,12}",
            params in "(;[a-z]{1,4}(=[0-9]{1,3})?){0,3}",
            host in "[a-z]{1,8}\\.example",
        ) {
            let once = SipUri::parse(&format!("sip:{user}{params}@{host};transport=tls")).unwrap();
            let twice = SipUri::parse(once.as_str()).unwrap();
            prop_assert_eq!(once, twice);
        }
    }
}
