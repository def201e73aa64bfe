# Renders the cluster TOML (read by geo.config) and the tier file. No resources: the
# output is fed to every host's cloud-init, and the tests render the same template with
# the example's defaults and load it with geo.config.loads.
#
# Every host holds the same file. Each member names its own certificate
# (<tls_dir>/<id>.pem, `xdc certs init`'s file names), which only that member's host
# holds; [etcd] names host.pem, which on every host is that host's own certificate.

locals {
  members = [for m in var.members : merge(m, {
    cert = "${var.tls_dir}/${m.id}.pem"
    key  = "${var.tls_dir}/${m.id}-key.pem"
  })]
  cluster_toml = templatefile("${path.module}/cluster.toml.tftpl", {
    cluster            = var.cluster_name
    failover           = var.failover
    lease_ttl_s        = var.lease_ttl_s
    etcd_endpoints     = var.etcd_endpoints
    regions            = var.regions
    members            = local.members
    data_dir           = var.data_dir
    tls                = var.tls_dir != ""
    tls_dir            = var.tls_dir
    client_certs       = var.client_certs
    etcd_user          = var.etcd_user
    etcd_password_file = var.etcd_password_file
    auth               = var.auth_file != ""
    auth_file          = var.auth_file
  })
  tiers_toml = templatefile("${path.module}/tiers.toml.tftpl", {
    tiers = var.tiers
  })
}
