output "cluster_toml" {
  description = "The cluster TOML every host writes to /etc/xdc/cluster.toml."
  value       = local.cluster_toml
  precondition {
    # Without TLS, members would need a member token (geo/config.py peer_token_file),
    # which this module does not distribute, and client tokens would cross in plaintext.
    condition     = var.auth_file == "" || var.tls_dir != ""
    error_message = "auth_file (client auth) needs tls_dir (TLS): without TLS, replication would be open to anyone who reaches a peer port."
  }
}

output "tiers_toml" {
  description = "The tier file every host writes to /etc/xdc/tiers.toml."
  value       = local.tiers_toml
}
