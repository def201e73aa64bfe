# Three-region xdc cluster on AWS: one VPC per region, peered pairwise; store nodes
# (voters and a non-voting standby), matching engine hosts and a 3-member etcd cluster
# spread so that losing any one region keeps both the xdc quorum and etcd's.
#
# Every host's address is fixed up front (cidrhost) so that the cluster config, which
# names every member, can be rendered before any instance exists.

provider "aws" {
  alias  = "r0"
  region = var.regions[0].aws_region
  default_tags {
    tags = merge(var.tags, { XdcCluster = var.cluster_name, XdcRegion = var.regions[0].name })
  }
}

provider "aws" {
  alias  = "r1"
  region = var.regions[1].aws_region
  default_tags {
    tags = merge(var.tags, { XdcCluster = var.cluster_name, XdcRegion = var.regions[1].name })
  }
}

provider "aws" {
  alias  = "r2"
  region = var.regions[2].aws_region
  default_tags {
    tags = merge(var.tags, { XdcCluster = var.cluster_name, XdcRegion = var.regions[2].name })
  }
}

locals {
  store_data_dir = "/var/lib/xdc"
  tls_dir        = "/etc/xdc/tls"
  module_tags    = { XdcCluster = var.cluster_name }

  region_index = { for i, r in var.regions : r.name => i }
  # Subnet 0 of each VPC holds the NAT gateway; subnet 1+k is the private subnet of AZ k.
  public_subnets  = [for r in var.regions : cidrsubnet(r.vpc_cidr, 8, 0)]
  private_subnets = [for r in var.regions : [for k, az in r.availability_zones : cidrsubnet(r.vpc_cidr, 8, 1 + k)]]
  cluster_cidrs   = [for r in var.regions : r.vpc_cidr]

  # Host numbers within a private subnet: store nodes from .10, engines from .50, etcd
  # from .100, in list order among the hosts of the same kind in the same subnet.
  store_nodes = [for i, n in var.store_nodes : merge(n, {
    ip = cidrhost(local.private_subnets[local.region_index[n.region]][n.az_index],
    10 + length([for j, o in var.store_nodes : o if j < i && o.region == n.region && o.az_index == n.az_index]))
  })]
  engine_hosts = [for i, e in var.engine_hosts : merge(e, {
    ip = cidrhost(local.private_subnets[local.region_index[e.region]][e.az_index],
    50 + length([for j, o in var.engine_hosts : o if j < i && o.region == e.region && o.az_index == e.az_index]))
  })]
  etcd_members = [for i, m in var.etcd_members : merge(m, {
    ip = cidrhost(local.private_subnets[local.region_index[m.region]][m.az_index],
    100 + length([for j, o in var.etcd_members : o if j < i && o.region == m.region && o.az_index == m.az_index]))
  })]

  etcd_endpoints       = [for m in local.etcd_members : "${m.ip}:${var.ports.etcd_client}"]
  etcd_initial_cluster = join(",", [for m in local.etcd_members : "${m.name}=https://${m.ip}:${var.ports.etcd_peer}"])
  store_endpoints      = join(",", [for n in local.store_nodes : "${n.ip}:${var.ports.client}"])
  # Engine groups and symbols, for the gateways (`xdc exchange init` appends them once).
  exchange_toml = file(var.exchange_file)
  cluster_members = [for n in local.store_nodes : {
    id     = n.id
    region = n.region
    client = "${n.ip}:${var.ports.client}"
    peer   = "${n.ip}:${var.ports.peer}"
    voter  = n.voter
  }]

  # Per-region slices, in the shape modules/region expects.
  region_stores  = [for r in var.regions : [for n in local.store_nodes : { id = n.id, voter = n.voter, az_index = n.az_index, ip = n.ip } if n.region == r.name]]
  region_engines = [for r in var.regions : [for e in local.engine_hosts : { id = e.id, group = e.group, az_index = e.az_index, ip = e.ip } if e.region == r.name]]
  # The first etcd member turns etcd authentication on (idempotently, at every boot).
  region_etcd = [for r in var.regions : [for i, m in local.etcd_members : { name = m.name, az_index = m.az_index, ip = m.ip, bootstrap_auth = i == 0 } if m.region == r.name]]

  # Secrets (created by operators, never by Terraform): one per file `xdc certs init`
  # writes (<name>.pem, <name>-key.pem, ca.pem), the two etcd passwords and the auth
  # file, named <prefix><file>. Each host's role may read only the ones it fetches.
  secrets_region = var.secrets.region != "" ? var.secrets.region : var.regions[0].aws_region
  secret_prefix  = var.secrets.prefix != "" ? var.secrets.prefix : "${var.cluster_name}/"
  secrets = {
    region       = local.secrets_region
    prefix       = local.secret_prefix
    arn_prefix   = "arn:${data.aws_partition.current.partition}:secretsmanager:${local.secrets_region}:${data.aws_caller_identity.current.account_id}:secret:${local.secret_prefix}"
    kms_key_arns = var.secrets.kms_key_arns
  }
  etcd_user               = "${var.cluster_name}-node"
  etcd_password_file      = "/etc/xdc/etcd-node.password"
  etcd_root_password_file = "/etc/xdc/etcd-root.password"
  auth_file               = var.client_auth ? "/etc/xdc/auth.toml" : ""
  node_secret_files = merge(
    { (local.etcd_password_file) = "etcd-node.password" },
    var.client_auth ? { (local.auth_file) = "auth.toml" } : {},
  )
  etcd_bootstrap_secret_files = {
    (local.etcd_password_file)      = "etcd-node.password"
    (local.etcd_root_password_file) = "etcd-root.password"
  }

  # Every certificate of the cluster: name => role and the address its holder serves at.
  certificates = merge(
    { for n in local.store_nodes : n.id => { role = "member", ip = n.ip } },
    { for e in local.engine_hosts : e.id => { role = "engine", ip = e.ip } },
    { for e in local.engine_hosts : "${e.id}-gw" => { role = "gateway", ip = e.ip } },
    { for m in local.etcd_members : m.name => { role = "etcd", ip = m.ip } },
  )
  role_flags = { member = "--members", engine = "--engines", gateway = "--gateways", etcd = "--etcd" }
  certs_init_command = join(" ", concat(
    ["xdc certs init --dir tls --cluster ${var.cluster_name}"],
    [for role, flag in local.role_flags : "${flag} ${join(",", [for name, c in local.certificates : name if c.role == role])}"],
    ["--admins admin"],
    [for name, c in local.certificates : "--san ${name}=${c.ip}"],
  ))
}

