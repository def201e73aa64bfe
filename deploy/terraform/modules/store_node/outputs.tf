output "instance_id" {
  description = "EC2 instance ID of the node."
  value       = module.host.instance_id
}

output "private_ip" {
  description = "Private IP of the node."
  value       = module.host.private_ip
}

output "client_endpoint" {
  description = "host:port of the node's client API."
  value       = "${module.host.private_ip}:${var.client_port}"
}

output "data_volume_id" {
  description = "EBS volume holding the node's log."
  value       = module.host.data_volume_id
}
