output "vpc_id" {
  description = "ID of the region's VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr" {
  description = "CIDR of the region's VPC."
  value       = aws_vpc.this.cidr_block
}

output "private_subnet_ids" {
  description = "Private subnet IDs, in the order of var.availability_zones."
  value       = aws_subnet.private[*].id
}

output "private_route_table_id" {
  description = "Route table of the private subnets (peering routes are added to it)."
  value       = aws_route_table.private.id
}

output "kms_key_arn" {
  description = "Customer-managed KMS key of the region (EBS volumes, logs)."
  value       = aws_kms_key.this.arn
}

output "nat_public_ip" {
  description = "Public IP that bootstrap downloads come from (for allow-lists on artifact hosts)."
  value       = aws_eip.nat.public_ip
}
