-- Least privilege for the ca-server role on PostgreSQL. Run once as the schema owner after
-- the first start (which applies the migrations), replacing ca_server with the server's role.
-- The server may append to the audit trail and read it, never change or remove a record.
REVOKE ALL ON audit_log, audit_checkpoints, audit_keys FROM ca_server;
GRANT SELECT, INSERT ON audit_log, audit_checkpoints, audit_keys TO ca_server;
GRANT SELECT, INSERT, UPDATE ON clusters, certificates, approval_requests, crls, leases TO ca_server;
-- Workload certificates are pruned after their retention period.
GRANT SELECT, INSERT, DELETE ON workload_certificates TO ca_server;
GRANT SELECT ON _sqlx_migrations TO ca_server;
-- Rotations change stage, and cluster reports are replaced on every report.
GRANT SELECT, INSERT, UPDATE ON rotations, cluster_reports TO ca_server;
-- Compromised keys are only ever added, never unblocked by the server.
GRANT SELECT, INSERT ON blocked_keys TO ca_server;
-- Cluster settings change on approval and when a cluster's agent pushes new keys.
GRANT SELECT, INSERT, UPDATE ON cluster_settings TO ca_server;
