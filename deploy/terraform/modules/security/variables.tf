variable "name" {
  description = "Name prefix of the security groups (cluster and region)."
  type        = string
}

variable "vpc_id" {
  description = "VPC the security groups belong to."
  type        = string
}

variable "client_cidrs" {
  description = "CIDRs of the clients (order entry, market data consumers) allowed to reach the client API and the order gateway."
  type        = list(string)
  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "client_cidrs must be valid IPv4 CIDR blocks, never 0.0.0.0/0."
  }
}

variable "cluster_cidrs" {
  description = "CIDRs of the cluster's own networks (every region's VPC); only they reach replication, engine and etcd ports."
  type        = list(string)
  validation {
    condition     = length(var.cluster_cidrs) > 0 && alltrue([for c in var.cluster_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "cluster_cidrs must be valid IPv4 CIDR blocks, never 0.0.0.0/0."
  }
}

variable "ports" {
  description = "TCP ports: client (store client API), peer (replication), engine (engine internal), gateway (order gateway), etcd_client, etcd_peer."
  type = object({
    client      = number
    peer        = number
    engine      = number
    gateway     = number
    etcd_client = number
    etcd_peer   = number
  })
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
