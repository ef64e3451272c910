//! Cryptography: the key hierarchy, envelope encryption of records, the
//! blind index for lookups. AES-256-GCM with random 96-bit nonces throughout.
//!
//! ```text
//! root key (configuration) ──wraps──> master key vN (database, versioned)
//!                          ──wraps──> blind-index key (database)
//! master key vN ──wraps──> subject key (one per data subject and carrier)
//! subject key  ──seals──> slot = record content key ‖ that subject's identifiers
//! content key  ──seals──> record body (the payload fields shared by all subjects)
//! ```

pub mod blind_index;
pub mod envelope;
pub mod keyring;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

pub use blind_index::BlindIndex;
pub use keyring::Keyring;

/// First byte of every sealed value: the format, for crypto agility.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;

/// Authentication of a sealed value failed: it was altered, moved to another
/// record, or opened with the wrong key.
#[derive(Debug, thiserror::Error)]
#[error("ciphertext failed authentication ({0})")]
pub struct IntegrityError(pub &'static str);

/// A 256-bit AES-GCM key; the raw bytes are wiped on drop.
#[derive(Clone)]
pub struct Key {
    cipher: Aes256Gcm,
}

pub type RawKey = Zeroizing<[u8; 32]>;

impl Key {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
        }
    }

    pub fn generate_raw() -> RawKey {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(k.as_mut());
        k
    }

    /// `FORMAT ‖ nonce ‖ ciphertext ‖ tag`, authenticated with `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != FORMAT_V1 {
            return Err(IntegrityError("malformed sealed value"));
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| IntegrityError("authentication tag mismatch"))
    }

    /// Seals another key under this one.
    pub fn wrap(&self, aad: &[u8], raw: &RawKey) -> Vec<u8> {
        self.seal(aad, raw.as_ref())
    }

    pub fn unwrap_key(&self, aad: &[u8], wrapped: &[u8]) -> Result<RawKey, IntegrityError> {
        let pt = self.open(aad, wrapped)?;
        let arr: [u8; 32] = pt
            .as_slice()
            .try_into()
            .map_err(|_| IntegrityError("wrapped key has the wrong length"))?;
        Ok(Zeroizing::new(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tampering_is_detected() {
        let k = Key::from_bytes(&Key::generate_raw());
        let mut sealed = k.seal(b"record-1", b"secret payload");
        assert_eq!(&*k.open(b"record-1", &sealed).unwrap(), b"secret payload");
        assert!(
            k.open(b"record-2", &sealed).is_err(),
            "moved to another record"
        );
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(k.open(b"record-1", &sealed).is_err(), "flipped bit");
        let other = Key::from_bytes(&Key::generate_raw());
        assert!(
            other.open(b"record-1", &k.seal(b"record-1", b"x")).is_err(),
            "wrong key"
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let k = Key::from_bytes(&Key::generate_raw());
        assert_ne!(k.seal(b"", b"same"), k.seal(b"", b"same"));
    }

    proptest! {
        #[test]
        fn round_trip(msg in proptest::collection::vec(any::<u8>(), 0..2048), aad in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = Key::from_bytes(&Key::generate_raw());
            let sealed = k.seal(&aad, &msg);
            prop_assert_eq!(&*k.open(&aad, &sealed).unwrap(), &msg);
        }

        #[test]
        fn any_single_byte_change_fails(msg in proptest::collection::vec(any::<u8>(), 1..256), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let k = Key::from_bytes(&Key::generate_raw());
            let mut sealed = k.seal(b"aad", &msg);
            let i = pos.index(sealed.len());
            sealed[i] ^= flip;
            prop_assert!(k.open(b"aad", &sealed).is_err());
        }
    }
}
