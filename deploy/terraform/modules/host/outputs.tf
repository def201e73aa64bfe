output "instance_id" {
  description = "EC2 instance ID."
  value       = aws_instance.this.id
}

output "private_ip" {
  description = "Private IP of the host."
  value       = aws_instance.this.private_ip
}

output "data_volume_id" {
  description = "ID of the data volume, or null without one."
  value       = var.data_volume_gb > 0 ? aws_ebs_volume.data[0].id : null
}
