variable "name" {
  description = "Name of the host (its Name tag), e.g. \"xdc-prod-use1-store-use1-a\"."
  type        = string
}

variable "role" {
  description = "What the host runs: store, engine or etcd (a tag, used by drills and dashboards)."
  type        = string
  validation {
    condition     = contains(["store", "engine", "etcd"], var.role)
    error_message = "role must be store, engine or etcd."
  }
}

variable "instance_type" {
  description = "EC2 instance type."
  type        = string
}

variable "ami_id" {
  description = "AMI to boot; null picks the newest Ubuntu 24.04 LTS (amd64) published by Canonical."
  type        = string
  default     = null
}

variable "subnet_id" {
  description = "Private subnet of the host."
  type        = string
}

variable "availability_zone" {
  description = "Availability zone of the subnet (the data volume is created there)."
  type        = string
}

variable "private_ip" {
  description = "Fixed private IP inside the subnet: every member's address is written into the cluster config before any host exists."
  type        = string
}

variable "security_group_ids" {
  description = "Security groups of the host."
  type        = list(string)
}

variable "service_user" {
  description = "System user the host's service runs as; it owns the data directory."
  type        = string
}

variable "data_dir" {
  description = "Directory of the service's data; the data volume (if any) is mounted there."
  type        = string
}

variable "files" {
  description = "Files to write at boot: absolute path => content (config files, systemd units)."
  type        = map(string)
}

variable "units" {
  description = "systemd units to enable and start once bootstrap is done, in order."
  type        = list(string)
}

variable "role_script" {
  description = "Role-specific bash run after the common steps and before the units start (e.g. installing etcd)."
  type        = string
}

variable "install_xdc" {
  description = "Install the xdc package into /opt/xdc (store nodes and engines; not etcd members)."
  type        = bool
}

variable "xdc_package" {
  description = "pip requirement for xdc, pinned (e.g. \"xdc==0.1.0\")."
  type        = string
}

variable "xdc_index_url" {
  description = "Package index serving xdc and its dependencies (your internal mirror); empty: pip's default."
  type        = string
}

variable "tls_dir" {
  description = "Directory the TLS PEM files are written to: ca.pem, <name>.pem and <name>-key.pem per certificate held, host.pem and host-key.pem (the host's own)."
  type        = string
}

variable "certificates" {
  description = "Names of the certificates this host holds (files <name>.pem and <name>-key.pem of `xdc certs init`, one secret each); the first is the host's own identity. Empty: no TLS material."
  type        = list(string)
}

variable "secret_files" {
  description = "More secrets to fetch at boot: absolute path on the host => secret name after secrets.prefix (e.g. etcd passwords, the auth file)."
  type        = map(string)
}

variable "secrets" {
  description = "Where the secrets are: Secrets Manager region, name prefix, the ARN of that prefix (arn:...:secret:<prefix>) and the KMS keys encrypting them. Only names and ARNs pass through Terraform; the host fetches the contents at boot."
  type = object({
    region       = string
    prefix       = string
    arn_prefix   = string
    kms_key_arns = list(string)
  })
}

variable "kms_key_arn" {
  description = "KMS key encrypting the root and data volumes."
  type        = string
}

variable "root_volume_gb" {
  description = "Size of the root volume in GiB."
  type        = number
  validation {
    condition     = var.root_volume_gb >= 8
    error_message = "root_volume_gb must be at least 8."
  }
}

variable "data_volume_gb" {
  description = "Size of the separate data volume in GiB (0: none). It outlives instance replacement."
  type        = number
  validation {
    condition     = var.data_volume_gb >= 0
    error_message = "data_volume_gb must not be negative."
  }
}

variable "data_volume_iops" {
  description = "Provisioned IOPS of the gp3 data volume (3000 is the gp3 baseline, included in its price)."
  type        = number
  validation {
    condition     = var.data_volume_iops >= 3000 && var.data_volume_iops <= 16000
    error_message = "data_volume_iops must be between 3000 and 16000 (gp3)."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
