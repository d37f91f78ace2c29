-- A renewal whose response never reached the cluster must not strand it: the intermediate the
-- cluster last renewed with stays usable until the newest one is presented (which makes the
-- newest the previous, and so on). At most two credentials per cluster are ever live.
ALTER TABLE clusters ADD COLUMN previous_serial TEXT;
