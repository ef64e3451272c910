-- The most common filtered listing — one carrier's records of one category,
-- newest first, through a keyset cursor — reads exactly one page of this
-- index instead of skipping the carrier's other categories.
CREATE INDEX transfers_carrier_category_log ON transfers (carrier_id, category, occurred_at, id);
