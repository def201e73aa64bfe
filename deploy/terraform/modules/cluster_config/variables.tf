variable "cluster_name" {
  description = "Name of the cluster; its etcd prefix is \"/<cluster_name>/\"."
  type        = string
  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", var.cluster_name))
    error_message = "cluster_name must be 1-63 letters, digits, '.', '_' or '-'."
  }
}

variable "failover" {
  description = "\"manual\": a lost leader is replaced only when an operator promotes a region; \"automatic\": the cluster elects a new leader by itself."
  type        = string
  validation {
    condition     = contains(["manual", "automatic"], var.failover)
    error_message = "failover must be \"manual\" or \"automatic\"."
  }
}

variable "lease_ttl_s" {
  description = "etcd lease TTL of the leader key, in whole seconds."
  type        = number
  validation {
    condition     = var.lease_ttl_s >= 1 && floor(var.lease_ttl_s) == var.lease_ttl_s
    error_message = "lease_ttl_s must be a whole number of seconds, at least 1."
  }
}

variable "etcd_endpoints" {
  description = "host:port of every etcd member's client API."
  type        = list(string)
}

variable "regions" {
  description = "xdc region names, in order."
  type        = list(string)
}

variable "members" {
  description = "Store nodes: id, xdc region, client and peer host:port, voter."
  type = list(object({
    id     = string
    region = string
    client = string
    peer   = string
    voter  = bool
  }))
}

variable "data_dir" {
  description = "Data directory of every store node."
  type        = string
}

variable "tls_dir" {
  description = "Directory of the PEM files on every host (ca.pem, <member id>.pem, host.pem); empty: no TLS and no etcd authentication."
  type        = string
  validation {
    condition     = can(regex("^(/[A-Za-z0-9._-]+)*$", var.tls_dir))
    error_message = "tls_dir must be an absolute path of plain characters (or empty)."
  }
}

variable "tiers" {
  description = "Degradation tiers in recovery order (tier 0 recovers first and is never shed): name and services."
  type = list(object({
    name     = string
    services = list(string)
  }))
}

variable "client_certs" {
  description = "Whether the store's client API demands a client certificate (false: clients authenticate with tokens only)."
  type        = bool
}

variable "etcd_user" {
  description = "etcd user of the cluster's nodes and engines (its role may touch only \"/<cluster_name>/\")."
  type        = string
}

variable "etcd_password_file" {
  description = "Path of the etcd user's password on every host."
  type        = string
}

variable "auth_file" {
  description = "Path of the client auth file (principals, grants) on the hosts; empty: clients are not authenticated."
  type        = string
}
