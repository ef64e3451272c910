//! ISO 3166-1 alpha-2 jurisdictions and the European Economic Area.

const ISO_3166_1_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// EU member states plus Iceland, Liechtenstein and Norway, and the parts
/// of the EU with codes of their own: the outermost regions of Art. 349
/// TFEU (French Guiana, Guadeloupe, Martinique, Mayotte, Réunion,
/// Saint-Martin) and Åland (Art. 355(4) TFEU). Not the overseas countries
/// and territories (e.g. BL, PM, NC, PF, GL) nor the Faroe Islands or
/// Svalbard, where neither the GDPR nor the EEA Agreement applies.
const EEA: &str =
    "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IS IT LI LT LU LV MT NL NO PL PT RO SE SI SK \
     AX GF GP MQ RE YT MF";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// Accepts an officially assigned ISO 3166-1 alpha-2 code, upper case.
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        if b.len() == 2
            && b.iter().all(u8::is_ascii_uppercase)
            && ISO_3166_1_ALPHA2.split(' ').any(|c| c == s)
        {
            Ok(Self([b[0], b[1]]))
        } else {
            Err("must be an ISO 3166-1 alpha-2 country code in upper case, e.g. FR".into())
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII by construction")
    }

    pub fn in_eea(&self) -> bool {
        EEA.split(' ').any(|c| c == self.as_str())
    }
}

impl std::fmt::Display for Country {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Country {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_assigned_codes_only() {
        assert!(Country::parse("FR").is_ok());
        assert!(Country::parse("TW").is_ok());
        for bad in ["fr", "XX", "FRA", "", "F"] {
            assert!(Country::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn knows_the_eea() {
        assert!(Country::parse("NO").unwrap().in_eea());
        assert!(Country::parse("DE").unwrap().in_eea());
        assert!(!Country::parse("US").unwrap().in_eea());
        assert!(!Country::parse("CH").unwrap().in_eea());
        // Parts of the EU with codes of their own; territories outside it.
        for eu in ["RE", "GF", "GP", "MQ", "YT", "MF", "AX"] {
            assert!(Country::parse(eu).unwrap().in_eea(), "{eu}");
        }
        for outside in ["BL", "PM", "NC", "PF", "GL", "FO", "SJ", "GB"] {
            assert!(!Country::parse(outside).unwrap().in_eea(), "{outside}");
        }
    }
}
