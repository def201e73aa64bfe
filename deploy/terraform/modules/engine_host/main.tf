# A matching engine host: a hot or warm replica of one engine group, and an order gateway.
# Engines are deterministic consumers of the store; they keep no state the store cannot
# rebuild (snapshots are written back as events), so the host has no data volume. It
# holds two certificates: the engine's (xdc://<cluster>/engine/<id>) and the gateway's
# (xdc://<cluster>/gateway/<id>-gw); each authenticates to the store with its own.

locals {
  name    = "${var.name_prefix}-engine-${var.engine_id}"
  gateway = "${var.engine_id}-gw"
  engine_unit = templatefile("${path.module}/xdc-engine.service.tftpl", {
    cluster_name    = var.cluster_name
    engine_id       = var.engine_id
    engine_group    = var.engine_group
    engine_port     = var.engine_port
    store_endpoints = var.store_endpoints
    tls_dir         = var.tls_dir
    auth            = var.auth_file != ""
    auth_file       = var.auth_file
  })
  gateway_unit = templatefile("${path.module}/xdc-gateway.service.tftpl", {
    cluster_name    = var.cluster_name
    gateway         = local.gateway
    gateway_port    = var.gateway_port
    store_endpoints = var.store_endpoints
    tls_dir         = var.tls_dir
    auth            = var.auth_file != ""
    auth_file       = var.auth_file
  })
}

module "host" {
  source = "../host"

  name               = local.name
  role               = "engine"
  instance_type      = var.instance_type
  subnet_id          = var.subnet_id
  availability_zone  = var.availability_zone
  private_ip         = var.private_ip
  security_group_ids = var.security_group_ids
  kms_key_arn        = var.kms_key_arn
  root_volume_gb     = var.root_volume_gb
  data_volume_gb     = 0
  data_volume_iops   = 3000
  service_user       = "xdc"
  data_dir           = "/var/lib/xdc-engine"
  files = {
    "/etc/xdc/cluster.toml"                   = var.cluster_toml
    "/etc/xdc/tiers.toml"                     = var.tiers_toml
    "/etc/xdc/exchange.toml"                  = var.exchange_toml
    "/etc/systemd/system/xdc-engine.service"  = local.engine_unit
    "/etc/systemd/system/xdc-gateway.service" = local.gateway_unit
  }
  units         = ["xdc-engine.service", "xdc-gateway.service"]
  role_script   = ""
  install_xdc   = true
  xdc_package   = var.xdc_package
  xdc_index_url = var.xdc_index_url
  tls_dir       = var.tls_dir
  certificates  = [var.engine_id, local.gateway] # its own two, no other host's
  secret_files  = var.secret_files
  secrets       = var.secrets
  tags = merge(var.tags, {
    XdcEngine      = var.engine_id
    XdcEngineGroup = var.engine_group
    XdcRegion      = var.region_name
  })
}
