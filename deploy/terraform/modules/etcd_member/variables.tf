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

variable "member_name" {
  description = "etcd member name (unique in the etcd cluster)."
  type        = string
}

variable "initial_cluster" {
  description = "etcd --initial-cluster value: name=https://ip:peer_port for every member."
  type        = string
}

variable "etcd_version" {
  description = "etcd release to install (3.5.6 or newer)."
  type        = string
}

variable "etcd_sha256" {
  description = "SHA-256 of etcd-v<version>-linux-amd64.tar.gz; the download is refused unless it matches."
  type        = string
}

variable "etcd_download_base_url" {
  description = "Base URL of etcd releases (<base>/v<version>/etcd-v<version>-linux-amd64.tar.gz)."
  type        = string
}

variable "heartbeat_ms" {
  description = "etcd --heartbeat-interval in milliseconds (about the largest RTT between members)."
  type        = number
}

variable "election_timeout_ms" {
  description = "etcd --election-timeout in milliseconds."
  type        = number
}

variable "client_port" {
  description = "etcd client port."
  type        = number
}

variable "peer_port" {
  description = "etcd peer port."
  type        = number
}

variable "data_volume_gb" {
  description = "Size of the etcd data volume in GiB."
  type        = number
}

variable "tls_dir" {
  description = "Directory of the PEM files: ca.pem, <member_name>.pem and <member_name>-key.pem (the member's server and peer certificate), host.pem."
  type        = string
}

variable "bootstrap_auth" {
  description = "Whether this member turns etcd authentication on (exactly one member: the first). It then gets xdc, the cluster TOML and both etcd passwords."
  type        = bool
}

variable "cluster_toml" {
  description = "Rendered cluster configuration: its [etcd] names the endpoints, TLS files, user and password file the bootstrap uses."
  type        = string
}

variable "root_password_file" {
  description = "Path of etcd root's password on the bootstrapping member (fetched as a secret)."
  type        = string
}

variable "xdc_package" {
  description = "pip requirement for xdc, pinned (installed on the bootstrapping member only)."
  type        = string
}

variable "xdc_index_url" {
  description = "Package index serving xdc; empty: pip's default."
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
  description = "Secrets besides the TLS files: absolute path on the host => secret name after secrets.prefix (the bootstrapping member: both etcd passwords)."
  type        = map(string)
}
