//! The key hierarchy at run time: the root key from configuration unwraps
//! the versioned master keys and the blind-index key kept in the database;
//! master keys unwrap per-subject data keys, which are cached unwrapped.

use std::collections::BTreeMap;
use std::sync::RwLock;

use anyhow::Context;
use uuid::Uuid;

use super::{BlindIndex, IntegrityError, Key, RawKey};
use crate::storage::{self, keys::KeyringRow, keys::SubjectKeyRow, Db, Tx};

const MASTER: &str = "master";
const BLIND_INDEX: &str = "blind_index";
const SIGNING: &str = "signing";
const PURPOSES: [&str; 3] = [MASTER, BLIND_INDEX, SIGNING];
/// Unwrapped subject keys kept in memory; each costs about 1 KiB (AES key
/// schedule and GHASH tables), so this bounds the cache near 10 MiB.
const SUBJECT_KEY_CACHE: usize = 10_000;

pub struct Keyring {
    root: Key,
    masters: RwLock<BTreeMap<i64, Key>>,
    /// Master-key versions the database says are retired.
    retired: RwLock<std::collections::BTreeSet<i64>>,
    /// Ed25519 keys that sign exports, receipts and audit heads, by version.
    signers: RwLock<BTreeMap<i64, ed25519_dalek::SigningKey>>,
    blind: BlindIndex,
    cache: quick_cache::sync::Cache<Uuid, Key>,
    /// Why a re-read of the keyring could not be taken in (a key version
    /// this instance's root key does not open), with the newest
    /// `created_at` of the rows it read; cleared only by a re-read that
    /// took in rows at least as new, so that a slower re-read of older rows
    /// cannot clear it.
    unreadable: RwLock<Option<(i64, String)>>,
}

/// The additional data binding a root-wrapped key to its purpose and version.
fn root_aad(purpose: &str, version: i64) -> Vec<u8> {
    match purpose {
        MASTER => format!("tl/master/v{version}").into_bytes(),
        SIGNING => format!("tl/signing/v{version}").into_bytes(),
        _ => format!("tl/blind-index/v{version}").into_bytes(),
    }
}

fn subject_aad(id: Uuid, carrier: &str, master_version: i64) -> Vec<u8> {
    format!("tl/subject-key/{id}/{carrier}/m{master_version}").into_bytes()
}

const WRONG_ROOT: &str =
    "the master key (LEDGER_MASTER_KEY / LEDGER_MASTER_KEY_FILE) does not open \
     this database's keys: it is not the key the database was created with (or last rotated to)";

/// A kind of root-wrapped key that can be rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotatable {
    Master,
    Signing,
}

impl Rotatable {
    fn purpose(self) -> &'static str {
        match self {
            Self::Master => MASTER,
            Self::Signing => SIGNING,
        }
    }
}

/// What [`Keyring::add_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewVersion {
    Added(i64),
    /// A concurrent rotation took that version number first.
    Raced,
    /// The keyring is no longer under this instance's root key.
    RootRotated,
}

impl Keyring {
    /// Whether this database already has keys (sealed under some root key).
    pub async fn exists(db: &Db) -> anyhow::Result<bool> {
        Ok(!storage::keys::keyring(db).await?.is_empty())
    }

    /// Loads the keyring, creating master key v1, the blind-index key and
    /// the signing key on first start. Fails if `root` is not the key this
    /// database was set up with.
    pub async fn open(db: &Db, root: &RawKey) -> anyhow::Result<Self> {
        let root = Key::from_bytes(root);
        let mut rows = storage::keys::keyring(db).await?;
        if PURPOSES
            .iter()
            .any(|p| !rows.iter().any(|r| r.purpose == *p))
        {
            let now = storage::micros(chrono::Utc::now());
            let mut tx = db.begin().await?;
            for purpose in PURPOSES {
                let raw = Key::generate_raw();
                storage::keys::insert_keyring(
                    &mut tx,
                    purpose,
                    1,
                    &root.wrap(&root_aad(purpose, 1), &raw),
                    now,
                )
                .await?;
            }
            tx.commit().await?;
            rows = storage::keys::keyring(db).await?;
        }
        let blind = rows
            .iter()
            .find(|r| r.purpose == BLIND_INDEX)
            .context("blind-index key missing")?;
        let blind_raw = root
            .unwrap_key(&root_aad(BLIND_INDEX, blind.version), &blind.wrapped)
            .context(WRONG_ROOT)?;
        let blind = BlindIndex::new(&blind_raw);
        let ring = Self {
            root,
            masters: RwLock::new(BTreeMap::new()),
            retired: RwLock::new(Default::default()),
            signers: RwLock::new(BTreeMap::new()),
            blind,
            cache: quick_cache::sync::Cache::new(SUBJECT_KEY_CACHE),
            unreadable: RwLock::new(None),
        };
        ring.load(&rows)?;
        anyhow::ensure!(
            !ring.masters.read().expect("lock").is_empty(),
            "no master key in force"
        );
        Ok(ring)
    }