data "aws_caller_identity" "current" {
  provider = aws.r0
}

data "aws_partition" "current" {
  provider = aws.r0
}

# A warning, not an error: a lease shorter than an etcd election is a choice (a faster
# region failover), but then every loss of etcd's leader fails the store's leader over.
check "lease_outlasts_an_etcd_election" {
  assert {
    condition     = var.lease_ttl_s * 1000 >= 4 * var.etcd_election_timeout_ms + 4 * var.etcd_heartbeat_ms
    error_message = "lease_ttl_s (${var.lease_ttl_s} s) is shorter than about 4 etcd election timeouts plus 4 heartbeats (${4 * var.etcd_election_timeout_ms + 4 * var.etcd_heartbeat_ms} ms): each loss of etcd's leader (a rolling etcd upgrade) will fail the store's leader region over instead of being outlasted."
  }
}

module "cluster_config" {
  source = "../../modules/cluster_config"

  cluster_name       = var.cluster_name
  failover           = var.failover
  lease_ttl_s        = var.lease_ttl_s
  etcd_endpoints     = local.etcd_endpoints
  regions            = [for r in var.regions : r.name]
  members            = local.cluster_members
  data_dir           = local.store_data_dir
  tls_dir            = local.tls_dir
  client_certs       = var.client_certs
  etcd_user          = local.etcd_user
  etcd_password_file = local.etcd_password_file
  auth_file          = local.auth_file
  tiers              = var.tiers
}

module "region_0" {
  source    = "../../modules/region"
  providers = { aws = aws.r0 }

