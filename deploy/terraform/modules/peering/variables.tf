variable "name" {
  description = "Name of the peering connection (e.g. \"xdc-prod-use1-usw2\")."
  type        = string
}

variable "requester_vpc_id" {
  description = "VPC that requests the peering (provider aws.requester)."
  type        = string
}

variable "requester_cidr" {
  description = "CIDR of the requester VPC; the accepter routes only this block over the peering."
  type        = string
}

variable "requester_route_table_id" {
  description = "Private route table of the requester VPC."
  type        = string
}

variable "accepter_vpc_id" {
  description = "VPC that accepts the peering (provider aws.accepter)."
  type        = string
}

variable "accepter_cidr" {
  description = "CIDR of the accepter VPC; the requester routes only this block over the peering."
  type        = string
}

variable "accepter_route_table_id" {
  description = "Private route table of the accepter VPC."
  type        = string
}

variable "accepter_region" {
  description = "AWS region of the accepter VPC."
  type        = string
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
