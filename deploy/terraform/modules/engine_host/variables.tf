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

variable "iam_instance_profile" {
  description = "Instance profile of the host."
  type        = string
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

variable "tls" {
  description = "Secrets Manager ARNs of the cluster's PEM files (ca, cert, key); the host fetches them at boot."
  type = object({
    ca_secret_arn   = string
    cert_secret_arn = string
    key_secret_arn  = string
  })
}
