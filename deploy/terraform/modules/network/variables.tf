variable "name" {
  description = "Name prefix of every resource (cluster and region, e.g. \"xdc-prod-use1\")."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of this region's VPC. Must not overlap the other regions' VPCs (they are peered)."
  type        = string
  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be a valid IPv4 CIDR block."
  }
}

variable "availability_zones" {
  description = "Availability zones of the private subnets, one subnet each, in order."
  type        = list(string)
  validation {
    condition     = length(var.availability_zones) >= 1
    error_message = "At least one availability zone is needed."
  }
}

variable "private_subnet_cidrs" {
  description = "One private subnet CIDR per availability zone (same order); hosts live here, without public IPs."
  type        = list(string)
  validation {
    condition     = alltrue([for c in var.private_subnet_cidrs : can(cidrhost(c, 0))])
    error_message = "Every private subnet CIDR must be a valid IPv4 CIDR block."
  }
}

variable "public_subnet_cidr" {
  description = "CIDR of the public subnet that holds only the NAT gateway (bootstrap downloads go out through it)."
  type        = string
  validation {
    condition     = can(cidrhost(var.public_subnet_cidr, 0))
    error_message = "public_subnet_cidr must be a valid IPv4 CIDR block."
  }
}

variable "flow_log_retention_days" {
  description = "Days VPC flow logs are kept in CloudWatch Logs."
  type        = number
  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be a retention period CloudWatch Logs accepts (e.g. 365)."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
