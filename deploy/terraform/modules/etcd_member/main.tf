# One etcd member, TLS for clients and peers with client certificates demanded, and
# password authentication (turned on by the first member). The release is pinned by
# version and SHA-256: a download that does not match is refused, so a compromised mirror
# cannot put another binary on the host.

locals {
  name         = "${var.name_prefix}-etcd-${var.member_name}"
  data_dir     = "/var/lib/etcd"
  tarball      = "etcd-v${var.etcd_version}-linux-amd64.tar.gz"
  download_url = "${var.etcd_download_base_url}/v${var.etcd_version}/${local.tarball}"
  install = templatefile("${path.module}/install-etcd.sh.tftpl", {
    etcd_version = var.etcd_version
    etcd_sha256  = var.etcd_sha256
    download_url = local.download_url
  })
  unit = templatefile("${path.module}/etcd.service.tftpl", {
    cluster_name        = var.cluster_name
    member_name         = var.member_name
    private_ip          = var.private_ip
    client_port         = var.client_port
    peer_port           = var.peer_port
    initial_cluster     = var.initial_cluster
    heartbeat_ms        = var.heartbeat_ms
    election_timeout_ms = var.election_timeout_ms
    data_dir            = local.data_dir
    tls_dir             = var.tls_dir
  })
  # The first member turns etcd authentication on (xdc etcd bootstrap-auth, idempotent:
  # it runs again after every boot and finds nothing to do).
  bootstrap_unit = templatefile("${path.module}/xdc-etcd-auth.service.tftpl", {
    cluster_name       = var.cluster_name
    root_password_file = var.root_password_file
  })
  files = merge(
    { "/etc/systemd/system/etcd.service" = local.unit },
    var.bootstrap_auth ? {
      "/etc/xdc/cluster.toml"                     = var.cluster_toml
      "/etc/systemd/system/xdc-etcd-auth.service" = local.bootstrap_unit
    } : {},
  )
}

module "host" {
  source = "../host"

  name               = local.name
  role               = "etcd"
  instance_type      = var.instance_type
  subnet_id          = var.subnet_id
  availability_zone  = var.availability_zone
  private_ip         = var.private_ip
  security_group_ids = var.security_group_ids
  kms_key_arn        = var.kms_key_arn
  root_volume_gb     = var.root_volume_gb
  data_volume_gb     = var.data_volume_gb
  # etcd fsyncs every entry: the gp3 baseline is plenty for coordination traffic.
  data_volume_iops = 3000
  service_user     = "etcd"
  data_dir         = local.data_dir
  files            = local.files
  units            = var.bootstrap_auth ? ["etcd.service", "xdc-etcd-auth.service"] : ["etcd.service"]
  role_script      = local.install
  install_xdc      = var.bootstrap_auth
  xdc_package      = var.xdc_package
  xdc_index_url    = var.xdc_index_url
  tls_dir          = var.tls_dir
  certificates     = [var.member_name] # its own server (and peer) certificate
  secret_files     = var.secret_files
  secrets          = var.secrets
  tags             = merge(var.tags, { EtcdMember = var.member_name })
}
