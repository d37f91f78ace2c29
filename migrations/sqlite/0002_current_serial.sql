-- The serial of each cluster's newest intermediate: the only one that may renew. Kept
-- explicitly because issue times tie within a second.
ALTER TABLE clusters ADD COLUMN current_serial TEXT;