    /// Takes in the keyring rows: new versions are unwrapped. A retired
    /// version's material is gone from the database; a process that loaded
    /// it before keeps it in memory (never to wrap: newer versions exist),
    /// so a read that fetched a row just before its rewrap still opens it.
    fn load(&self, rows: &[KeyringRow]) -> anyhow::Result<()> {
        let mut masters = self.masters.write().expect("lock");
        let mut signers = self.signers.write().expect("lock");
        let mut retired = self.retired.write().expect("lock");
        for r in rows {
            if r.purpose == MASTER && r.retired_at.is_some() {
                retired.insert(r.version);
            }
            match r.purpose.as_str() {
                MASTER if r.retired_at.is_none() && !masters.contains_key(&r.version) => {
                    let raw = self
                        .root
                        .unwrap_key(&root_aad(MASTER, r.version), &r.wrapped)
                        .context(WRONG_ROOT)?;
                    masters.insert(r.version, Key::from_bytes(&raw));
                }
                SIGNING if !signers.contains_key(&r.version) => {
                    let seed = self
                        .root
                        .unwrap_key(&root_aad(SIGNING, r.version), &r.wrapped)
                        .context(WRONG_ROOT)?;
                    signers.insert(r.version, ed25519_dalek::SigningKey::from_bytes(&seed));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Re-reads the keyring: versions another instance (or the CLI) added
    /// or retired take effect here.
    pub async fn refresh(&self, db: &Db) -> anyhow::Result<()> {
        let rows = storage::keys::keyring(db).await?;
        let newest = rows.iter().map(|r| r.created_at).max().unwrap_or_default();
        let loaded = self.load(&rows);
        let mut unreadable = self.unreadable.write().expect("lock");
        match &loaded {
            Err(e) => *unreadable = Some((newest, format!("{e:#}"))),
            Ok(()) if unreadable.as_ref().is_some_and(|(at, _)| newest >= *at) => {
                *unreadable = None
            }
            Ok(()) => {}
        }
        loaded
    }

    /// Why this instance cannot take in the keyring as it now is (a version
    /// added under a root key it does not hold), if it cannot: it can then
    /// neither write nor decrypt what uses that version.
    pub fn unreadable(&self) -> Option<String> {
        self.unreadable
            .read()
            .expect("lock")
            .as_ref()
            .map(|(_, why)| why.clone())
    }

    /// Makes sure every master-key version in `versions` is known, reading
    /// the keyring again if one is not (another instance rotated).
    pub async fn ensure(
        &self,
        db: &Db,
        versions: impl IntoIterator<Item = i64>,
    ) -> anyhow::Result<()> {
        let unknown = {
            let masters = self.masters.read().expect("lock");
            versions.into_iter().any(|v| !masters.contains_key(&v))
        };
        if unknown {
            self.refresh(db).await?;
        }
        Ok(())
    }

    /// Adds the next version of a rotatable key, wrapped under the root key,
    /// inside `tx`. Takes effect here after commit and `refresh`. Refused
    /// when the root key this instance holds no longer opens the keyring:
    /// `keys rotate-root` ran beside it, and a version wrapped under the old
    /// root would leave the ledger opened by neither key.
    pub async fn add_version(&self, tx: &mut Tx, kind: Rotatable) -> anyhow::Result<NewVersion> {
        storage::TxLock::Keyring.take(tx, false).await?;
        let rows = storage::keys::keyring_for_update(tx).await?;
        let live = rows
            .iter()
            .find(|r| r.retired_at.is_none())
            .context("the keyring is empty")?;
        if self
            .root
            .unwrap_key(&root_aad(&live.purpose, live.version), &live.wrapped)
            .is_err()
        {
            return Ok(NewVersion::RootRotated);
        }
        let purpose = kind.purpose();
        let version = storage::keys::next_version(tx, purpose).await?;
        let raw = Key::generate_raw();
        let wrapped = self.root.wrap(&root_aad(purpose, version), &raw);
        let now = storage::micros(chrono::Utc::now());
        let inserted = storage::keys::insert_keyring(tx, purpose, version, &wrapped, now).await?;
        Ok(if inserted {
            NewVersion::Added(version)
        } else {
            NewVersion::Raced
        })
    }

    /// Rewraps every live keyring entry from the root key `old` to `new` in
    /// one transaction: either all entries move or none does.
    pub async fn rotate_root(db: &Db, old: &RawKey, new: &RawKey) -> anyhow::Result<usize> {
        let (old, new) = (Key::from_bytes(old), Key::from_bytes(new));
        let mut tx = db.begin().await?;
        // After any version a running instance is adding: its row is read
        // here and moved too; one added later sees the root has changed.
        storage::TxLock::Keyring.take(&mut tx, false).await?;
        let rows = storage::keys::keyring_for_update(&mut tx).await?;
        let mut moved = 0;
        for r in rows.iter().filter(|r| r.retired_at.is_none()) {
            let aad = root_aad(&r.purpose, r.version);
            let raw = match old.unwrap_key(&aad, &r.wrapped) {
                Ok(raw) => raw,
                // Already under the new key: a rerun after a crash between
                // this commit and the configuration change.
                Err(_) if new.unwrap_key(&aad, &r.wrapped).is_ok() => continue,
                Err(_) => anyhow::bail!(WRONG_ROOT),
            };
            let wrapped = new.wrap(&aad, &raw);
            anyhow::ensure!(
                storage::keys::rewrap_keyring(&mut tx, &r.purpose, r.version, &r.wrapped, &wrapped)
                    .await?,
                "keyring entry {} v{} changed during the rotation; run it again",
                r.purpose,
                r.version
            );
            moved += 1;
        }
        tx.commit().await?;
        Ok(moved)
    }

    pub fn blind(&self) -> &BlindIndex {
        &self.blind
    }

    /// The newest master-key version this instance knows.
    pub fn current_version(&self) -> i64 {
        self.masters
            .read()
            .expect("lock")
            .keys()
            .next_back()
            .copied()
            .unwrap_or(1)
    }

    /// The master-key versions in force (not retired), oldest first.
    pub fn master_versions(&self) -> Vec<i64> {
        let retired = self.retired.read().expect("lock");
        self.masters
            .read()
            .expect("lock")
            .keys()
            .filter(|v| !retired.contains(v))
            .copied()
            .collect()
    }

    fn master(&self, version: i64) -> Result<Key, IntegrityError> {
        self.masters
            .read()
            .expect("lock")
            .get(&version)
            .cloned()
            .ok_or(IntegrityError("unknown master key version"))
    }

    /// A fresh subject key, wrapped under master key `version` (read from
    /// the database in the writing transaction: `storage::keys::current_master`).
    pub fn new_subject_key(
        &self,
        carrier: &str,
        blind_index: Vec<u8>,
        version: i64,
    ) -> Result<(SubjectKeyRow, Key), IntegrityError> {
        let master = self.master(version)?;
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
            seals: 0,
        };
        Ok((row, key))
    }

    /// The subject key's wrapping under master key `version` instead.
    pub fn rewrap_subject(
        &self,
        row: &SubjectKeyRow,
        version: i64,
    ) -> Result<Vec<u8>, IntegrityError> {
        let old = self.master(row.master_version)?;
        let raw = old.unwrap_key(
            &subject_aad(row.id, &row.carrier_id, row.master_version),
            &row.wrapped_key,
        )?;
        Ok(self
            .master(version)?
            .wrap(&subject_aad(row.id, &row.carrier_id, version), &raw))
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
        let raw = self
            .master(version)?
            .unwrap_key(&subject_aad(id, carrier, version), wrapped)?;
        let key = Key::from_bytes(&raw);
        self.cache.insert(id, key.clone());
        Ok(key)
    }

    /// Seals `plaintext` directly under master key `version` (for small
    /// values such as export keys and request identifiers).
    pub fn seal_with_master(
        &self,
        version: i64,
        aad: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, IntegrityError> {
        Ok(self
            .master(version)?
            .seal(format!("{aad}/m{version}").as_bytes(), plaintext))
    }

    pub fn open_with_master(
        &self,
        version: i64,
        aad: &str,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, IntegrityError> {
        self.master(version)?
            .open(format!("{aad}/m{version}").as_bytes(), sealed)
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
