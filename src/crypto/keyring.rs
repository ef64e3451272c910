//! The key hierarchy at run time: the root key from configuration unwraps
//! the versioned master keys and the blind-index key kept in the database;
//! master keys unwrap per-subject data keys, which are cached unwrapped.

use std::collections::BTreeMap;
use std::sync::RwLock;

use anyhow::Context;
use uuid::Uuid;

use super::{BlindIndex, IntegrityError, Key, RawKey};
use crate::storage::{self, keys::SubjectKeyRow, Db};

const MASTER: &str = "master";
const BLIND_INDEX: &str = "blind_index";
const SIGNING: &str = "signing";
const PURPOSES: [&str; 3] = [MASTER, BLIND_INDEX, SIGNING];
/// Unwrapped subject keys kept in memory; each costs about 1 KiB (AES key
/// schedule and GHASH tables), so this bounds the cache near 10 MiB.
const SUBJECT_KEY_CACHE: usize = 10_000;

pub struct Keyring {
    masters: RwLock<BTreeMap<i64, Key>>,
    /// Ed25519 keys that sign exports, receipts and audit heads, by version.
    signers: RwLock<BTreeMap<i64, ed25519_dalek::SigningKey>>,
    blind: BlindIndex,
    cache: quick_cache::sync::Cache<Uuid, Key>,
}

fn master_aad(version: i64) -> Vec<u8> {
    format!("tl/master/v{version}").into_bytes()
}

fn signing_aad(version: i64) -> Vec<u8> {
    format!("tl/signing/v{version}").into_bytes()
}

fn subject_aad(id: Uuid, carrier: &str, master_version: i64) -> Vec<u8> {
    format!("tl/subject-key/{id}/{carrier}/m{master_version}").into_bytes()
}

impl Keyring {
    /// Loads the keyring, creating master key v1, the blind-index key and
    /// the signing key on first start. Fails if `root` is not the key this database was set up
    /// with.
    pub async fn open(db: &Db, root: &RawKey) -> anyhow::Result<Self> {
        let root = Key::from_bytes(root);
        let mut rows = storage::keys::keyring(db).await?;
        if PURPOSES
            .iter()
            .any(|p| !rows.iter().any(|r| r.purpose == *p))
        {
            let now = storage::micros(chrono::Utc::now());
            let mut tx = db.begin().await?;
            let master = Key::generate_raw();
            storage::keys::insert_keyring(
                &mut tx,
                MASTER,
                1,
                &root.wrap(&master_aad(1), &master),
                now,
            )
            .await?;
            let bi = Key::generate_raw();
            storage::keys::insert_keyring(
                &mut tx,
                BLIND_INDEX,
                1,
                &root.wrap(b"tl/blind-index/v1", &bi),
                now,
            )
            .await?;
            let seed = Key::generate_raw();
            storage::keys::insert_keyring(
                &mut tx,
                SIGNING,
                1,
                &root.wrap(&signing_aad(1), &seed),
                now,
            )
            .await?;
            tx.commit().await?;
            rows = storage::keys::keyring(db).await?;
        }

        let wrong_root =
            "the master key (LEDGER_MASTER_KEY / LEDGER_MASTER_KEY_FILE) does not open this \
                          database's keys: it is not the key the database was created with";
        let mut masters = BTreeMap::new();
        let mut blind = None;
        let mut signers = BTreeMap::new();
        for r in rows {
            match r.purpose.as_str() {
                MASTER => {
                    let raw = root
                        .unwrap_key(&master_aad(r.version), &r.wrapped)
                        .context(wrong_root)?;
                    masters.insert(r.version, Key::from_bytes(&raw));
                }
                BLIND_INDEX => {
                    let raw = root
                        .unwrap_key(b"tl/blind-index/v1", &r.wrapped)
                        .context(wrong_root)?;
                    blind = Some(BlindIndex::new(&raw));
                }
                SIGNING => {
                    let seed = root
                        .unwrap_key(&signing_aad(r.version), &r.wrapped)
                        .context(wrong_root)?;
                    signers.insert(r.version, ed25519_dalek::SigningKey::from_bytes(&seed));
                }
                _ => {}
            }
        }
        Ok(Self {
            masters: RwLock::new(masters),
            signers: RwLock::new(signers),
            blind: blind.context("blind-index key missing")?,
            cache: quick_cache::sync::Cache::new(SUBJECT_KEY_CACHE),
        })
    }