  cluster_name                = var.cluster_name
  name_prefix                 = "${var.cluster_name}-${var.regions[0].name}"
  region_name                 = var.regions[0].name
  vpc_cidr                    = var.regions[0].vpc_cidr
  availability_zones          = var.regions[0].availability_zones
  private_subnet_cidrs        = local.private_subnets[0]
  public_subnet_cidr          = local.public_subnets[0]
  cluster_cidrs               = local.cluster_cidrs
  client_cidrs                = var.client_cidrs
  ports                       = var.ports
  store_nodes                 = local.region_stores[0]
  engine_hosts                = local.region_engines[0]
  etcd_members                = local.region_etcd[0]
  etcd_initial_cluster        = local.etcd_initial_cluster
  etcd_version                = var.etcd_version
  etcd_sha256                 = var.etcd_sha256
  etcd_download_base_url      = var.etcd_download_base_url
  etcd_heartbeat_ms           = var.etcd_heartbeat_ms
  etcd_election_timeout_ms    = var.etcd_election_timeout_ms
  cluster_toml                = module.cluster_config.cluster_toml
  tiers_toml                  = module.cluster_config.tiers_toml
  store_data_dir              = local.store_data_dir
  tls_dir                     = local.tls_dir
  secrets                     = local.secrets
  node_secret_files           = local.node_secret_files
  etcd_bootstrap_secret_files = local.etcd_bootstrap_secret_files
  etcd_root_password_file     = local.etcd_root_password_file
  store_endpoints             = local.store_endpoints
  exchange_toml               = local.exchange_toml
  auth_file                   = local.auth_file
  xdc_package                 = var.xdc_package
  xdc_index_url               = var.xdc_index_url
  instance_types              = var.instance_types
  root_volume_gb              = var.root_volume_gb
  store_data_volume_gb        = var.store_data_volume_gb
  store_data_volume_iops      = var.store_data_volume_iops
  etcd_data_volume_gb         = var.etcd_data_volume_gb
  flow_log_retention_days     = var.flow_log_retention_days
  tags                        = local.module_tags
}

module "region_1" {
  source    = "../../modules/region"
  providers = { aws = aws.r1 }

  cluster_name                = var.cluster_name
  name_prefix                 = "${var.cluster_name}-${var.regions[1].name}"
  region_name                 = var.regions[1].name
  vpc_cidr                    = var.regions[1].vpc_cidr
  availability_zones          = var.regions[1].availability_zones
  private_subnet_cidrs        = local.private_subnets[1]
  public_subnet_cidr          = local.public_subnets[1]
  cluster_cidrs               = local.cluster_cidrs
  client_cidrs                = var.client_cidrs
  ports                       = var.ports
  store_nodes                 = local.region_stores[1]
  engine_hosts                = local.region_engines[1]
  etcd_members                = local.region_etcd[1]
  etcd_initial_cluster        = local.etcd_initial_cluster
  etcd_version                = var.etcd_version
  etcd_sha256                 = var.etcd_sha256
  etcd_download_base_url      = var.etcd_download_base_url
  etcd_heartbeat_ms           = var.etcd_heartbeat_ms
  etcd_election_timeout_ms    = var.etcd_election_timeout_ms
  cluster_toml                = module.cluster_config.cluster_toml
  tiers_toml                  = module.cluster_config.tiers_toml
  store_data_dir              = local.store_data_dir
  tls_dir                     = local.tls_dir
  secrets                     = local.secrets
  node_secret_files           = local.node_secret_files
  etcd_bootstrap_secret_files = local.etcd_bootstrap_secret_files
  etcd_root_password_file     = local.etcd_root_password_file
  store_endpoints             = local.store_endpoints
  exchange_toml               = local.exchange_toml
  auth_file                   = local.auth_file
  xdc_package                 = var.xdc_package
  xdc_index_url               = var.xdc_index_url
  instance_types              = var.instance_types
  root_volume_gb              = var.root_volume_gb
  store_data_volume_gb        = var.store_data_volume_gb
  store_data_volume_iops      = var.store_data_volume_iops
  etcd_data_volume_gb         = var.etcd_data_volume_gb
  flow_log_retention_days     = var.flow_log_retention_days
  tags                        = local.module_tags
}

module "region_2" {
  source    = "../../modules/region"
  providers = { aws = aws.r2 }

