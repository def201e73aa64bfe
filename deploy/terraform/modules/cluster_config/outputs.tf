output "cluster_toml" {
  description = "The cluster TOML every host writes to /etc/xdc/cluster.toml."
  value       = local.cluster_toml
}

output "tiers_toml" {
  description = "The tier file every host writes to /etc/xdc/tiers.toml."
  value       = local.tiers_toml
}
