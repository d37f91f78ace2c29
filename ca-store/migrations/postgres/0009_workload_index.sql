-- The (cluster, identity) index served only its cluster prefix: no query looks a workload
-- certificate up by identity. Its identity part scattered every insert across the index (one
-- page per certificate written at each group commit). (cluster, not_after) grows at its end,
-- since notAfter is issuance time plus a TTL, and serves the rotation gate's count of live
-- certificates per cluster.
DROP INDEX workload_certificates_cluster;
CREATE INDEX workload_certificates_cluster_not_after ON workload_certificates (cluster, not_after);
