output "instance_id" {
  description = "EC2 instance ID of the etcd member."
  value       = module.host.instance_id
}

output "client_endpoint" {
  description = "host:port of the member's client API."
  value       = "${module.host.private_ip}:${var.client_port}"
}
