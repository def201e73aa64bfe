variable "cluster_name" {
  description = "Name of the xdc cluster."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of this region's resource names (e.g. \"xdc-prod-use1\")."
  type        = string
}

variable "region_name" {
  description = "xdc region name (as in the cluster config), not the AWS region."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of the region's VPC."
  type        = string
}

variable "availability_zones" {
  description = "Availability zones of the private subnets."
  type        = list(string)
}

variable "private_subnet_cidrs" {
  description = "Private subnet CIDRs, one per availability zone."
  type        = list(string)
}

variable "public_subnet_cidr" {
  description = "CIDR of the NAT gateway's public subnet."
  type        = string
}

variable "cluster_cidrs" {
  description = "Every region's VPC CIDR: the only sources allowed on internal ports."
  type        = list(string)
}

variable "client_cidrs" {
  description = "Client networks allowed on the client API and the order gateway."
  type        = list(string)
}

variable "ports" {
  description = "TCP ports: client, peer, engine, gateway, etcd_client, etcd_peer."
  type = object({
    client      = number
    peer        = number
    engine      = number
    gateway     = number
    etcd_client = number
    etcd_peer   = number
  })
}

variable "store_nodes" {
  description = "Store nodes of this region with their fixed IPs."
  type = list(object({
    id       = string
    voter    = bool
    az_index = number
    ip       = string
  }))
}

variable "engine_hosts" {
  description = "Engine hosts of this region with their fixed IPs."
  type = list(object({
    id       = string
    group    = string
    az_index = number
    ip       = string
  }))
}

variable "etcd_members" {
  description = "etcd members of this region with their fixed IPs; bootstrap_auth: the one member of the cluster that turns etcd authentication on."
  type = list(object({
    name           = string
    az_index       = number
    ip             = string
    bootstrap_auth = bool
  }))
}

variable "etcd_initial_cluster" {
  description = "etcd --initial-cluster for all members of all regions."
  type        = string
}

variable "etcd_version" {
  description = "Pinned etcd release."
  type        = string
}

variable "etcd_sha256" {
  description = "SHA-256 of the pinned etcd release tarball."
  type        = string
}

variable "etcd_download_base_url" {
  description = "Base URL of etcd releases."
  type        = string
}

variable "etcd_heartbeat_ms" {
  description = "etcd heartbeat interval (ms)."
  type        = number
}

variable "etcd_election_timeout_ms" {
  description = "etcd election timeout (ms)."
  type        = number
}

variable "cluster_toml" {
  description = "Rendered cluster configuration."
  type        = string
}

variable "tiers_toml" {
  description = "Rendered tier file."
  type        = string
}

variable "store_data_dir" {
  description = "Data directory of the store nodes."
  type        = string
}

variable "tls_dir" {
  description = "Directory of the PEM files on the hosts."
  type        = string
}

variable "xdc_package" {
  description = "pip requirement for xdc, pinned."
  type        = string
}

variable "xdc_index_url" {
  description = "Package index serving xdc; empty: pip's default."
  type        = string
}

variable "instance_types" {
  description = "EC2 instance types: store, engine, etcd."
  type = object({
    store  = string
    engine = string
    etcd   = string
  })
}

variable "root_volume_gb" {
  description = "Root volume size of every host (GiB)."
  type        = number
}

variable "store_data_volume_gb" {
  description = "Data volume size of each store node (GiB)."
  type        = number
}

variable "store_data_volume_iops" {
  description = "Provisioned IOPS of each store node's gp3 data volume."
  type        = number
}

variable "etcd_data_volume_gb" {
  description = "Data volume size of each etcd member (GiB)."
  type        = number
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow logs (days)."
  type        = number
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}

variable "secrets" {
  description = "Where the cluster's secrets are (Secrets Manager region, name prefix, its ARN, KMS keys)."
  type = object({
    region       = string
    prefix       = string
    arn_prefix   = string
    kms_key_arns = list(string)
  })
}

variable "node_secret_files" {
  description = "Secrets every store node and engine host fetches besides its TLS files (etcd node password, auth file): path => secret name after the prefix."
  type        = map(string)
}

variable "etcd_bootstrap_secret_files" {
  description = "Secrets the etcd member that turns authentication on fetches besides its TLS files (both etcd passwords)."
  type        = map(string)
}

variable "etcd_root_password_file" {
  description = "Path of etcd root's password on the bootstrapping etcd member."
  type        = string
}

variable "store_endpoints" {
  description = "Client API host:port of every store node of the cluster, comma separated (for engines and gateways)."
  type        = string
}

variable "exchange_toml" {
  description = "The exchange file (engine groups and symbols) of the gateways."
  type        = string
}

variable "auth_file" {
  description = "Path of the client auth file on store and engine hosts; empty: no client authentication."
  type        = string
}