    pub fn blind(&self) -> &BlindIndex {
        &self.blind
    }

    pub fn current_version(&self) -> i64 {
        self.masters
            .read()
            .expect("lock")
            .keys()
            .next_back()
            .copied()
            .unwrap_or(1)
    }

    /// A fresh subject key, wrapped under the current master key.
    pub fn new_subject_key(&self, carrier: &str, blind_index: Vec<u8>) -> (SubjectKeyRow, Key) {
        let masters = self.masters.read().expect("lock");
        let (&version, master) = masters.iter().next_back().expect("at least one master key");
        let id = Uuid::now_v7();
        let raw = Key::generate_raw();
        let wrapped_key = master.wrap(&subject_aad(id, carrier, version), &raw);
        let key = Key::from_bytes(&raw);
        let row = SubjectKeyRow {
            id,
            carrier_id: carrier.to_string(),
            blind_index,
            master_version: version,
            wrapped_key,
        };
        (row, key)
    }

    /// Unwraps (or finds in the cache) the key of a stored subject-key row.
    pub fn subject_key(&self, row: &SubjectKeyRow) -> Result<Key, IntegrityError> {
        self.unwrap_subject(
            row.id,
            &row.carrier_id,
            row.master_version,
            &row.wrapped_key,
        )
    }

    pub fn unwrap_subject(
        &self,
        id: Uuid,
        carrier: &str,
        version: i64,
        wrapped: &[u8],
    ) -> Result<Key, IntegrityError> {
        if let Some(k) = self.cache.get(&id) {
            return Ok(k);
        }
        let masters = self.masters.read().expect("lock");
        let master = masters
            .get(&version)
            .ok_or(IntegrityError("unknown master key version"))?;
        let raw = master.unwrap_key(&subject_aad(id, carrier, version), wrapped)?;
        let key = Key::from_bytes(&raw);
        self.cache.insert(id, key.clone());
        Ok(key)
    }

    /// Seals `plaintext` directly under the current master key (for small
    /// values such as export keys and request identifiers).
    pub fn seal_with_master(&self, aad: &str, plaintext: &[u8]) -> (i64, Vec<u8>) {
        let masters = self.masters.read().expect("lock");
        let (&version, master) = masters.iter().next_back().expect("at least one master key");
        (
            version,
            master.seal(format!("{aad}/m{version}").as_bytes(), plaintext),
        )
    }

    pub fn open_with_master(
        &self,
        version: i64,
        aad: &str,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, IntegrityError> {
        let masters = self.masters.read().expect("lock");
        let master = masters
            .get(&version)
            .ok_or(IntegrityError("unknown master key version"))?;
        master.open(format!("{aad}/m{version}").as_bytes(), sealed)
    }

    /// Signs `message` with the current signing key: `(key id, signature)`.
    pub fn sign(&self, message: &[u8]) -> (String, ed25519_dalek::Signature) {
        use ed25519_dalek::Signer;
        let signers = self.signers.read().expect("lock");
        let (version, key) = signers.iter().next_back().expect("a signing key");
        (format!("v{version}"), key.sign(message))
    }

    /// Every signing key's public half, by key id, oldest first: old ones
    /// stay published so old exports and audit heads remain verifiable.
    pub fn verifying_keys(&self) -> Vec<(String, ed25519_dalek::VerifyingKey)> {
        let signers = self.signers.read().expect("lock");
        signers
            .iter()
            .map(|(v, k)| (format!("v{v}"), k.verifying_key()))
            .collect()
    }

    /// Drops a destroyed subject key from memory too.
    pub fn forget(&self, id: Uuid) {
        self.cache.remove(&id);
    }
}
