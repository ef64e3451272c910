-- A number assignment that names no consent relies on its customer
-- tenant's customer-operator consents for the carrier: found by tenant,
-- not by a walk of every consent of the carrier (its subscribers'
-- data-subject consents included).
CREATE INDEX consents_tenant ON consents (carrier_id, customer_tenant_id);
