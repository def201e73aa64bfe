# Renders the cluster TOML (read by geo.config) and the tier file. No resources: the
# output is fed to every host's cloud-init, and the tests render the same template with
# the example's defaults and load it with geo.config.loads.

locals {
  cluster_toml = templatefile("${path.module}/cluster.toml.tftpl", {
    cluster        = var.cluster_name
    failover       = var.failover
    lease_ttl_s    = var.lease_ttl_s
    etcd_endpoints = var.etcd_endpoints
    regions        = var.regions
    members        = var.members
    data_dir       = var.data_dir
    tls            = var.tls_dir != ""
    tls_dir        = var.tls_dir
  })
  tiers_toml = templatefile("${path.module}/tiers.toml.tftpl", {
    tiers = var.tiers
  })
}
