output "instance_id" {
  description = "EC2 instance ID of the engine host."
  value       = module.host.instance_id
}

output "private_ip" {
  description = "Private IP of the engine host."
  value       = module.host.private_ip
}

output "gateway_endpoint" {
  description = "host:port of the order gateway."
  value       = "${module.host.private_ip}:${var.gateway_port}"
}
