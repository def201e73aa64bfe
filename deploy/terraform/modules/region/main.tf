# Everything of one region: its network, security groups, store nodes, engine hosts and
# etcd members. Called once per region with that region's aliased provider.

module "network" {
  source = "../network"

  name                    = var.name_prefix
  vpc_cidr                = var.vpc_cidr
  availability_zones      = var.availability_zones
  private_subnet_cidrs    = var.private_subnet_cidrs
  public_subnet_cidr      = var.public_subnet_cidr
  flow_log_retention_days = var.flow_log_retention_days
  tags                    = var.tags
}

module "security" {
  source = "../security"

  name          = var.name_prefix
  vpc_id        = module.network.vpc_id
  client_cidrs  = var.client_cidrs
  cluster_cidrs = var.cluster_cidrs
  ports         = var.ports
  tags          = var.tags
}

module "store" {
  source   = "../store_node"
  for_each = { for n in var.store_nodes : n.id => n }

  name_prefix        = var.name_prefix
  cluster_name       = var.cluster_name
  member_id          = each.key
  region_name        = var.region_name
  voter              = each.value.voter
  private_ip         = each.value.ip
  subnet_id          = module.network.private_subnet_ids[each.value.az_index]
  availability_zone  = var.availability_zones[each.value.az_index]
  instance_type      = var.instance_types.store
  security_group_ids = [module.security.store_sg_id]
  kms_key_arn        = module.network.kms_key_arn
  root_volume_gb     = var.root_volume_gb
  data_volume_gb     = var.store_data_volume_gb
  data_volume_iops   = var.store_data_volume_iops
  data_dir           = var.store_data_dir
  cluster_toml       = var.cluster_toml
  tiers_toml         = var.tiers_toml
  tls_dir            = var.tls_dir
  secrets            = var.secrets
  secret_files       = var.node_secret_files
  xdc_package        = var.xdc_package
  xdc_index_url      = var.xdc_index_url
  client_port        = var.ports.client
  tags               = var.tags
}

module "engine" {
  source   = "../engine_host"
  for_each = { for e in var.engine_hosts : e.id => e }

  name_prefix        = var.name_prefix
  cluster_name       = var.cluster_name
  engine_id          = each.key
  engine_group       = each.value.group
  region_name        = var.region_name
  private_ip         = each.value.ip
  subnet_id          = module.network.private_subnet_ids[each.value.az_index]
  availability_zone  = var.availability_zones[each.value.az_index]
  instance_type      = var.instance_types.engine
  security_group_ids = [module.security.engine_sg_id]
  kms_key_arn        = module.network.kms_key_arn
  root_volume_gb     = var.root_volume_gb
  cluster_toml       = var.cluster_toml
  tiers_toml         = var.tiers_toml
  exchange_toml      = var.exchange_toml
  store_endpoints    = var.store_endpoints
  auth_file          = var.auth_file
  tls_dir            = var.tls_dir
  secrets            = var.secrets
  secret_files       = var.node_secret_files
  xdc_package        = var.xdc_package
  xdc_index_url      = var.xdc_index_url
  engine_port        = var.ports.engine
  gateway_port       = var.ports.gateway
  tags               = var.tags
}

module "etcd" {
  source   = "../etcd_member"
  for_each = { for m in var.etcd_members : m.name => m }

  name_prefix            = var.name_prefix
  cluster_name           = var.cluster_name
  member_name            = each.key
  private_ip             = each.value.ip
  subnet_id              = module.network.private_subnet_ids[each.value.az_index]
  availability_zone      = var.availability_zones[each.value.az_index]
  instance_type          = var.instance_types.etcd
  security_group_ids     = [module.security.etcd_sg_id]
  kms_key_arn            = module.network.kms_key_arn
  root_volume_gb         = var.root_volume_gb
  data_volume_gb         = var.etcd_data_volume_gb
  initial_cluster        = var.etcd_initial_cluster
  etcd_version           = var.etcd_version
  etcd_sha256            = var.etcd_sha256
  etcd_download_base_url = var.etcd_download_base_url
  heartbeat_ms           = var.etcd_heartbeat_ms
  election_timeout_ms    = var.etcd_election_timeout_ms
  client_port            = var.ports.etcd_client
  peer_port              = var.ports.etcd_peer
  tls_dir                = var.tls_dir
  secrets                = var.secrets
  bootstrap_auth         = each.value.bootstrap_auth
  secret_files           = each.value.bootstrap_auth ? var.etcd_bootstrap_secret_files : {}
  cluster_toml           = var.cluster_toml
  root_password_file     = var.etcd_root_password_file
  xdc_package            = var.xdc_package
  xdc_index_url          = var.xdc_index_url
  tags                   = var.tags
}
