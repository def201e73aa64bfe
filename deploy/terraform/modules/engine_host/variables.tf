variable "name_prefix" {
  description = "Prefix of resource names (cluster and region, e.g. \"xdc-prod-use1\")."
  type        = string
}

variable "cluster_name" {
  description = "Name of the xdc cluster."
  type        = string
}

variable "private_ip" {
  description = "Fixed private IP of the host (written into the cluster config of every member)."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet of the host."
  type        = string
}

variable "availability_zone" {
  description = "Availability zone of the subnet."
  type        = string
}

variable "instance_type" {
  description = "EC2 instance type."
  type        = string
}

variable "security_group_ids" {
  description = "Security groups of the host."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "KMS key of the region, encrypting the volumes."
  type        = string
}

variable "root_volume_gb" {
  description = "Root volume size in GiB."
  type        = number
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}

variable "engine_id" {
  description = "Id of the engine instance."
  type        = string
}

variable "engine_group" {
  description = "Engine group (the symbols it owns); its members are hot and warm replicas of each other."
  type        = string
}

variable "region_name" {
  description = "xdc region name of the host."
  type        = string
}

variable "cluster_toml" {
  description = "Rendered cluster configuration (modules/cluster_config)."
  type        = string
}

variable "tiers_toml" {
  description = "Rendered degradation tier file (modules/cluster_config)."
  type        = string
}

variable "tls_dir" {
  description = "Directory of the PEM files, as named in the cluster config."
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

variable "engine_port" {
  description = "TCP port of the engine's internal service."
  type        = number
}

variable "gateway_port" {
  description = "TCP port of the order gateway."
  type        = number
}

variable "store_endpoints" {
  description = "host:port of every store node's client API, comma separated (engines and the gateway follow the leader among them)."
  type        = string
}

variable "exchange_toml" {
  description = "The exchange file (engine groups and symbols) the gateway routes by; written to /etc/xdc/exchange.toml."
  type        = string
}

variable "auth_file" {
  description = "Path of the auth file on the host (fetched as a secret); the engine's control port and the gateway check callers against it. Empty: no client authentication."
  type        = string
}

variable "secrets" {
  description = "Where the cluster's secrets are (Secrets Manager region, name prefix, its ARN, KMS keys); the host fetches its own at boot."
  type = object({
    region       = string
    prefix       = string
    arn_prefix   = string
    kms_key_arns = list(string)
  })
}

variable "secret_files" {
  description = "Secrets besides the TLS files: absolute path on the host => secret name after secrets.prefix."
  type        = map(string)
}
