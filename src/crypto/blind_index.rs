//! Keyed blind index: HMAC-SHA256 of a normalized identifier. Equal
//! identifiers give equal indexes; without the key an index reveals nothing
//! and cannot be brute-forced over the (small) space of phone numbers.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::SubjectId;

#[derive(Clone)]
pub struct BlindIndex {
    mac: Hmac<Sha256>,
}

impl BlindIndex {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            mac: Hmac::new_from_slice(key).expect("HMAC accepts any key length"),
        }
    }

    pub fn of(&self, subject: &SubjectId) -> Vec<u8> {
        self.of_str("subject", &subject.canonical())
    }

    /// Domain-separated HMAC, so indexes of different kinds never collide.
    pub fn of_str(&self, domain: &str, value: &str) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// A short hex prefix of an index, safe to log.
pub fn log_prefix(index: &[u8]) -> String {
    index.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_subject_any_spelling_same_index() {
        let bi = BlindIndex::new(&[7; 32]);
        let a = SubjectId::parse("+1 (425) 555-0100").unwrap();
        let b = SubjectId::parse("tel:+14255550100").unwrap();
        assert_eq!(bi.of(&a), bi.of(&b));
        let other_key = BlindIndex::new(&[8; 32]);
        assert_ne!(bi.of(&a), other_key.of(&a));
        assert_ne!(bi.of(&a), bi.of(&SubjectId::parse("+14255550101").unwrap()));
    }
}