  cluster_name                = var.cluster_name
  name_prefix                 = "${var.cluster_name}-${var.regions[2].name}"
  region_name                 = var.regions[2].name
  vpc_cidr                    = var.regions[2].vpc_cidr
  availability_zones          = var.regions[2].availability_zones
  private_subnet_cidrs        = local.private_subnets[2]
  public_subnet_cidr          = local.public_subnets[2]
  cluster_cidrs               = local.cluster_cidrs
  client_cidrs                = var.client_cidrs
  ports                       = var.ports
  store_nodes                 = local.region_stores[2]
  engine_hosts                = local.region_engines[2]
  etcd_members                = local.region_etcd[2]
  etcd_initial_cluster        = local.etcd_initial_cluster
  etcd_version                = var.etcd_version
  etcd_sha256                 = var.etcd_sha256
  etcd_download_base_url      = var.etcd_download_base_url
  etcd_heartbeat_ms           = var.etcd_heartbeat_ms
  etcd_election_timeout_ms    = var.etcd_election_timeout_ms
  cluster_toml                = module.cluster_config.cluster_toml
  tiers_toml                  = module.cluster_config.tiers_toml
  store_data_dir              = local.store_data_dir
  tls_dir                     = local.tls_dir
  secrets                     = local.secrets
  node_secret_files           = local.node_secret_files
  etcd_bootstrap_secret_files = local.etcd_bootstrap_secret_files
  etcd_root_password_file     = local.etcd_root_password_file
  store_endpoints             = local.store_endpoints
  exchange_toml               = local.exchange_toml
  auth_file                   = local.auth_file
  xdc_package                 = var.xdc_package
  xdc_index_url               = var.xdc_index_url
  instance_types              = var.instance_types
  root_volume_gb              = var.root_volume_gb
  store_data_volume_gb        = var.store_data_volume_gb
  store_data_volume_iops      = var.store_data_volume_iops
  etcd_data_volume_gb         = var.etcd_data_volume_gb
  flow_log_retention_days     = var.flow_log_retention_days
  tags                        = local.module_tags
}

# Pairwise peering: each region routes only the other regions' VPC CIDRs over it.
module "peering_0_1" {
  source    = "../../modules/peering"
  providers = { aws.requester = aws.r0, aws.accepter = aws.r1 }

  name                     = "${var.cluster_name}-${var.regions[0].name}-${var.regions[1].name}"
  requester_vpc_id         = module.region_0.vpc_id
  requester_cidr           = var.regions[0].vpc_cidr
  requester_route_table_id = module.region_0.private_route_table_id
  accepter_vpc_id          = module.region_1.vpc_id
  accepter_cidr            = var.regions[1].vpc_cidr
  accepter_route_table_id  = module.region_1.private_route_table_id
  accepter_region          = var.regions[1].aws_region
  tags                     = local.module_tags
}

module "peering_0_2" {
  source    = "../../modules/peering"
  providers = { aws.requester = aws.r0, aws.accepter = aws.r2 }

  name                     = "${var.cluster_name}-${var.regions[0].name}-${var.regions[2].name}"
  requester_vpc_id         = module.region_0.vpc_id
  requester_cidr           = var.regions[0].vpc_cidr
  requester_route_table_id = module.region_0.private_route_table_id
  accepter_vpc_id          = module.region_2.vpc_id
  accepter_cidr            = var.regions[2].vpc_cidr
  accepter_route_table_id  = module.region_2.private_route_table_id
  accepter_region          = var.regions[2].aws_region
  tags                     = local.module_tags
}

module "peering_1_2" {
  source    = "../../modules/peering"
  providers = { aws.requester = aws.r1, aws.accepter = aws.r2 }

  name                     = "${var.cluster_name}-${var.regions[1].name}-${var.regions[2].name}"
  requester_vpc_id         = module.region_1.vpc_id
  requester_cidr           = var.regions[1].vpc_cidr
  requester_route_table_id = module.region_1.private_route_table_id
  accepter_vpc_id          = module.region_2.vpc_id
  accepter_cidr            = var.regions[2].vpc_cidr
  accepter_route_table_id  = module.region_2.private_route_table_id
  accepter_region          = var.regions[2].aws_region
  tags                     = local.module_tags
}
