# An xdc store node: a voter or a non-voting standby. Its LMDB environment lives on a
# separate encrypted gp3 volume that survives instance replacement.

locals {
  name = "${var.name_prefix}-store-${var.member_id}"
  unit = templatefile("${path.module}/xdc-store.service.tftpl", {
    cluster_name = var.cluster_name
    member_id    = var.member_id
    data_dir     = var.data_dir
  })
}

module "host" {
  source = "../host"

  name               = local.name
  role               = "store"
  instance_type      = var.instance_type
  subnet_id          = var.subnet_id
  availability_zone  = var.availability_zone
  private_ip         = var.private_ip
  security_group_ids = var.security_group_ids
  kms_key_arn        = var.kms_key_arn
  root_volume_gb     = var.root_volume_gb
  data_volume_gb     = var.data_volume_gb
  data_volume_iops   = var.data_volume_iops
  service_user       = "xdc"
  data_dir           = var.data_dir
  files = {
    "/etc/xdc/cluster.toml"                 = var.cluster_toml
    "/etc/xdc/tiers.toml"                   = var.tiers_toml
    "/etc/systemd/system/xdc-store.service" = local.unit
  }
  units         = ["xdc-store.service"]
  role_script   = ""
  install_xdc   = true
  xdc_package   = var.xdc_package
  xdc_index_url = var.xdc_index_url
  tls_dir       = var.tls_dir
  certificates  = [var.member_id] # its own: xdc://<cluster>/member/<id>
  secret_files  = var.secret_files
  secrets       = var.secrets
  tags = merge(var.tags, {
    XdcMember = var.member_id
    XdcRegion = var.region_name
    XdcVoter  = tostring(var.voter)
  })
}
