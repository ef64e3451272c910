-- Key lifecycle: retired master-key versions and per-data-key encryption
-- counts (the AES-GCM nonce budget).

-- A retired master-key version wraps nothing any more; its material is
-- erased (`wrapped` emptied) and `retired_at` says when.
ALTER TABLE keyring ADD COLUMN retired_at BIGINT;

-- Encryptions made with each subject (data) key. A key is replaced long
-- before 2^32 (random 96-bit nonces, NIST SP 800-38D §8.3): the replaced key
-- keeps decrypting what it sealed, under a generation-suffixed blind index
-- (the 32-byte index followed by the key's 16-byte id), so that a subject's
-- keys are exactly those whose index starts with the subject's.
ALTER TABLE subject_keys ADD COLUMN seals BIGINT NOT NULL DEFAULT 0;

-- Records' slots sealed before this migration: one encryption each.
UPDATE subject_keys SET seals =
    (SELECT COUNT(*) FROM transfer_slots s WHERE s.subject_key_id = subject_keys.id)
  + (SELECT COUNT(*) FROM consents c WHERE c.subject_key_id = subject_keys.id);
