-- The serial of each cluster's newest intermediate: the only one that may renew. Kept
-- explicitly because issue times tie within a second. Clusters enrolled before this
-- migration start from their newest unrevoked intermediate.
ALTER TABLE clusters ADD COLUMN current_serial TEXT;
UPDATE clusters SET current_serial = (
    SELECT c.serial FROM certificates c
    WHERE c.cluster = clusters.name AND c.revoked_at IS NULL
    ORDER BY c.issued_at DESC, c.not_before DESC, c.serial DESC
    LIMIT 1
);
